"""A planned migration, a reprotect, a failback and a reprotect back through the real dispatcher on
real Postgres, stub backends in a shared stub world (whose files are the peers: which VM is on at
which vCenter, which snapshot each storage host holds with which GUID)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from handlers.backends.stub.world import StubWorld
from tests.integration.conftest import DR, GROUP, PRIMARY
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.workload import PROTECTION_DS

SOURCE_HOST = "zfs-primary.example.internal"
DR_HOST = "zfs-dr-01.example.internal"


def _group(db: Database, prefix: str) -> list[tuple[str, str]]:
    """Three protected VMs (priorities 1, 2, 2) with DR shells asked for, one mapped network, the
    source storage host over SSH (a reprotect needs it), and one replication."""
    db.sql("update protection_groups set source_ssh_host = %s, source_ssh_user = 'zerfaux',"
           " source_ssh_key_secret = 'src-key', source_ssh_host_key = %s where id = %s",
           (SOURCE_HOST, f"{SOURCE_HOST} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemo", GROUP))
    db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
           " values (%s, 'VM Network', 'dr-network')", (GROUP,))
    out = []
    for i, priority in enumerate((1, 2, 2)):
        name, moref = f"{prefix}-{i}", f"vm-{prefix}-{i}"
        vm = db.value(
            "insert into vcenter_vms (vcenter_id, moref, name, datastore, num_cpu, memory_mb, guest_id, disks, networks)"
            " values (%s, %s, %s, %s, 2, 4096, 'ubuntu64Guest', %s::jsonb, '[\"VM Network\"]') returning id",
            (PRIMARY, moref, name, PROTECTION_DS,
             json.dumps([{"file": f"[{PROTECTION_DS}] {name}/{name}.vmdk", "capacity": 16 << 30,
                          "datastore": PROTECTION_DS, "controller": "pvscsi"}])))
        pid = db.value("insert into protected_vms (protection_group_id, vm_id, boot_priority, needs_dr_shell)"
                       " values (%s, %s, %s, true) returning id", (GROUP, vm, priority))
        out.append((str(pid), moref))
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    return out


def _run(db: Database, kind: str) -> str:
    return str(db.value("insert into recovery_runs (protection_group_id, kind) values (%s, %s) returning id",
                        (GROUP, kind)))


def _vm(world: StubWorld, vcenter: str, moref: str) -> dict[str, Any]:
    return dict(json.loads(world.read("fo-vm", vcenter, moref) or '{"state": "poweredOn"}'))


def _ds(world: StubWorld, host: str, dataset: str) -> dict[str, Any]:
    return dict(json.loads(world.read("fo-ds", host, dataset) or "{}"))


def _ended(db: Database, run_id: str) -> dict[str, Any]:
    run = db.one("select * from recovery_runs where id = %s", (run_id,))
    steps = db.sql("select name, status, error from recovery_run_steps where run_id = %s order by seq", (run_id,))
    bad = [s for s in steps if s["status"] not in ("done", "skipped")]
    assert run["error"] is None and not bad, (run["error"], bad)
    return dict(run)


async def test_migrate_reprotect_fail_back_and_reprotect_again(seeded_db: Database, tmp_path: Path) -> None:
    db, world_dir = seeded_db, tmp_path / "world"
    settings = engine_settings(db.url, ZERFAUX_STUB_WORLD=str(world_dir), ZERFAUX_STUB_SECONDS="0.02")
    vms = _group(db, "fo")
    await drain(settings)
    shells = {pid: str(db.value("select dr_shell_vm_id from protected_vms where id = %s", (pid,))) for pid, _ in vms}
    assert all(m and m != "None" for m in shells.values())
    world = StubWorld(world_dir)
    group = db.one("select * from protection_groups where id = %s", (GROUP,))
    source_ds, replica = group["source_dataset"], f"tank/replicas/{group['replica_name']}"

    migration = _run(db, "planned_migration")
    assert db.value("select state from protection_groups where id = %s", (GROUP,)) == "recovering"
    await drain(settings)
    run = _ended(db, migration)
    assert (run["status"], float(run["data_loss_seconds"])) == ("completed", 0.0)
    group = db.one("select * from protection_groups where id = %s", (GROUP,))
    assert (group["state"], group["direction"]) == ("failed_over", "forward")
    # Through the peers: each source VM off at the primary, its shell on at DR, and every
    # power-off in the journal before the first power-on.
    assert all(_vm(world, PRIMARY, moref)["state"] == "poweredOff" for _, moref in vms)
    assert all(_vm(world, DR, shells[pid])["state"] == "poweredOn" for pid, _ in vms)
    journal = [(e["kind"], e["effect"]) for e in world.journal()]
    offs = [i for i, e in enumerate(journal) if e == ("failover.vm", "powered-off")]
    ons = [i for i, e in enumerate(journal) if e == ("recovery.vm", "powered-on")]
    assert len(offs) == 3 and len(ons) == 3 and max(offs) < min(ons)
    final = run["report"]["final_point"]
    guids = {str(s[1]) for s in _ds(world, SOURCE_HOST, source_ds)["snapshots"] if s[0] == final["snapshot_name"]}
    assert guids == {final["guid"]} and final["guid"] in {str(s[1]) for s in _ds(world, DR_HOST, replica)["snapshots"]}
    point = db.one("select * from recovery_points where id = %s", (run["recovery_point_id"],))
    assert (point["snapshot_name"], point["guid"]) == (final["snapshot_name"], final["guid"])

    reprotect = _run(db, "reprotect")
    await drain(settings)
    run = _ended(db, reprotect)
    assert run["acts_on_run_id"] is not None and str(run["acts_on_run_id"]) == migration
    group = db.one("select * from protection_groups where id = %s", (GROUP,))
    assert (group["state"], group["direction"]) == ("protected", "reverse")
    sent = run["report"]["replication"]
    assert (sent["source_dataset"], sent["target_dataset"]) == (replica, source_ds)
    assert run["report"]["common_snapshot"]["name"] == final["snapshot_name"] and "kept" not in run["report"]
    assert _ds(world, SOURCE_HOST, source_ds)["readonly"] is True

    failback = _run(db, "planned_migration")
    await drain(settings)
    run = _ended(db, failback)
    assert run["report"]["direction"] == "reverse"
    assert all(_vm(world, DR, shells[pid])["state"] == "poweredOff" for pid, _ in vms)
    assert all(_vm(world, PRIMARY, moref)["state"] == "poweredOn" for _, moref in vms)
    assert db.value("select state from protection_groups where id = %s", (GROUP,)) == "failed_over"

    back = _run(db, "reprotect")
    await drain(settings)
    run = _ended(db, back)
    group = db.one("select * from protection_groups where id = %s", (GROUP,))
    assert (group["state"], group["direction"]) == ("protected", "forward")
    assert (run["report"]["replication"]["source_dataset"], run["report"]["replication"]["target_dataset"]) == (
        source_ds, replica)
    assert _ds(world, DR_HOST, replica)["readonly"] is True
