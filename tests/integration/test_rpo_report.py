"""zerfaux.rpo_report on real Postgres: hand-made timelines with exact answers, and random ones
checked second by second against a plain reading of the definition (docs/rpo.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listener.service import make_store
from tests.support.engine import engine_settings
from tests.support.pg import Database

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def group(db: Database, name: str, rpo: int | None) -> str:
    return str(db.value("insert into protection_groups (name, rpo_minutes) values (%s, %s) returning id", (name, rpo)))


def point(db: Database, gid: str, created: float, replicated: float | None = None, removed: float | None = None,
          on_target: bool = True) -> None:
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at,"
           " removed_at, on_target) values (%s, %s, gen_random_uuid()::text, %s, %s, %s, %s)",
           (gid, f"zerfaux-{created}", at(created), None if replicated is None else at(replicated),
            None if removed is None else at(removed), on_target))


def event(db: Database, gid: str, minutes: float, reason: str, new_status: str = "ok") -> None:
    db.sql("insert into rpo_events (protection_group_id, at, new_status, reason) values (%s, %s, %s, %s)",
           (gid, at(minutes), new_status, reason))


def report(db: Database, start: float, end: float) -> dict[str, dict[str, Any]]:
    rows = db.sql("select * from zerfaux.rpo_report(%s, %s)", (at(start), at(end)))
    return {r["name"]: r for r in rows}


def numbers(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["observed_seconds"], row["within_seconds"], row["worst_rpo_seconds"], row["violations"],
            row["longest_violation_seconds"], row["paused_seconds"], row["unknown_seconds"])


def test_points_every_ten_minutes_with_a_thirty_minute_gap(db: Database) -> None:
    gid = group(db, "gap", 15)
    for m in (0, 10, 20, 30, 60, 70, 80, 90, 100, 110):
        point(db, gid, m)
    row = report(db, 0, 120)["gap"]
    # RPO climbs to 30 min at 60; at or past 15 min from 45 to 60: one violation of 15 min.
    assert numbers(row) == (7200, 6300, 1800, 1, 900, 0, 0)
    assert row["within_share"] == 0.875 and row["window_seconds"] == 7200


def test_late_arrival_a_removed_point_and_violations_at_both_edges(db: Database) -> None:
    gid = group(db, "edges", 15)
    point(db, gid, -50)                    # before the window: the RPO at 0 is already 50 min
    point(db, gid, 10, replicated=14)      # recoverable from 14, not from 10
    point(db, gid, 20, replicated=21)
    point(db, gid, 30, replicated=31)
    point(db, gid, 70, replicated=75)      # RPO 45 min when it lands
    point(db, gid, 80, replicated=81, removed=92)  # destroyed by hand: back to the point of 70
    row = report(db, 0, 120)["edges"]
    # violated [0, 14) (clipped), [45, 75), [92, 120) (still running): 14 + 30 + 28 min;
    # the worst is just before 14: 64 min after the point of -50
    assert numbers(row) == (7200, 48 * 60, 64 * 60, 3, 1800, 0, 0)
    # a window starting and ending inside violations clips both: [60, 75) and [92, 110)
    assert numbers(report(db, 60, 110)["edges"])[1:5] == (17 * 60, 45 * 60, 2, 18 * 60)


def test_a_point_gone_from_the_target_only_counts_until_a_newer_one_arrived(db: Database) -> None:
    gid = group(db, "pruned", 15)
    for m in (0, 10, 20):  # replicated, then pruned on the target by its grid, kept on the source
        point(db, gid, m, replicated=m, on_target=False)
    point(db, gid, 30, replicated=30)
    point(db, gid, 40, replicated=40, on_target=False)  # the newest, destroyed by hand on the target
    point(db, gid, 50, on_target=False)  # made on the source, never replicated: not a recovery point
    row = report(db, 0, 60)["pruned"]
    # 0 to 40: every 10 min (each pruned point counts until the next arrived); from 40 the point
    # of 30 is the newest still there, as protection_status says: violated from 45
    assert numbers(row) == (3600, 45 * 60, 30 * 60, 1, 15 * 60, 0, 0)


def test_paused_time_is_left_out_and_counted(db: Database) -> None:
    gid = group(db, "paused", 15)
    for m in (0, 10, 20, 100, 110):
        point(db, gid, m)
    event(db, gid, 25, "paused")
    event(db, gid, 90, "last job failed", "violated")
    row = report(db, 0, 120)["paused"]
    # observed [0, 25) and [90, 120); [90, 100) violated (RPO 70 to 80 min)
    assert numbers(row) == (55 * 60, 45 * 60, 80 * 60, 1, 600, 65 * 60, 0)
    assert row["within_share"] == pytest.approx(45 / 55)


def test_groups_with_no_points_or_no_rpo(db: Database) -> None:
    group(db, "empty", 15)
    late = group(db, "late", 30)
    point(db, late, 90)
    free = group(db, "no-rpo", None)
    point(db, free, 0)
    point(db, free, 60, on_target=False)     # never on the target: not a recovery point
    rows = report(db, 0, 120)
    assert numbers(rows["empty"]) == (0, 0, None, 0, 0, 0, 7200) and rows["empty"]["within_share"] is None
    assert numbers(rows["late"]) == (1800, 1800, 1800, 0, 0, 0, 5400) and rows["late"]["within_share"] == 1.0
    assert numbers(rows["no-rpo"]) == (7200, None, 7200, None, None, 0, 0)
    assert rows["no-rpo"]["within_share"] is None
    assert list(rows) == ["empty", "late", "no-rpo"]


def test_a_window_that_ends_before_it_starts_is_refused(db: Database) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_from .* must be before p_to"):
        db.sql("select * from zerfaux.rpo_report(%s, %s)", (at(10), at(0)))


async def test_each_store_reads_the_same_report(db: Database, store_env: dict[str, str]) -> None:
    gid = group(db, "gap", 15)
    for m in (0, 10, 20, 30, 60, 70):
        point(db, gid, m)
    store = make_store(engine_settings(db.url, **store_env))
    await store.open()
    try:
        (row,) = await store.rpo_report(at(0), at(80))
    finally:
        await store.close()
    assert (row.name, row.within_share, row.worst_rpo_seconds, row.violations, row.longest_violation_seconds) == (
        "gap", 3900 / 4800, 1800.0, 1, 900.0)


# --- random timelines against the definition, second by second ---------------------------------

@dataclass(frozen=True)
class Point:
    created: int  # minutes
    delay: int | None
    removed_after: int | None
    on_target: bool


def reference(rpo: int, points: list[Point], events: list[tuple[int, str]], end: int) -> tuple[Any, ...]:
    """The definition read literally, one second at a time over [0, end) minutes."""
    eligible = sorted((p for p in points if p.delay is not None or p.on_target), key=lambda p: p.created)
    spans = []
    for i, p in enumerate(eligible):
        arrive = (p.created + (p.delay or 0)) * 60
        gone = None if p.removed_after is None else arrive + p.removed_after * 60
        if gone is None and not p.on_target:  # left the target at an unknown time
            newer = eligible[i + 1] if i + 1 < len(eligible) else None
            gone = arrive if newer is None else (newer.created + (newer.delay or 0)) * 60
        spans.append((p.created * 60, arrive, gone))
    target = rpo * 60
    within = observed = paused = unknown = 0
    worst: int | None = None
    runs: list[int] = []
    run = 0
    for t in range(end * 60):
        last = [reason for minute, reason in sorted(events) if minute * 60 <= t]
        is_paused = bool(last) and last[-1] == "paused"
        best = max((c for c, a, u in spans if a <= t and (u is None or u > t)), default=None)
        violated = False
        if is_paused:
            paused += 1
        elif best is None:
            unknown += 1
        else:
            observed += 1
            worst = max(worst or 0, t + 1 - best)
            violated = t - best >= target
            within += 0 if violated else 1
        if violated:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    if run:
        runs.append(run)
    return (observed, within, worst, len(runs), max(runs, default=0), paused, unknown)


points_strategy = st.lists(
    st.builds(Point, created=st.integers(-90, 170), delay=st.none() | st.integers(0, 12),
              removed_after=st.none() | st.integers(1, 60), on_target=st.booleans()),
    max_size=12, unique_by=lambda p: p.created,
)
events_strategy = st.dictionaries(st.integers(-30, 170), st.sampled_from(["paused", "last job failed", "recovered"]),
                                  max_size=4).map(lambda d: sorted(d.items()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rpo=st.integers(1, 45), points=points_strategy, events=events_strategy)
def test_random_timelines_match_the_definition(db: Database, rpo: int, points: list[Point],
                                               events: list[tuple[int, str]]) -> None:
    db.sql("delete from protection_groups")
    gid = group(db, "random", rpo)
    for p in points:
        replicated = None if p.delay is None else p.created + p.delay
        removed = None if p.removed_after is None else p.created + (p.delay or 0) + p.removed_after
        point(db, gid, p.created, replicated, removed, p.on_target)
    for minute, reason in events:
        event(db, gid, minute, reason)
    row = report(db, 0, 180)["random"]
    assert numbers(row) == reference(rpo, points, events, 180)
