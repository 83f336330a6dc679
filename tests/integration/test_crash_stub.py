"""SIGKILL a `zerfaux run` process in the middle of one operation of each kind (stub backends in
a shared stub world, 20 s stub durations, 2 s leases): another listener takes every operation
over once its lease expires and finishes it; no row stays 'running'; the DR shell the dead
worker had already created is adopted, not created twice; the replication reuses the dead
worker's snapshot. Figures: docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from handlers.backends.stub.world import StubWorld
from tests.support.pg import Database
from tests.support.workload import (
    PROTECTION_DS, Asked, Proc, add_vcenters, add_vms, ask_mix, audit, listener_env, prepare, protect,
    request_replications, request_syncs, wait_converged,
)

LEASE, SWEEP = 2.0, 0.5
RESCUER_STUB_SECONDS = 0.5


def _all_in_flight(db: Database, world: Path, asked: Asked) -> bool:
    """Every operation is running under the victim, past the point where it changed the world."""
    running = db.value("select count(*) from zerfaux.operations where status = 'running' and worker_id = 'victim'")
    journal = StubWorld(world).journal()
    shell_made = any(e["effect"] == "created" for e in journal)
    snapshot_made = any((world / "snapshots").glob("*"))
    return bool(running == 4 and shell_made and snapshot_made)


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_a_listener_killed_mid_operation_is_finished_by_another(seeded_db: Database, tmp_path: Path,
                                                                  round_: int) -> None:
    db, url, world = seeded_db, seeded_db.url, tmp_path / "world"
    prepare(url)
    common = {"ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": str(SWEEP)}
    victim = Proc(url, "run", env={**listener_env(world, ZERFAUX_STUB_SECONDS="20", **common),
                                   "ZERFAUX_WORKER_ID": "victim"})
    rescuer: Proc | None = None
    try:
        victim.wait_for_line("listening as")
        asked = Asked()
        asked.syncs.update(add_vcenters(url, 1, prefix="crash"))
        request_syncs(url, asked.syncs)
        asked.jobs.update(request_replications(url, 1))
        asked.moves.update(protect(url, add_vms(url, 1, "nfs-01", "crash-mv"), vmotion=True))
        asked.shells.update(protect(url, add_vms(url, 1, PROTECTION_DS, "crash-sh"), dr_shell=True))
        deadline = time.monotonic() + 60
        while not _all_in_flight(db, world, asked):
            assert time.monotonic() < deadline, victim.output[-3000:]
            time.sleep(0.1)

        rescuer = Proc(url, "run", env={**listener_env(world, ZERFAUX_STUB_SECONDS=str(RESCUER_STUB_SECONDS),
                                                       **common), "ZERFAUX_WORKER_ID": "rescuer"})
        rescuer.wait_for_line("listening as")
        killed_at = time.monotonic()
        victim.kill()
        # Lease expiry, one sweep, the rescuer's own stub time, and a wide margin for a busy machine.
        wait_converged(url, asked, timeout=LEASE + SWEEP + RESCUER_STUB_SECONDS + 60, procs=[rescuer])
        recovered = time.monotonic() - killed_at
    finally:
        victim.stop()
        code = rescuer.stop() if rescuer is not None else 0
    assert code == 0, rescuer.output[-3000:] if rescuer else ""

    ops = db.sql("select kind, status, attempts, worker_id from zerfaux.operations order by kind")
    assert [(o["status"], o["attempts"], o["worker_id"]) for o in ops] == [("succeeded", 2, "rescuer")] * 4
    result = audit(url, world, asked)
    assert result.problems == [] and result.lost == 0 and result.duplicated == 0
    assert result.effects[("vm.dr_shell", "created")] == 1 and result.effects[("vm.dr_shell", "adopted")] == 1
    assert result.effects[("replication.run", "sent")] == 1
    assert result.effects[("vm.storage_vmotion", "relocated")] == 1
    assert db.value("select count(*) from replication_jobs where status = 'running'") == 0
    (job,) = asked.jobs  # the rescuer sent the snapshot the victim had made, not a new one
    assert db.value("select snapshot_name from replication_jobs where id = %s", (job,)) == \
        StubWorld(world).read("snapshots", job)
    figures = Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "crash_stub.jsonl"
    with figures.open("a") as out:
        out.write(json.dumps({"round": round_, "recovered_seconds": round(recovered, 2), **result.figures()}) + "\n")


def test_listeners_killed_at_random_under_load_lose_and_repeat_nothing(seeded_db: Database, tmp_path: Path) -> None:
    """Three listeners; 12 times, while a batch of 50 operations is being worked on, one of them
    is SIGKILLed wherever it is (mid-operation, mid-claim, mid-completion) and a new one started. Every effect
    still happens exactly once; retries after a lost lease adopt what the dead worker did."""
    url, world = seeded_db.url, tmp_path / "world"
    prepare(url)
    env = listener_env(world, ZERFAUX_STUB_SECONDS="0.05", ZERFAUX_STUB_SECONDS_JITTER="0.3",
                       ZERFAUX_LEASE_SECONDS=str(LEASE), ZERFAUX_SWEEP_SECONDS=str(SWEEP))
    rng = random.Random(7)
    serial = iter(range(1000))
    procs = [Proc(url, "run", env={**env, "ZERFAUX_WORKER_ID": f"chaos-{next(serial)}"}) for _ in range(3)]
    asked, kills, killed_at = Asked(), 0, time.monotonic()
    try:
        for proc in procs:
            proc.wait_for_line("listening as")
        for batch in range(12):
            ask_mix(url, asked, tag=f"c{batch}", syncs=5, jobs=15, moves=15, shells=15)
            time.sleep(rng.uniform(0.2, 0.8))  # while the batch is being worked on
            i = rng.randrange(len(procs))
            procs[i].kill()
            killed_at = time.monotonic()
            kills += 1
            procs[i] = Proc(url, "run", env={**env, "ZERFAUX_WORKER_ID": f"chaos-{next(serial)}"})
            time.sleep(1.5)
        wait_converged(url, asked, timeout=180, procs=procs)
        recovered = time.monotonic() - killed_at
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0, 0, 0], [p.output[-3000:] for p in procs]
    result = audit(url, world, asked)
    figures = Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "chaos_stub.json"
    figures.write_text(json.dumps({"kills": kills, "converged_after_last_kill_seconds": round(recovered, 2),
                                   **result.figures()}, indent=2))
    assert result.problems == [] and result.lost == 0 and result.duplicated == 0
    assert result.by_status == {"succeeded": 600}
