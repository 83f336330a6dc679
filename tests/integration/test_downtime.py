"""Downtime: no listener runs while 500 operations are asked for (rows inserted, flags flipped,
syncs requested); one `zerfaux run --until-idle` started afterwards converges all of them, each
effect exactly once. Nothing depends on a wake-up that was sent while nobody listened."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.pg import Database
from tests.support.workload import (
    PROTECTION_DS, Asked, Proc, add_vcenters, add_vms, audit, dump, listener_env, pending, prepare, protect,
    request_replications, request_syncs,
)


def test_work_asked_while_no_listener_runs_converges_when_one_starts(seeded_db: Database, tmp_path: Path) -> None:
    db, url, world = seeded_db, seeded_db.url, tmp_path / "world"
    prepare(url)
    asked = Asked()
    # As a frontend would over a day: some rows inserted with the flag up, others flipped later.
    asked.syncs.update(add_vcenters(url, 50, prefix="down"))
    request_syncs(url, asked.syncs)
    asked.jobs.update(request_replications(url, 150))
    moves = protect(url, add_vms(url, 150, "nfs-01", "down-mv"))
    shells = protect(url, add_vms(url, 150, PROTECTION_DS, "down-sh"))
    db.sql("update protected_vms set needs_storage_vmotion = true where id = any(%s::uuid[])", (moves,))
    db.sql("update protected_vms set needs_dr_shell = true where id = any(%s::uuid[])", (shells,))
    asked.moves.update(moves)
    asked.shells.update(shells)
    assert asked.total == 500
    assert db.value("select count(*) from zerfaux.operations where status = 'queued'") == 500

    start = time.monotonic()
    proc = Proc(url, "run", "--until-idle", env=listener_env(world, ZERFAUX_STUB_SECONDS="0",
                                                           ZERFAUX_STUB_SECONDS_JITTER="0.05"))
    code = proc.wait(240)
    elapsed = time.monotonic() - start
    assert code == 0, proc.output[-3000:]
    assert not any(pending(url).values()), pending(url)
    result = audit(url, world, asked)
    dump(Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "downtime.json",
         {**result.figures(), "seconds_to_converge": round(elapsed, 1)})
    assert result.problems == [] and result.lost == 0 and result.duplicated == 0
    assert result.by_status == {"succeeded": 500}

