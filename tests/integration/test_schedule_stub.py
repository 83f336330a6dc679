"""The schedule end to end in stub mode: a listener (in-process, both stores) replicates a group
with a short interval by itself, each job incremental from the one before."""

from __future__ import annotations

from datetime import timedelta

from tests.integration.conftest import GROUP
from tests.support.engine import engine_settings, eventually, running
from tests.support.pg import Database


async def test_a_group_with_a_six_second_interval_replicates_by_itself(
        world: Database, store_env: dict[str, str]) -> None:
    world.sql("update protection_groups set paused = false, rpo_minutes = 1, replication_interval_minutes = 0.1"
              " where id = %s", (GROUP,))
    done = "select count(*) from replication_jobs where origin = 'schedule' and status = 'completed'"
    # The default sweep interval (5 s): the sweep also wakes when the schedule says a group is due.
    settings = engine_settings(world.url, ZERFAUX_STUB_SECONDS="0.2", ZERFAUX_SWEEP_SECONDS="5", **store_env)
    async with running(settings):
        await eventually(lambda: world.value(done) >= 3, timeout=50, interval=0.25)
    jobs = world.sql("select * from replication_jobs where origin = 'schedule' and status = 'completed'"
                     " order by created_at")
    assert world.value("select count(*) from replication_jobs where origin <> 'schedule'") == 0
    assert len({j["snapshot_name"] for j in jobs}) == len(jobs) >= 3
    for before, after in zip(jobs, jobs[1:]):
        assert after["base_snapshot"] == before["snapshot_name"]   # incremental, in order
        # queued no sooner than an interval after the previous one started
        assert after["created_at"] - before["started_at"] >= timedelta(seconds=6)
    due = world.value("select next_replication_at from protection_groups where id = %s", (GROUP,))
    # the last pass's answer: when the last job (or the one after it) was due
    assert due is not None and due >= jobs[-2]["started_at"] + timedelta(seconds=6)
