"""zerfaux.schedule_due() on real Postgres: who is due, when, and exactly once (docs/rpo.md).

Time is controlled, never slept: the function takes ``p_now``, and the history it counts from
(recovery points, jobs' start and end) is backdated.
"""

from __future__ import annotations

import collections
import threading
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.integration.conftest import GROUP, add_groups
from tests.support.pg import Database


def schedule(db: Database, now: datetime | None = None) -> dict[str, Any]:
    if now is None:
        return db.one("select inserted, next_due_at from zerfaux.schedule_due()")
    return db.one("select inserted, next_due_at from zerfaux.schedule_due(%s)", (now,))


def scheduled_groups(db: Database, n: int, rpo: int = 10, interval: float | None = None) -> list[str]:
    groups = add_groups(db, n)
    db.sql("update protection_groups set rpo_minutes = %s, replication_interval_minutes = %s"
           " where id = any(%s::uuid[])", (rpo, interval, groups))
    return groups


def replicated(db: Database, groups: list[str], ago: timedelta) -> None:
    """A completed job and its recovery point, ``ago`` before now, in each group."""
    ids = [r["id"] for r in db.sql("insert into replication_jobs (protection_group_id)"
                                   " select unnest(%s::uuid[]) returning id", (groups,))]
    db.sql("""update replication_jobs set status = 'completed', started_at = now() - %(ago)s,
                     completed_at = now() - %(ago)s + interval '5 seconds', created_at = now() - %(ago)s
               where id = any(%(ids)s::uuid[])""", {"ids": ids, "ago": ago})
    db.sql("""insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)
              select g, 'zerfaux_' || g, gen_random_uuid()::text, now() - %(ago)s, now() - %(ago)s
                from unnest(%(g)s::uuid[]) g""", {"g": groups, "ago": ago})


def jobs(db: Database, group: str | None = None) -> list[dict[str, Any]]:
    if group is None:
        return db.sql("select protection_group_id::text as g, origin, status from replication_jobs"
                      " where status in ('pending', 'running')")
    return db.sql("select origin, status from replication_jobs where protection_group_id = %s"
                  " order by created_at", (group,))


def test_four_listeners_at_once_give_each_due_group_exactly_one_job(seeded_db: Database) -> None:
    db = seeded_db
    due = scheduled_groups(db, 250)
    replicated(db, due, timedelta(minutes=30))           # 10-minute RPO, 5-minute interval: due
    fresh = scheduled_groups(db, 250)
    replicated(db, fresh, timedelta(seconds=10))         # not due for about 5 minutes
    barrier = threading.Barrier(4)
    inserted: list[int] = []
    errors: list[BaseException] = []

    def listener() -> None:
        try:
            with psycopg.connect(db.url, autocommit=True) as conn:
                barrier.wait()
                for _ in range(10):
                    row = conn.execute("select inserted from zerfaux.schedule_due()").fetchone()
                    assert row is not None
                    inserted.append(int(row[0]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=listener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(inserted) == 250
    active = jobs(db)
    assert sorted(j["g"] for j in active) == sorted(due)
    assert {j["origin"] for j in active} == {"schedule"}
    # and each of them is queued for a listener, once
    ops = db.sql("select subject_id from zerfaux.operations o join replication_jobs j on j.id = o.subject_id"
                 " where o.kind = 'replication.run' and j.origin = 'schedule'")
    assert len(ops) == len({r["subject_id"] for r in ops}) == 250


def test_after_downtime_a_group_gets_one_catch_up_job(seeded_db: Database) -> None:
    db = seeded_db
    [group] = scheduled_groups(db, 1, rpo=10)
    replicated(db, [group], timedelta(hours=6))          # 72 intervals missed
    assert schedule(db)["inserted"] == 1
    later = db.value("select now() + interval '1 hour'")
    assert schedule(db, later)["inserted"] == 0          # the catch-up still runs: nothing more
    assert jobs(db, group)[-1] == {"origin": "schedule", "status": "pending"}
    assert len(jobs(db, group)) == 2


def test_not_due_before_its_interval_and_offset_then_due(seeded_db: Database) -> None:
    db = seeded_db
    [group] = scheduled_groups(db, 1, rpo=60, interval=20)
    replicated(db, [group], timedelta(minutes=1))
    first = schedule(db)
    assert first["inserted"] == 0
    last = db.value("select max(created_at) from recovery_points where protection_group_id = %s", (group,))
    due = db.value("select next_replication_at from protection_groups where id = %s", (group,))
    assert timedelta(minutes=20) <= due - last < timedelta(minutes=22)  # offset: under a tenth
    assert first["next_due_at"] == due
    assert schedule(db, due - timedelta(seconds=1))["inserted"] == 0
    assert schedule(db, due)["inserted"] == 1


def test_the_default_interval_is_half_the_rpo_and_never_below_six_seconds(seeded_db: Database) -> None:
    assert seeded_db.value("select zerfaux.replication_interval(null, 30)") == timedelta(minutes=15)
    assert seeded_db.value("select zerfaux.replication_interval(null, 0)") == timedelta(seconds=6)
    assert seeded_db.value("select zerfaux.replication_interval(0.25, 30)") == timedelta(seconds=15)


def test_groups_sharing_an_interval_are_spread_over_a_tenth_of_it(seeded_db: Database) -> None:
    db = seeded_db
    groups = scheduled_groups(db, 200, rpo=20)
    replicated(db, groups, timedelta(minutes=1))
    schedule(db)
    offsets = [r["s"] for r in db.sql(
        "select extract(epoch from g.next_replication_at - p.created_at) - 600 as s"
        "  from protection_groups g join recovery_points p on p.protection_group_id = g.id"
        " where g.id = any(%s::uuid[])", (groups,))]
    assert len(offsets) == 200
    assert min(offsets) >= 0 and max(offsets) < 60
    # evenly: 200 groups over 60 s put at most 4 in any second (without offsets: all 200 in one)
    per_second = collections.Counter(int(o) for o in offsets)
    assert len(per_second) >= 55 and max(per_second.values()) <= 4
    again = [r["n"] for r in db.sql("select next_replication_at as n from protection_groups"
                                    " where id = any(%s::uuid[]) order by id", (groups,))]
    schedule(db)
    assert again == [r["n"] for r in db.sql("select next_replication_at as n from protection_groups"
                                            " where id = any(%s::uuid[]) order by id", (groups,))]


def test_a_never_replicated_group_is_due_at_once(seeded_db: Database) -> None:
    db = seeded_db
    [group] = scheduled_groups(db, 1)
    assert schedule(db)["inserted"] == 1
    assert jobs(db, group) == [{"origin": "schedule", "status": "pending"}]


@pytest.mark.parametrize("change", [
    "paused = true", "state = 'recovering'", "state = 'awaiting_commit'", "state = 'failed_over'", "rpo_minutes = null", "source_dataset = null",
    "replication_target_id = null"])
def test_a_group_not_scheduled_gets_no_job_and_no_next_time(seeded_db: Database, change: str) -> None:
    db = seeded_db
    [group] = scheduled_groups(db, 1)
    replicated(db, [group], timedelta(hours=1))
    schedule(db)
    db.sql("update replication_jobs set status = 'cancelled', completed_at = now() - interval '1 hour'"
           " where protection_group_id = %s and status = 'pending'", (group,))
    db.sql(f"update protection_groups set {change} where id = %s", (group,))
    assert schedule(db)["inserted"] == 0
    assert db.value("select next_replication_at from protection_groups where id = %s", (group,)) is None
    assert schedule(db, db.value("select now() + interval '1 day'"))["inserted"] == 0


def test_the_seed_group_is_paused_until_someone_resumes_it(seeded_db: Database) -> None:
    assert schedule(seeded_db)["inserted"] == 0
    seeded_db.sql("update protection_groups set paused = false where id = %s", (GROUP,))
    assert schedule(seeded_db)["inserted"] == 1


def test_after_a_failed_job_the_next_one_waits_an_interval_from_its_end(seeded_db: Database) -> None:
    db = seeded_db
    [group] = scheduled_groups(db, 1, rpo=10)
    replicated(db, [group], timedelta(hours=1))
    assert schedule(db)["inserted"] == 1
    db.sql("update replication_jobs set status = 'failed', error = 'target unreachable',"
           " completed_at = now() - interval '1 minute' where protection_group_id = %s and status = 'pending'",
           (group,))
    assert schedule(db)["inserted"] == 0                 # the point is an hour old, but it just failed
    ended = db.value("select completed_at from replication_jobs where status = 'failed'")
    due = db.value("select next_replication_at from protection_groups where id = %s", (group,))
    assert timedelta(minutes=5) <= due - ended < timedelta(minutes=5, seconds=30)
    assert schedule(db, due)["inserted"] == 1


def test_a_job_asked_for_by_hand_is_not_doubled_and_is_still_refused_politely(seeded_db: Database) -> None:
    db = seeded_db
    [group] = scheduled_groups(db, 1)
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (group,))
    assert schedule(db)["inserted"] == 0
    assert jobs(db, group) == [{"origin": "request", "status": "pending"}]
    with pytest.raises(psycopg.errors.UniqueViolation, match="already has a pending replication job"):
        db.sql("insert into replication_jobs (protection_group_id) values (%s)", (group,))


def test_only_service_role_runs_the_schedule(seeded_db: Database) -> None:
    for role in ("anon", "authenticated"):
        with psycopg.connect(seeded_db.url, autocommit=True) as conn:
            conn.execute(f"set role {role}")  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select zerfaux.schedule_due()")
