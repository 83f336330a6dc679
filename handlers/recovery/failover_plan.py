"""The plan of a planned migration, a failover, a commit, a rollback or a reprotect (issue 14).

Built from the kind's input alone, like ``plan.build_plan``: the same input gives the same steps
on every attempt. Words (docs/recovery.md, "Failover runs: the engine"): site A is where the VMs
run before the run, site B where they come up. Direction 'forward': A is the primary (source
vCenter, ``source_dataset`` on the group's source host), B the DR site (DR vCenter, the replica
on the replication target); 'reverse' swaps them. Structural faults (no group, no target, a
local source where both storage hosts are needed) raise ``PermanentError`` at once; faults of a
VM or a network are collected in ``problems`` for the ``validate`` step to report in one message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from handlers.dr_shell import map_disk_path
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic
from handlers.recovery.plan import Step
from handlers.types import Row, SSHEndpoint, VCenterEndpoint

FAILOVER_KINDS = ("planned_migration", "failover", "commit", "rollback", "reprotect")
FORWARD_KINDS = ("planned_migration", "failover")  # the kinds that bring VMs up at B
DEFAULT_SHUTDOWN_SECONDS = 300
DEFAULT_FENCE_SECONDS = 60.0


def hex8(run_id: str) -> str:
    return run_id.replace("-", "")[:8]


def failover_tag(run_id: str) -> str:
    """``zerfaux-failover-<8 hex>``: an older point's clone (under the target root) and its datastore."""
    return "zerfaux-failover-" + hex8(run_id)


@dataclass(frozen=True)
class Site:
    role: str  # 'primary' | 'dr': what the site is, whatever the direction
    vcenter: VCenterEndpoint | None
    storage: SSHEndpoint | None  # None: the listener's own machine (a group without source_ssh_host)
    dataset: str
    clone_root: str  # where an older point's clone goes on this host


@dataclass(frozen=True)
class FailoverVM:
    protected_vm_id: str
    name: str
    priority: int
    boot_delay_seconds: int
    tools_timeout_seconds: int
    shutdown_timeout_seconds: int
    a_moref: str | None  # the VM at site A (stopped or fenced)
    b_moref: str | None  # the VM at site B (powered on)
    disk_files: tuple[str, ...]  # as the source inventory names them, [protection_datastore] dir/x.vmdk
    disks: tuple[RecoveryDisk, ...]  # on B's datastore (forward, newest point); remapped for a clone
    nics: tuple[RecoveryNic, ...]


@dataclass(frozen=True)
class FailoverPlan:
    run_id: str
    kind: str
    direction: str  # the group's direction during the run: 'forward' | 'reverse'
    group_name: str
    group: Row  # the rows themselves: replication requests are built from them
    target: Row
    a: Site
    b: Site
    b_datastore: str  # the datastore VMs use at B (an older point's clone datastore: decided at validate)
    protection_datastore: str
    nfs_host: str
    nfs_clients: tuple[str, ...] | None
    cluster: str | None  # where B's datastore is presented (forward: protection_groups.dr_cluster)
    options: Mapping[str, Any]
    point_snapshot: str | None  # the recovery point's snapshot name (failover, commit, rollback)
    point_guid: str | None
    point_created_at: str | None
    key_secret: str | None  # protection_groups.encryption_key_secret
    vms: tuple[FailoverVM, ...]
    steps: tuple[Step, ...]
    acts_on: Row | None = None  # commit, rollback, reprotect: the run acted on
    acts_on_steps: tuple[Row, ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tag(self) -> str:
        return failover_tag(self.resource_run_id)

    @property
    def resource_run_id(self) -> str:
        """Whose snapshot, clone and datastore: the run itself, or the run a commit/rollback acts on."""
        if self.kind in FORWARD_KINDS or not self.acts_on:
            return self.run_id
        return str(self.acts_on["id"])

    @property
    def clone_dataset(self) -> str:
        return f"{self.b.clone_root}/{self.tag}"

    @property
    def reversed_direction(self) -> str:
        return "reverse" if self.direction == "forward" else "forward"

    def vm(self, protected_vm_id: str | None) -> FailoverVM | None:
        return next((v for v in self.vms if v.protected_vm_id == protected_vm_id), None)

    def step(self, name: str, protected_vm_id: str | None = None) -> Step:
        return next(s for s in self.steps if s.name == name and s.protected_vm_id == protected_vm_id)

    def option(self, key: str, default: Any) -> Any:
        value = self.options.get(key)
        return default if value is None else value


def build_failover_plan(payload: Mapping[str, Any]) -> FailoverPlan:
    run = _need(payload, "run", "the recovery run's row is missing from the input: upgrade the database "
                                "(zerfaux migrate)")
    kind = str(run.get("kind") or "")
    if kind not in FAILOVER_KINDS:
        raise PermanentError(f"recovery_runs.kind {kind!r} is not a failover kind ({', '.join(FAILOVER_KINDS)})")
    group = _need(payload, "group", "the run's protection group is gone: recovery_runs.protection_group_id")
    name = str(group.get("name") or group.get("id"))
    target = _need(payload, "target", f"protection group {name!r} has no replication target: set "
                                      "protection_groups.replication_target_id")
    direction = str(group.get("direction") or "forward")
    if direction not in ("forward", "reverse"):
        raise PermanentError(f"protection_groups.direction of {name!r} is {direction!r}, not 'forward' or 'reverse'")
    run_id = str(run["id"])
    primary, dr = _sites(payload, group, target, name)
    a, b = (primary, dr) if direction == "forward" else (dr, primary)
    if (kind == "reprotect" or direction == "reverse") and (primary.storage is None or dr.storage is None):
        what = "a reprotect" if kind == "reprotect" else f"a {kind} in direction 'reverse' (a failback)"
        raise PermanentError(
            f"{what} needs SSH to both storage hosts, and protection group {name!r} has its source dataset on the "
            "listener's own machine: set protection_groups.source_ssh_host (with source_ssh_user, "
            "source_ssh_key_secret, source_ssh_host_key) to reach the primary storage host")
    options = run.get("options") if isinstance(run.get("options"), Mapping) else {}
    acts_on = payload.get("acts_on_run") if isinstance(payload.get("acts_on_run"), Mapping) else None
    acts_steps = tuple(s for s in payload.get("acts_on_steps") or [] if isinstance(s, Mapping))
    if kind not in FORWARD_KINDS and not (acts_on and acts_on.get("id")):
        raise PermanentError(f"a {kind} run acts on the planned migration or failover that brought group {name!r} "
                             "where it is, and recovery_runs.acts_on_run_id names none: upgrade the database "
                             "(zerfaux migrate), then insert the run again")
    protection_ds = str(group.get("protection_datastore") or "")
    if direction == "forward":
        b_datastore = str(target.get("dr_datastore") or "")
        if not b_datastore and kind in FORWARD_KINDS:
            raise PermanentError(f"replication target {target.get('name')!r} has no dr_datastore: set "
                                 "replication_targets.dr_datastore (the datastore that presents the replica)")
    else:
        b_datastore = protection_ds
    vms, problems = _vms(payload, group, direction, b_datastore, protection_ds, kind)
    if kind in FORWARD_KINDS and not vms:
        problems.append(f"protection group {name!r} has no protected VMs: add protected_vms rows")
    if kind in FORWARD_KINDS and (a.vcenter is None or b.vcenter is None):
        missing = "source_vcenter_id" if primary.vcenter is None else "dr_vcenter_id"
        problems.append(f"protection group {name!r} has no {missing.replace('_id', '').replace('_', ' ')}: set "
                        f"protection_groups.{missing}")
    raw_point = payload.get("recovery_point")
    point: Mapping[str, Any] = raw_point if isinstance(raw_point, Mapping) else {}
    if kind == "failover" and not point.get("snapshot_name"):
        raise PermanentError(f"the failover has no recovery point on the target: replicate group {name!r} first "
                             "(a replication_jobs row), or name one in recovery_runs.recovery_point_id")
    if kind == "rollback" or kind == "commit":
        vms = _acted_on_vms(vms, acts_steps)
    steps = _steps(kind, vms, direction)
    return FailoverPlan(
        run_id=run_id, kind=kind, direction=direction, group_name=name, group=group, target=target, a=a, b=b,
        b_datastore=b_datastore, protection_datastore=protection_ds,
        nfs_host=str(target.get("nfs_host_effective") or target.get("nfs_host") or target.get("ssh_host"))
        if direction == "forward" else str(group.get("source_ssh_host") or ""),
        nfs_clients=tuple(str(c) for c in target["nfs_clients"]) if target.get("nfs_clients") else None,
        cluster=(group.get("dr_cluster") or None) if direction == "forward" else None,
        options=dict(options or {}), point_snapshot=str(point["snapshot_name"]) if point.get("snapshot_name") else None,
        point_guid=None if point.get("guid") is None else str(point["guid"]),
        point_created_at=None if point.get("created_at") is None else str(point["created_at"]),
        key_secret=group.get("encryption_key_secret") or None, vms=vms, steps=steps, acts_on=acts_on,
        acts_on_steps=acts_steps, problems=tuple(problems))


def _need(payload: Mapping[str, Any], key: str, why: str) -> Row:
    value = payload.get(key)
    if not isinstance(value, Mapping) or not value:
        raise PermanentError(why)
    return value


def _sites(payload: Mapping[str, Any], group: Row, target: Row, name: str) -> tuple[Site, Site]:
    source_ds = str(group.get("source_dataset") or "")
    replica = str(payload.get("replica_dataset") or "")
    if not source_ds:
        raise PermanentError(f"protection group {name!r} has no source_dataset: set protection_groups.source_dataset")
    if not replica or not target.get("target_root"):
        raise PermanentError(f"protection group {name!r} has no replica dataset on target {target.get('name')!r}: "
                             "set protection_groups.replica_name and replication_targets.target_root")
    vc = {k: VCenterEndpoint.from_row(v) if isinstance(v, Mapping) and v else None
          for k, v in (("src", payload.get("source_vcenter")), ("dr", payload.get("dr_vcenter")))}
    primary = Site("primary", vc["src"], SSHEndpoint.source_from_group(group), source_ds,
                   source_ds.rsplit("/", 1)[0] if "/" in source_ds else source_ds)
    dr = Site("dr", vc["dr"], SSHEndpoint.target_from_row(target), replica, str(target["target_root"]).rstrip("/"))
    return primary, dr


def _mappings(raw: object) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for row in raw if isinstance(raw, list) else []:
        if isinstance(row, Mapping) and row.get("source_network"):
            out[str(row["source_network"])] = row.get("recovery_network") or None
    return out


def _vms(payload: Mapping[str, Any], group: Row, direction: str, b_datastore: str, protection_ds: str,
         kind: str) -> tuple[tuple[FailoverVM, ...], list[str]]:
    mappings = _mappings(payload.get("network_mappings"))
    problems: list[str] = []
    plans: list[FailoverVM] = []
    check = kind in FORWARD_KINDS
    for entry in payload.get("vms") or []:
        if not isinstance(entry, Mapping) or not entry.get("protected_vm"):
            continue
        protected, vm = entry["protected_vm"], entry.get("vm") or {}
        pid = str(protected["id"])
        vm_name = str(vm.get("name") or pid)
        inventory = str(vm["moref"]) if vm.get("moref") else None
        shell = str(protected["dr_shell_vm_id"]) if protected.get("dr_shell_vm_id") else None
        if check and not inventory:
            problems.append(f"protected VM {pid} has no inventory VM (protected_vms.vm_id names no vcenter_vms row "
                            "with a moref): sync the source vCenter and fix vm_id")
        if check and not shell:
            problems.append(f"VM {vm_name!r} has no DR shell (protected_vms.dr_shell_vm_id is null): set "
                            "protected_vms.needs_dr_shell to true and wait for it")
        a_moref, b_moref = (inventory, shell) if direction == "forward" else (shell, inventory)
        files: list[str] = []
        disks: list[RecoveryDisk] = []
        raw_disks: list[Any] = vm["disks"] if isinstance(vm.get("disks"), list) else []
        if check and not raw_disks:
            problems.append(f"VM {vm_name!r}: vcenter_vms.disks lists no disks: sync the source vCenter")
        for i, d in enumerate(raw_disks):
            field_name = f"vcenter_vms.disks[{i}] of VM {vm_name!r}"
            if not isinstance(d, Mapping) or not isinstance(d.get("file"), str):
                problems.append(f"{field_name} has no 'file' string: sync the source vCenter")
                continue
            try:
                mapped = map_disk_path(d["file"], protection_ds, b_datastore or protection_ds, f"{field_name}.file")
            except PermanentError as exc:
                if check:
                    problems.append(str(exc))
                continue
            files.append(d["file"])
            disks.append(RecoveryDisk(mapped, int(d.get("capacity") or 0), str(d.get("controller") or "lsilogic")))
        nics = []
        raw_nets: list[Any] = vm["networks"] if isinstance(vm.get("networks"), list) else []
        for net in raw_nets:
            net = str(net)
            recovery = mappings.get(net)
            if recovery is None:
                if check:
                    problems.append(
                        f"VM {vm_name!r} has a NIC on network {net!r}, which has no network_mappings row with a "
                        f"recovery_network in group {group.get('name')!r}: insert one (source_network {net!r}, "
                        "recovery_network)")
                continue
            nics.append(RecoveryNic(recovery, net) if direction == "forward" else RecoveryNic(net, recovery))
        shutdown = protected.get("shutdown_timeout_seconds")
        plans.append(FailoverVM(
            pid, vm_name, int(protected.get("boot_priority") or 3), int(protected.get("boot_delay_seconds") or 0),
            int(300 if protected.get("tools_timeout_seconds") is None else protected["tools_timeout_seconds"]),
            int(DEFAULT_SHUTDOWN_SECONDS if shutdown is None else shutdown), a_moref, b_moref, tuple(files),
            tuple(disks), tuple(nics)))
    plans.sort(key=lambda p: (p.priority, p.name, p.protected_vm_id))
    return tuple(plans), problems


def _acted_on_vms(vms: Sequence[FailoverVM], acts_steps: Sequence[Row]) -> tuple[FailoverVM, ...]:
    """The VMs the acted-on run brought up, in its order; B's moref as it recorded it. A VM that
    left the group since is still powered off and detached; one that joined is left alone."""
    ours = {v.protected_vm_id: v for v in vms}
    out: dict[str, FailoverVM] = {}
    for row in sorted(acts_steps, key=lambda r: int(r.get("seq") or 0)):
        pid = row.get("protected_vm_id")
        if pid is None or str(pid) in out:
            continue
        pid = str(pid)
        recorded = next((str((r.get("detail") or {}).get("moref")) for r in acts_steps
                         if str(r.get("protected_vm_id")) == pid and r.get("name") in ("power_on", "attach_disks")
                         and (r.get("detail") or {}).get("moref")), None)
        known = ours.get(pid)
        if known is None:
            known = FailoverVM(pid, pid, 6, 0, 0, 0, None, recorded, (), (), ())
        elif recorded:
            known = replace(known, b_moref=recorded)
        out[pid] = known
    return tuple(out.values())


def _steps(kind: str, vms: Sequence[FailoverVM], direction: str) -> tuple[Step, ...]:
    names: list[tuple[str, str | None, int | None]] = [("validate", None, None)]
    per_vm = [v.protected_vm_id for v in vms]
    if kind in FORWARD_KINDS:
        if kind == "planned_migration":
            names.append(("replicate", None, None))
            for priority in sorted({v.priority for v in vms}, reverse=True):
                names += [("shutdown_source", v.protected_vm_id, priority) for v in vms if v.priority == priority]
            names.append(("replicate_final", None, None))
        else:
            for priority in sorted({v.priority for v in vms}, reverse=True):
                names += [("fence_source", v.protected_vm_id, priority) for v in vms if v.priority == priority]
        names += [(n, None, None) for n in ("pre_failover_snapshot", "load_key", "make_writable")]
        if kind == "failover":
            names.append(("clone_point", None, None))
        names += [("export", None, None), ("present_datastore", None, None)]
        names += [("attach_disks", p, None) for p in per_vm]
        names += [("set_networks", p, None) for p in per_vm]
        for priority in sorted({v.priority for v in vms}):
            names += [("power_on", v.protected_vm_id, priority) for v in vms if v.priority == priority]
            names += [("wait_ready", v.protected_vm_id, priority) for v in vms if v.priority == priority]
    elif kind == "commit":
        names.append(("replace_replica", None, None))
    elif kind == "rollback":
        names += [("power_off", p, None) for p in per_vm]
        names += [("detach_disks", p, None) for p in per_vm]
        names += [(n, None, None) for n in ("unexport", "remove_datastore", "rollback_replica", "destroy_clone",
                                            "set_readonly")]
    else:
        names += [(n, None, None) for n in ("check_source_changes", "keep_source_changes", "replicate_reverse")]
    names.append(("finish", None, None))
    return tuple(Step(i, n, p, prio) for i, (n, p, prio) in enumerate(names, start=1))


def remap_disks(vm: FailoverVM, protection_ds: str, datastore: str) -> tuple[RecoveryDisk, ...]:
    """The VM's disks on ``datastore`` (an older point's clone datastore instead of the DR datastore)."""
    return tuple(RecoveryDisk(map_disk_path(f, protection_ds, datastore), d.capacity, d.controller)
                 for f, d in zip(vm.disk_files, vm.disks))
