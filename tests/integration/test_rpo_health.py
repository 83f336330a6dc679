"""RPO transitions on real Postgres: rpo_events follows protection_status, with the reason.

Time moves by backdating the newest recovery point (what protection_status reads with now())
or by passing ``p_now`` to zerfaux.record_rpo_transitions(); nothing sleeps.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import psycopg

from tests.integration.conftest import add_groups
from tests.support.pg import Database


def group_with_rpo(db: Database, rpo: int = 10) -> str:
    [group] = add_groups(db, 1)
    db.sql("update protection_groups set rpo_minutes = %s where id = %s", (rpo, group))
    return group


def point(db: Database, group: str, ago: timedelta) -> None:
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
           " values (%s, 'zerfaux_' || gen_random_uuid(), gen_random_uuid()::text, now() - %s)", (group, ago))


def age_points(db: Database, group: str, by: timedelta) -> None:
    db.sql("update recovery_points set created_at = created_at - %s where protection_group_id = %s", (by, group))


def record(db: Database) -> int:
    return int(db.value("select zerfaux.record_rpo_transitions()"))


def events(db: Database, group: str) -> list[dict[str, Any]]:
    return db.sql("select old_status, new_status, reason, rpo_seconds from rpo_events"
                  " where protection_group_id = %s order by at, id", (group,))


def status(db: Database, group: str) -> str:
    return str(db.value("select rpo_status from protection_status where protection_group_id = %s", (group,)))


def alive(db: Database) -> None:
    db.sql("insert into zerfaux.workers (worker_id) values ('rpo-test') on conflict (worker_id)"
           " do update set last_seen_at = now()")


def test_a_failed_job_leaves_the_group_at_risk_then_violated_on_time(seeded_db: Database) -> None:
    db = seeded_db
    alive(db)
    group = group_with_rpo(db, rpo=10)
    point(db, group, timedelta(minutes=1))               # the new point records 'ok' by itself
    assert status(db, group) == "ok"
    assert [(e["new_status"], e["reason"]) for e in events(db, group)] == [("ok", "replicated")]
    job = db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (group,))
    db.sql("update replication_jobs set status = 'failed', error = 'cannot reach dr-zfs-01: connection refused',"
           " completed_at = now() where id = %s", (job,))
    assert record(db) == 0                               # failed, but the point is still fresh

    age_points(db, group, timedelta(minutes=6, seconds=35))  # past 7.5 minutes old: 75 % of the RPO
    assert status(db, group) == "at_risk"
    assert record(db) == 0                               # the point's update recorded it already
    age_points(db, group, timedelta(minutes=2, seconds=30))  # past 10 minutes old
    assert status(db, group) == "violated"
    record(db)
    got = events(db, group)
    assert [(e["old_status"], e["new_status"]) for e in got] == [
        (None, "ok"), ("ok", "at_risk"), ("at_risk", "violated")]
    assert [e["reason"] for e in got[1:]] == ["last job failed: cannot reach dr-zfs-01: connection refused"] * 2
    assert 450 <= got[1]["rpo_seconds"] < 460 and 600 <= got[2]["rpo_seconds"] < 610
    assert record(db) == 0                               # no change, no event

    point(db, group, timedelta(seconds=0))               # a replication lands: back to ok at once
    assert events(db, group)[-1]["new_status"] == "ok"
    assert events(db, group)[-1]["reason"] == "replicated"


def test_the_sweep_notices_a_group_falling_behind_with_nothing_running(seeded_db: Database) -> None:
    db = seeded_db
    alive(db)
    group = group_with_rpo(db, rpo=10)
    point(db, group, timedelta(minutes=1))
    soon = db.value("select now() + interval '7 minutes'")
    later = db.value("select now() + interval '10 minutes'")
    assert db.value("select zerfaux.record_rpo_transitions(%s)", (soon,)) == 1
    assert db.value("select zerfaux.record_rpo_transitions(%s, p_worker_seconds => 3600)", (later,)) == 1
    assert [(e["new_status"], e["reason"]) for e in events(db, group)] == [
        ("ok", "replicated"), ("at_risk", "listener down"), ("violated", "falling behind")]


def test_no_live_listener_is_the_reason_when_nothing_else_is(seeded_db: Database) -> None:
    db = seeded_db
    db.sql("update zerfaux.workers set last_seen_at = now() - interval '1 hour'")
    group = group_with_rpo(db, rpo=10)
    point(db, group, timedelta(minutes=11))
    assert events(db, group)[-1]["new_status"] == "violated"
    assert events(db, group)[-1]["reason"] == "listener down"


def test_paused_is_the_reason_for_a_paused_group(seeded_db: Database) -> None:
    db = seeded_db
    alive(db)
    group = group_with_rpo(db, rpo=10)
    db.sql("update protection_groups set paused = true where id = %s", (group,))
    point(db, group, timedelta(minutes=8))
    assert [(e["new_status"], e["reason"]) for e in events(db, group)] == [("at_risk", "paused")]


def test_unknown_has_its_reason_and_a_group_without_history_records_nothing(seeded_db: Database) -> None:
    db = seeded_db
    group = group_with_rpo(db, rpo=10)
    record(db)
    assert events(db, group) == []                       # unknown from the start: no change
    point(db, group, timedelta(minutes=1))
    db.sql("update recovery_points set on_target = false, removed_at = now() where protection_group_id = %s",
           (group,))
    assert [(e["new_status"], e["reason"]) for e in events(db, group)] == [
        ("ok", "replicated"), ("unknown", "no recovery point yet")]
    db.sql("update recovery_points set on_target = true where protection_group_id = %s", (group,))
    db.sql("update protection_groups set rpo_minutes = null where id = %s", (group,))
    record(db)
    assert events(db, group)[-1]["reason"] == "no rpo set"


def test_concurrent_sweeps_record_each_transition_once(seeded_db: Database) -> None:
    db = seeded_db
    alive(db)
    groups = add_groups(db, 200)
    db.sql("update protection_groups set rpo_minutes = 10 where id = any(%s::uuid[])", (groups,))
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
           " select g, 'zerfaux_' || g, g::text, now() - interval '1 minute' from unnest(%s::uuid[]) g", (groups,))
    db.sql("delete from rpo_events")
    db.sql("delete from zerfaux.rpo_state")  # as if nothing had been recorded yet
    barrier = threading.Barrier(4)
    recorded: list[int] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            with psycopg.connect(db.url, autocommit=True) as conn:
                for minutes in (0, 8, 8, 11, 11):
                    barrier.wait()  # every sweep at the same moment, moments in order
                    row = conn.execute("select zerfaux.record_rpo_transitions(now() + %s)",
                                       (timedelta(minutes=minutes),)).fetchone()
                    assert row is not None
                    recorded.append(int(row[0]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    counts = db.sql("select new_status, count(*) as n, count(distinct protection_group_id) as groups"
                    " from rpo_events where protection_group_id = any(%s::uuid[]) group by 1 order by 1", (groups,))
    assert counts == [{"new_status": s, "n": 200, "groups": 200} for s in ("at_risk", "ok", "violated")]
    assert sum(recorded) == 600
