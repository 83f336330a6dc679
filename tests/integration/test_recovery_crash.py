"""A test failover survives SIGKILL at each step, a cancel cleans up, and refusals start nothing (issue 13).

Real peers: the world of tests/integration/recovery_world.py (two vcsim, zfs-fuse pools behind
sshd, four protected VMs replicated to a recovery point), built once for this module: every case
runs a test failover from the same point and cleans it up, so the next one starts clean (and the
checks that nothing leaked are the start of the next case too).

- SIGKILL: a ``zerfaux run`` subprocess (the victim) runs the test; when ``recovery_run_steps``
  shows step <name> 'running' (the DR simulator answers every call after a delay, so the kill
  lands inside the step's effect), the victim is killed; a rescuer listener takes the operation
  over once the lease expires and finishes it. Checked at the peers: exactly one clone, one test
  VM per protected VM, the run 'active'; after the cleanup run nothing is left.
- Cancel: ``cancel_requested`` while the test runs: its cleanup steps run and it ends 'cancelled'.
- Refusals with nothing started: an unmapped network, a second test, a cleanup of a run that is
  not active, a viewer asking: no operation row, no clone, no VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from handlers.recovery.backends import run_tag
from tests.integration.conftest import GROUP
from tests.integration.recovery_world import (  # noqa: F401 - recovery_world is a fixture
    APP_NETWORK, LAB_NETWORK, RecoveryWorld, recovery_world,
)
from tests.support.engine import engine_settings, running
from tests.support.workload import Proc

pytestmark = [pytest.mark.zfs, pytest.mark.vcsim]

LEASE, SWEEP = 2.0, 0.5
DELAY_MS = 30  # per SOAP call at the DR simulator while the victim works: a vCenter step spans several
KILL_AFTER = 0.045  # after a vCenter step shows 'running': its first call is in flight then
ZFS_STEPS = {"hold_snapshot", "clone_snapshot", "export_clone"}  # a few ms over SSH: kill at once
KILL_AT = ["validate", "hold_snapshot", "clone_snapshot", "export_clone", "present_datastore",
           "create_port_group", "create_vm", "power_on", "wait_ready", "activate"]
NOTHING = {"vms": [], "port_group": [], "clone": [], "hold": []}


def _until(check: Callable[[], Any], timeout: float, what: str, procs: Sequence[Proc] = (),
           interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    tails = "\n---\n".join(p.output[-3000:] for p in procs)
    raise AssertionError(f"{what}: not within {timeout}s\n{tails}")


def _run(w: RecoveryWorld, run_id: str) -> dict[str, Any]:
    return w.db.one("select * from recovery_runs where id = %s", (run_id,))


def _steps(w: RecoveryWorld, run_id: str) -> list[dict[str, Any]]:
    return w.db.sql("select seq, name, status, error, detail from recovery_run_steps where run_id = %s order by seq",
                    (run_id,))


def _start_test(w: RecoveryWorld) -> str:
    return str(w.db.value("insert into recovery_runs (protection_group_id, kind, recovery_point_id)"
                          " values (%s, 'test', %s) returning id", (GROUP, w.point_id)))


def _start_cleanup(w: RecoveryWorld, test_id: str) -> str:
    return str(w.db.value("insert into recovery_runs (protection_group_id, kind, test_run_id)"
                          " values (%s, 'cleanup', %s) returning id", (GROUP, test_id)))


def _one_of_each(w: RecoveryWorld, run_id: str) -> None:
    """At the peers: one clone of the run, one test VM per protected VM, nothing of another run."""
    hex8 = run_tag(run_id)[-8:]
    clones = [d for d in w.zfs_datasets() if "/zerfaux-test-" in d]
    assert clones == [f"{w.target_root}/{run_tag(run_id)}"], clones
    names = sorted(vm.name for vm in w.test_vms())
    assert names == sorted(f"{v.plan.name}-test-{hex8}" for v in w.vms), names
    tag = run_tag(run_id)
    assert [ds.name for ds in w.datastores_named(tag)] == [tag]
    assert [n.name for n in w.networks_named(tag)] == [tag]
    for vm in w.test_vms(run_id):
        assert [ds.name for ds in vm.datastore] == [tag], (vm.name, [ds.name for ds in vm.datastore])


def _figures(figures: dict[str, Any]) -> None:
    out = Path(os.environ.get("ZERFAUX_FIGURES_DIR", tempfile.gettempdir())) / "recovery_crash.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps(figures, default=str) + "\n")


@pytest.fixture
def env(recovery_world: RecoveryWorld) -> Iterator[dict[str, str]]:
    w = recovery_world
    assert [d for d in w.zfs_datasets() if "/zerfaux-test-" in d] == [], "a previous case leaked a clone"
    assert w.test_vms() == [], "a previous case leaked a test VM"
    yield {**w.env, "ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": str(SWEEP)}
    w.dr_sim.set_delay(0)


@pytest.mark.parametrize("step", KILL_AT)
def test_sigkill_at_each_step_then_another_listener_finishes_and_cleanup_leaves_nothing(
    recovery_world: RecoveryWorld, env: dict[str, str], step: str
) -> None:
    w = recovery_world
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    victim = Proc(w.db.url, "run", env={**env, "ZERFAUX_WORKER_ID": "victim"})
    procs, rescuer = [victim], None
    try:
        with w.harness():
            victim.wait_for_line("listening as")
            marks["listening"] = time.monotonic() - t0
            w.dr_sim.set_delay(DELAY_MS)
            run_id = _start_test(w)
            # The first step of that name going 'running' (or past it already: then the kill lands later).
            seen = _until(lambda: w.db.sql(
                "select name, status from recovery_run_steps where run_id = %s and seq >="
                " (select min(seq) from recovery_run_steps where run_id = %s and name = %s)"
                " and status <> 'pending' order by seq limit 1", (run_id, run_id, step)),
                90, f"step {step} starts", procs, interval=0.01)
            if step not in ZFS_STEPS:
                time.sleep(KILL_AFTER)
            marks["seen"] = time.monotonic() - t0
            victim.kill()
            w.dr_sim.set_delay(0)
            killed = {"step": seen[0]["name"], "status": seen[0]["status"]}
            op = w.db.one("select status, worker_id from zerfaux.operations where kind = 'recovery.run'"
                          " and subject_id::text = %s", (run_id,))
            killed["before_active"] = _run(w, run_id)["status"] != "active"
            if killed["before_active"]:
                assert (op["status"], op["worker_id"]) == ("running", "victim"), (op, killed)
            rescuer = Proc(w.db.url, "run", env={**env, "ZERFAUX_WORKER_ID": "rescuer"})
            procs.append(rescuer)
            _until(lambda: _run(w, run_id)["status"] in ("active", "failed"), LEASE + SWEEP + 120,
                   "the rescuer finishes the test", procs, interval=0.1)
            marks["active"] = time.monotonic() - t0
        run = _run(w, run_id)
        steps = _steps(w, run_id)
        assert run["status"] == "active", (killed, run["error"], steps)
        assert not [s for s in steps if s["status"] in ("running", "pending", "failed")], (killed, steps)
        _one_of_each(w, run_id)
        assert w.userrefs() == 1, "the point's snapshot is not held exactly once"
        op = w.db.one("select status, attempts, worker_id from zerfaux.operations where kind = 'recovery.run'"
                      " and subject_id::text = %s", (run_id,))
        if killed["before_active"]:
            # The rescuer resumed the victim's attempt: a second attempt, not a second run.
            assert (op["status"], op["attempts"], op["worker_id"]) == ("succeeded", 2, "rescuer"), (op, killed)
            resumed = [s for s in steps if (s["detail"] or {}).get("previous_attempts")]
            killed["resumed_steps"] = [s["name"] for s in resumed]

        cleanup_id = _start_cleanup(w, run_id)
        _until(lambda: _run(w, cleanup_id)["status"] in ("completed", "failed"), 120, "the cleanup ends", procs,
               interval=0.1)
        assert _run(w, cleanup_id)["status"] == "completed", (_run(w, cleanup_id)["error"], _steps(w, cleanup_id))
        marks["cleaned"] = time.monotonic() - t0
        assert w.leftovers(run_id) == NOTHING, killed
        assert _run(w, run_id)["status"] == "completed"
    finally:
        victim.stop()
        code = rescuer.stop() if rescuer is not None else 0
    assert code == 0, rescuer.output[-3000:] if rescuer else ""
    _figures({"step": step, "killed": killed, **{k: round(v, 2) for k, v in marks.items()}})


async def test_a_cancelled_test_runs_its_cleanup_and_ends_cancelled_with_nothing_left(
    recovery_world: RecoveryWorld, env: dict[str, str]
) -> None:
    w = recovery_world
    with w.harness():
        async with running(engine_settings(w.db.url, **env)):
            w.dr_sim.set_delay(DELAY_MS)
            run_id = _start_test(w)
            deadline = time.monotonic() + 90
            while not w.db.sql("select 1 from recovery_run_steps where run_id = %s and name = 'create_vm'"
                               " and status <> 'pending'", (run_id,)):
                assert time.monotonic() < deadline, _steps(w, run_id)
                await asyncio.sleep(0.02)
            w.db.sql("update recovery_runs set cancel_requested = true where id = %s", (run_id,))
            w.dr_sim.set_delay(0)
            deadline = time.monotonic() + 120
            while _run(w, run_id)["status"] not in ("cancelled", "failed", "active", "completed"):
                assert time.monotonic() < deadline, _steps(w, run_id)
                await asyncio.sleep(0.1)
    run, steps = _run(w, run_id), _steps(w, run_id)
    assert run["status"] == "cancelled", (run["error"], steps)
    assert run["completed_at"] is not None
    names = [s["name"] for s in steps]
    for name in ("destroy_clone", "release_hold", "unexport_clone", "remove_port_group"):
        assert name in names, names
    assert "activate" not in [s["name"] for s in steps if s["status"] == "done"]
    assert w.leftovers(run_id) == NOTHING
    assert w.test_vms() == []


def _nothing_started(w: RecoveryWorld, ops_before: int) -> None:
    assert w.db.value("select count(*) from zerfaux.operations where kind = 'recovery.run'") == ops_before
    assert [d for d in w.zfs_datasets() if "/zerfaux-test-" in d] == []
    assert w.test_vms() == []
    assert w.userrefs() == 0


def test_refusals_start_nothing(recovery_world: RecoveryWorld, env: dict[str, str]) -> None:
    w, db = recovery_world, recovery_world.db
    ops = db.value("select count(*) from zerfaux.operations where kind = 'recovery.run'")

    # An unmapped network: refused at the insert, naming the network and its VM.
    db.sql("delete from network_mappings where protection_group_id = %s and source_network = %s", (GROUP, APP_NETWORK))
    try:
        with pytest.raises(psycopg.Error, match=APP_NETWORK) as refused:
            _start_test(w)
        assert "db-1" in str(refused.value)
    finally:
        db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network, test_network)"
               " values (%s, %s, %s, %s)", (GROUP, APP_NETWORK, LAB_NETWORK, LAB_NETWORK))
    _nothing_started(w, ops)

    # A viewer of the group asks for a test: refused by the database.
    viewer = "00000000-0000-4000-8000-0000000000e1"
    db.sql("insert into zerfaux.operators (user_id, role, protection_group_id) values (%s, 'viewer', %s)"
           " on conflict do nothing", (viewer, GROUP))
    with psycopg.connect(db.url) as conn:
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"role": "authenticated", "sub": viewer}),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("insert into recovery_runs (protection_group_id, kind) values (%s, 'test')", (GROUP,))
    _nothing_started(w, ops)

    # A second test while one is pending: refused naming the rule; the first, cancelled while pending, never starts.
    first = _start_test(w)
    with pytest.raises(psycopg.Error, match="recovery_runs_one_active_test_per_group"):
        _start_test(w)
    assert db.value("select count(*) from zerfaux.operations where kind = 'recovery.run'") == ops + 1
    db.sql("update recovery_runs set cancel_requested = true where id = %s", (first,))
    assert _run(w, first)["status"] == "cancelled"
    asyncio.run(w.drain(timeout=60))
    assert _run(w, first)["status"] == "cancelled"
    assert [d for d in w.zfs_datasets() if "/zerfaux-test-" in d] == [] and w.test_vms() == [] and w.userrefs() == 0

    # A cleanup of a run that is not an active test (that cancelled one; a run that does not exist).
    with pytest.raises(psycopg.Error, match="recovery_runs_cleanup_of_an_active_test"):
        _start_cleanup(w, first)
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="test_run_id"):
        _start_cleanup(w, "00000000-0000-4000-9000-000000000000")
    assert db.value("select count(*) from recovery_runs where kind = 'cleanup' and test_run_id = %s", (first,)) == 0
    _nothing_started(w, ops + 1)  # the first test's operation only, which ended without an effect
