"""The report of a planned migration or a failover: per VM (site A's shutdown or fencing, the VM at
B, boot and ready times) and for the group (final snapshot and its GUIDs, datastore, the dataset
made writable or the clone), all read from the recorded steps, so a resumed attempt reports what
the first one did."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handlers.recovery.failover_plan import FORWARD_KINDS

if TYPE_CHECKING:
    from handlers.recovery.failover_runner import FailoverRunner


def forward_report(runner: FailoverRunner) -> dict[str, Any]:
    """The result's report (and ``finish``'s detail) of a planned migration or failover, from its steps."""
    plan = runner.plan
    out: dict[str, Any] = {"run_id": plan.run_id, "kind": plan.kind, "direction": plan.direction,
                           "site_a": plan.a.role, "site_b": plan.b.role}
    if plan.kind not in FORWARD_KINDS:
        return out
    vms = []
    for vm in plan.vms:
        entry: dict[str, Any] = {"protected_vm_id": vm.protected_vm_id, "vm": vm.name, "boot_priority": vm.priority,
                                 "moref_a": vm.a_moref, "moref_b": vm.b_moref}
        down = runner.detail("shutdown_source" if plan.kind == "planned_migration" else "fence_source",
                             vm.protected_vm_id)
        if plan.kind == "planned_migration":
            entry.update(source_shutdown=down.get("how"), source_off_at=down.get("powered_off_at"))
        else:
            entry.update(fenced=bool(down.get("fenced")), fence_why=down.get("why"),
                         source_off_at=down.get("powered_off_at"))
        on, ready = runner.detail("power_on", vm.protected_vm_id), runner.detail("wait_ready", vm.protected_vm_id)
        entry.update(boot_time=on.get("boot_time"), ready_at=ready.get("ready_at"), ready_how=ready.get("how"))
        if plan.kind == "planned_migration":
            entry.update(source_state=on.get("source_state"), source_changed_at=on.get("source_changed_at"))
        vms.append(entry)
    validated = runner.detail("validate")
    older = bool(validated.get("older"))
    group: dict[str, Any] = {"datastore": runner.b_datastore(older), "dataset": runner.b_dataset(older)}
    if plan.kind == "planned_migration":
        final = runner.detail("replicate_final")
        if final.get("snapshot_name"):
            group["final_snapshot"] = {k: final.get(k) for k in ("snapshot_name", "guid_a", "guid_b", "created_at",
                                                                 "bytes_transferred")}
            out["final_point"] = {"snapshot_name": final["snapshot_name"], "guid": final.get("guid"),
                                  "created_at": final.get("created_at")}
    else:
        group.update(recovery_point=plan.point_snapshot, older_point=older,
                     newer_snapshots=validated.get("newer_snapshots", []))
        if older:
            group["clone"] = runner.detail("clone_point").get("dataset")
    pre = runner.detail("pre_failover_snapshot")
    if pre.get("snapshot"):
        group["pre_failover_snapshot"] = pre["snapshot"]
    writable = runner.detail("make_writable")
    if writable.get("dataset"):
        group["made_writable"] = writable["dataset"]
    warnings = [f"{r['name']}: {r.get('error')}" for r in runner.book.rows.values()
                if r.get("status") == "warning" and r.get("error")]
    return {**out, "vms": vms, "group": group, "warnings": warnings}
