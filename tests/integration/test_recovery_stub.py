"""A test failover and its cleanup through the real dispatcher on real Postgres, stub backends in
a shared stub world (the peers: its files say what exists at the DR site). A listener SIGKILLed in
the middle of a run is resumed by another with nothing made twice and nothing leaked."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from handlers.backends.stub.world import StubWorld
from handlers.recovery.backends import run_tag
from tests.integration.conftest import GROUP, PRIMARY
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.workload import PROTECTION_DS, Proc, listener_env

LEASE, SWEEP = 2.0, 0.5


def _group(db: Database, prefix: str) -> list[str]:
    """Three protected VMs on the protection datastore (priorities 1, 2, 2), one mapped network
    with no test network (so the run makes its own port group), and the group replicated once."""
    db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
           " values (%s, 'VM Network', 'dr-network')", (GROUP,))
    ids = []
    for i, priority in enumerate((1, 2, 2)):
        name = f"{prefix}-{i}"
        vm = db.value(
            "insert into vcenter_vms (vcenter_id, moref, name, datastore, num_cpu, memory_mb, guest_id, disks, networks)"
            " values (%s, %s, %s, %s, 2, 4096, 'ubuntu64Guest', %s::jsonb, '[\"VM Network\"]') returning id",
            (PRIMARY, f"vm-{prefix}-{i}", name, PROTECTION_DS,
             json.dumps([{"file": f"[{PROTECTION_DS}] {name}/{name}.vmdk", "capacity": 16 << 30,
                          "datastore": PROTECTION_DS, "controller": "pvscsi"}])))
        ids.append(str(db.value("insert into protected_vms (protection_group_id, vm_id, boot_priority)"
                                " values (%s, %s, %s) returning id", (GROUP, vm, priority))))
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    return ids


def _run(db: Database, kind: str = "test", test_run: Any = None) -> str:
    return str(db.value("insert into recovery_runs (protection_group_id, kind, test_run_id) values (%s, %s, %s)"
                        " returning id", (GROUP, kind, test_run)))


def _effects(world: StubWorld, kind: str, effect: str) -> int:
    return sum(1 for e in world.journal() if e["kind"] == kind and e["effect"] == effect)


def _left_at_dr(world: Path, tag: str, run_id: str) -> list[str]:
    """What the stub world still holds of the run: files named after its tag or id."""
    left = []
    for path in world.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and (tag in str(path) or run_id in str(path)):
            if path.name.endswith(".lock"):
                continue
            text = path.read_text()
            if text not in ("{}",):
                left.append(str(path.relative_to(world)))
    return left


async def test_a_test_failover_and_its_cleanup_converge_through_the_engine(seeded_db: Database,
                                                                           tmp_path: Path) -> None:
    db, world_dir = seeded_db, tmp_path / "world"
    settings = engine_settings(db.url, ZERFAUX_STUB_WORLD=str(world_dir), ZERFAUX_STUB_SECONDS="0.05")
    vms = _group(db, "rs")
    await drain(settings)
    assert db.value("select count(*) from recovery_points where protection_group_id = %s and on_target", (GROUP,))

    test = _run(db)
    await drain(settings)
    run = db.one("select * from recovery_runs where id = %s", (test,))
    assert (run["status"], run["error"]) == ("active", None)
    assert run["rto_seconds"] is not None and float(run["rto_seconds"]) > 0
    steps = db.sql("select * from recovery_run_steps where run_id = %s order by seq", (test,))
    assert [s["status"] for s in steps] == ["done"] * len(steps) and len(steps) == 16
    assert all(s["started_at"] and s["finished_at"] for s in steps)
    tag, world = run_tag(test), StubWorld(world_dir)
    # Through the peers: one clone, one datastore, one port group, one VM per protected VM.
    assert _effects(world, "recovery.clone", "cloned") == 1
    assert _effects(world, "recovery.datastore", "mounted") == 1
    assert _effects(world, "recovery.port_group", "created") == 1
    made = json.loads(world.read("run-vms", "00000000-0000-4000-a000-000000000002", test) or "{}")
    assert sorted(made) == sorted(vms) and _effects(world, "recovery.vm", "powered-on") == 3
    boots = {str(s["protected_vm_id"]): s["detail"]["boot_time"] for s in steps if s["name"] == "power_on"}
    readies = {str(s["protected_vm_id"]): s["detail"]["ready_at"] for s in steps if s["name"] == "wait_ready"}
    assert max(boots[vms[1]], boots[vms[2]]) > readies[vms[0]]  # priority 2 booted after priority 1 was ready
    assert run["report"]["vms"][0]["name"] == "rs-0-test-" + tag[-8:]

    assert len(_left_at_dr(world_dir, tag, test)) >= 5  # clone, export, hold, datastore, port group, VMs

    cleanup = _run(db, "cleanup", test)
    await drain(settings)
    ended = {str(r["id"]): r for r in db.sql("select * from recovery_runs where id in (%s, %s)", (test, cleanup))}
    assert ended[test]["status"] == "completed" and ended[test]["completed_at"]
    assert ended[cleanup]["status"] == "completed"
    assert db.value("select tested_at from recovery_points where id = %s", (run["recovery_point_id"],))
    assert _left_at_dr(world_dir, tag, test) == []
    assert _effects(world, "recovery.vm", "destroyed") == 3 and _effects(world, "recovery.clone", "destroyed") == 1
    assert _effects(world, "recovery.hold", "released") == 1


def _wait(check: Any, timeout: float, what: str, procs: list[Proc]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s\n" + "\n".join(p.output[-3000:] for p in procs))


@pytest.mark.parametrize("kill_after", [("recovery.clone", "cloned"), ("recovery.vm", "created"),
                                        ("recovery.vm", "powered-on")])
def test_a_listener_killed_mid_run_is_resumed_by_another_with_nothing_twice(
        seeded_db: Database, tmp_path: Path, kill_after: tuple[str, str]) -> None:
    db, world_dir = seeded_db, tmp_path / "world"
    vms = _group(db, "rk")
    common = {"ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": str(SWEEP)}
    victim = Proc(db.url, "run", env={**listener_env(world_dir, ZERFAUX_STUB_SECONDS="3", **common),
                                      "ZERFAUX_WORKER_ID": "victim"})
    rescuer: Proc | None = None
    procs = [victim]
    world = StubWorld(world_dir)
    try:
        victim.wait_for_line("listening as")
        _wait(lambda: db.value("select count(*) from replication_jobs where status = 'completed'"), 60,
              "the replication did not complete", procs)
        test = _run(db)
        _wait(lambda: _effects(world, *kill_after) >= 1, 90, f"no {kill_after} in the world", procs)
        victim.kill()
        rescuer = Proc(db.url, "run", env={**listener_env(world_dir, ZERFAUX_STUB_SECONDS="0.1", **common),
                                           "ZERFAUX_WORKER_ID": "rescuer"})
        procs.append(rescuer)
        rescuer.wait_for_line("listening as")
        _wait(lambda: db.value("select status from recovery_runs where id = %s", (test,)) in ("active", "failed"),
              90, "the run did not end", procs)
        run = db.one("select * from recovery_runs where id = %s", (test,))
        assert run["status"] == "active", run["error"]
        op = db.one("select * from zerfaux.operations where kind = 'recovery.run' and subject_id = %s", (test,))
        assert (op["status"], op["attempts"], op["worker_id"]) == ("succeeded", 2, "rescuer")
        assert _effects(world, "recovery.clone", "cloned") == 1
        assert _effects(world, "recovery.vm", "created") == 3 and _effects(world, "recovery.vm", "powered-on") == 3
        assert _effects(world, "recovery.datastore", "mounted") == 1
        assert _effects(world, "recovery.port_group", "created") == 1
        made = json.loads(world.read("run-vms", "00000000-0000-4000-a000-000000000002", test) or "{}")
        assert sorted(made) == sorted(vms)
        assert db.value("select count(*) from recovery_run_steps where run_id = %s and status <> 'done'",
                        (test,)) == 0
        resumed = db.value("select count(*) from recovery_run_steps where run_id = %s"
                           " and detail ? 'previous_attempts'", (test,))
        assert resumed >= 1  # the step the victim was in was started again

        cleanup = _run(db, "cleanup", test)
        _wait(lambda: db.value("select status from recovery_runs where id = %s", (cleanup,)) in ("completed", "failed"),
              60, "the cleanup did not end", procs)
        assert db.value("select status from recovery_runs where id = %s", (cleanup,)) == "completed"
        assert _left_at_dr(world_dir, run_tag(test), test) == []
    finally:
        victim.stop()
        if rescuer is not None:
            assert rescuer.stop() == 0, rescuer.output[-3000:]


async def test_a_cancelled_test_removes_what_it_made_and_ends_cancelled(seeded_db: Database, tmp_path: Path) -> None:
    import asyncio

    from tests.support.engine import running

    db, world_dir = seeded_db, tmp_path / "world"
    _group(db, "rc")
    await drain(engine_settings(db.url, ZERFAUX_STUB_WORLD=str(world_dir), ZERFAUX_STUB_SECONDS="0"))
    settings = engine_settings(db.url, ZERFAUX_STUB_WORLD=str(world_dir), ZERFAUX_STUB_SECONDS="1")
    test = _run(db)
    async with running(settings):
        deadline = time.monotonic() + 60
        while not db.value("select count(*) from recovery_run_steps where run_id = %s and name = 'create_vm'"
                           " and status = 'running'", (test,)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        db.sql("update recovery_runs set cancel_requested = true where id = %s", (test,))
        while db.value("select status from recovery_runs where id = %s", (test,)) == "running":
            assert time.monotonic() < deadline + 60
            await asyncio.sleep(0.1)
    run = db.one("select * from recovery_runs where id = %s", (test,))
    assert run["status"] == "cancelled", run["error"]
    names = [r["name"] for r in db.sql("select name from recovery_run_steps where run_id = %s order by seq", (test,))]
    assert names[16:] == ["destroy_vm"] * 3 + ["remove_datastore", "remove_port_group", "unexport_clone",
                                               "destroy_clone", "release_hold"]
    assert db.value("select count(*) from recovery_run_steps where run_id = %s and status in ('pending', 'running')",
                    (test,)) == 0
    world = StubWorld(world_dir)
    assert _effects(world, "recovery.clone", "destroyed") == 1
    assert _left_at_dr(world_dir, run_tag(test), test) == []


def test_a_test_cancelled_while_its_listener_was_dead_is_cleaned_up_by_the_next(seeded_db: Database,
                                                                                tmp_path: Path) -> None:
    """The cancel lands on an operation whose worker was SIGKILLed after it made the test's VMs:
    the next listener runs the handler with the cancel already signalled, and it cleans up."""
    db, world_dir = seeded_db, tmp_path / "world"
    _group(db, "rd")
    common = {"ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": str(SWEEP)}
    victim = Proc(db.url, "run", env={**listener_env(world_dir, ZERFAUX_STUB_SECONDS="3", **common),
                                      "ZERFAUX_WORKER_ID": "victim"})
    procs, world, rescuer = [victim], StubWorld(world_dir), None
    try:
        victim.wait_for_line("listening as")
        _wait(lambda: db.value("select count(*) from replication_jobs where status = 'completed'"), 60,
              "the replication did not complete", procs)
        test = _run(db)
        _wait(lambda: _effects(world, "recovery.vm", "created") >= 1, 90, "no test VM made", procs)
        victim.kill()
        db.sql("update recovery_runs set cancel_requested = true where id = %s", (test,))
        rescuer = Proc(db.url, "run", env={**listener_env(world_dir, ZERFAUX_STUB_SECONDS="0.1", **common),
                                           "ZERFAUX_WORKER_ID": "rescuer"})
        procs.append(rescuer)
        _wait(lambda: db.value("select status from recovery_runs where id = %s", (test,)) != "running", 90,
              "the run did not end", procs)
        assert db.value("select status from recovery_runs where id = %s", (test,)) == "cancelled"
        assert _effects(world, "recovery.vm", "destroyed") >= 1
        assert _left_at_dr(world_dir, run_tag(test), test) == []
    finally:
        victim.stop()
        if rescuer is not None:
            assert rescuer.stop() == 0, rescuer.output[-3000:]
