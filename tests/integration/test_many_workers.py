"""Four `zerfaux run` processes on one database, 2,000 operations of every kind arriving while
they run, stub durations random (0-50 ms): every effect happens exactly once, counted in the
stub world's journal, and every row converges. Figures: docs/reliability.md."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.pg import Database
from tests.support.workload import Asked, Proc, ask_mix, audit, dump, listener_env, prepare, wait_converged

LISTENERS = 4
# 2,000 operations: per batch 5 syncs, 15 replications, 15 storage vMotions, 15 DR shells.
BATCHES = 40
MIX = {"syncs": 5, "jobs": 15, "moves": 15, "shells": 15}


def test_four_listeners_do_each_of_2000_operations_exactly_once(seeded_db: Database, tmp_path: Path) -> None:
    url = seeded_db.url
    prepare(url, max_concurrent=8)
    world = tmp_path / "world"
    env = listener_env(world, ZERFAUX_STUB_SECONDS="0", ZERFAUX_STUB_SECONDS_JITTER="0.05",
                       ZERFAUX_CONCURRENCY="8")
    procs = [Proc(url, "run", env={**env, "ZERFAUX_WORKER_ID": f"load-{i}"}) for i in range(LISTENERS)]
    asked = Asked()
    try:
        for proc in procs:
            proc.wait_for_line("listening as")
        start = time.monotonic()
        for batch in range(BATCHES):  # work keeps arriving while the listeners claim
            ask_mix(url, asked, tag=f"b{batch}", **MIX)
            time.sleep(0.05)
        assert asked.total == 2000
        wait_converged(url, asked, timeout=300, procs=procs)
        elapsed = time.monotonic() - start
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0] * LISTENERS, [p.output[-3000:] for p in procs]

    result = audit(url, world, asked)
    workers = seeded_db.sql("select worker_id, count(*) as n from zerfaux.operations group by worker_id")
    dump(Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "many_workers.json",
         {**result.figures(), "seconds": round(elapsed, 1), "per_worker": {w["worker_id"]: w["n"] for w in workers}})
    assert result.problems == []
    assert result.lost == 0 and result.duplicated == 0
    assert result.by_status == {"succeeded": 2000}
    assert len(workers) == LISTENERS  # every process took a share
