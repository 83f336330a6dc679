"""One zerfaux.schedule_due() pass over 10,000 protection groups, and how evenly it spreads starts.

    .venv/bin/python bench/schedule.py [--groups 10000] [--passes 100] [--hours 1]

Its own database on the test Postgres (migrations and seed applied), ``--groups`` groups with
RPOs drawn uniformly from 5 to 60 minutes (fixed seed; interval = RPO / 2, the default).

Pass time: steady state. Every group has three completed jobs and three recovery points, the
newest at a random moment of its last interval, so each pass finds a few groups due. The clock
is simulated (``p_now``), 3 s per pass; between passes (not timed) the jobs a pass inserted run:
started at their due time, completed, a recovery point written. p50 and p99 over ``--passes``
passes, round trip included; beside them, the round trip of ``select 1`` on the same
connection (the floor no pass can beat).

Spread: the worst case the offsets exist for. Every group replicated at the same moment (made
together, or back from an outage); the schedule then runs for ``--hours`` of simulated time at
a pass every 10 s, each job starting at its due time (the sweep wakes then). Over that time: the
busiest second of scheduled starts over the mean starts per second (target <= 2). The same
starts without offsets (every group sharing an interval in one second) are counted beside it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.common import drop_database, percentile, scratch_database  # noqa: E402
from listener.migrate import migrate, seed  # noqa: E402

TARGET = "00000000-0000-4000-b000-000000000001"

GROUPS = [
    "select setseed(0.42)",
    """insert into protection_groups (name, replication_target_id, source_dataset, rpo_minutes)
       select 'bench-' || i, %(target)s, 'tank/bench-' || i, 5 + floor(random() * 56)::int
         from generate_series(1, %(n)s) i""",
]

# Three past replications per group (k = 2, 1, 0), the newest ``phase`` (a share of the
# interval) before t0; one job at a time per group, as the database allows.
HISTORY = [
    "select setseed(0.17)",
    """create temp table history as
       select g.id as g, k, %(t0)s::timestamptz - (r.phase + k) * g.rpo_minutes * interval '30 seconds' as at
         from protection_groups g
        cross join lateral (select random() as phase, g.id as gid) r
        cross join generate_series(0, 2) k
        where g.name like 'bench-%%'""",
    *[sql for k in (2, 1, 0) for sql in (
        f"insert into replication_jobs (protection_group_id) select g from history where k = {k}",
        f"""update replication_jobs j set status = 'completed', created_at = h.at, started_at = h.at,
                   completed_at = h.at + interval '5 seconds'
              from history h where h.g = j.protection_group_id and h.k = {k} and j.status = 'pending'""")],
    """insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)
       select g, 'zerfaux_' || k, gen_random_uuid()::text, at, at + interval '5 seconds' from history""",
]

# Every group replicated at t0, nothing else.
SYNCHRONIZED = [
    "delete from recovery_points", "delete from rpo_events", "delete from zerfaux.operations",
    "delete from replication_jobs",
    "insert into replication_jobs (protection_group_id) select id from protection_groups where name like 'bench-%%'",
    """update replication_jobs set status = 'completed', created_at = %(t0)s, started_at = %(t0)s,
              completed_at = %(t0)s::timestamptz + interval '5 seconds'""",
    """insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)
       select id, 'zerfaux_t0', gen_random_uuid()::text, %(t0)s from protection_groups where name like 'bench-%%'""",
    "update protection_groups set next_replication_at = null",
]


def run_all(conn: psycopg.Connection[tuple[object, ...]], statements: list[str], params: dict[str, object]) -> None:
    for sql in statements:
        conn.execute(sql, params)  # type: ignore[arg-type]


# What the listeners would do with the jobs a pass inserted: run them at their due time.
RUN_SCHEDULED = """
    with started as (
        update replication_jobs j set status = 'completed', started_at = g.next_replication_at,
               completed_at = g.next_replication_at + interval '5 seconds'
          from protection_groups g
         where g.id = j.protection_group_id and j.status = 'pending' and j.origin = 'schedule'
        returning j.protection_group_id as g, g.next_replication_at as at)
    insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)
    select g, 'zerfaux_' || extract(epoch from at), gen_random_uuid()::text, at from started
    returning extract(epoch from created_at) as at;
"""


def pass_times(conn: psycopg.Connection[tuple[object, ...]], t0: datetime,
               passes: int) -> tuple[list[float], list[float], int]:
    # Setup, not timed: every group was just marked (made, given a history); the first passes
    # of both functions compute them all, 5000 a pass.
    for _ in range(10):
        conn.execute("select zerfaux.schedule_due(%s)", (t0,))
        conn.execute(RUN_SCHEDULED)
        conn.execute("select zerfaux.record_rpo_transitions(%s)", (t0,))
        backlog = conn.execute("select (select count(*) from zerfaux.schedule_dirty)"
                               " + (select count(*) from zerfaux.rpo_dirty)").fetchone()
        if backlog is not None and int(str(backlog[0])) < 500:
            break
    times: list[float] = []
    rpo: list[float] = []  # the sweep's other call, for information
    inserted = 0
    for k in range(1, passes + 1):
        now = t0 + timedelta(seconds=3 * k)
        start = time.perf_counter()
        row = conn.execute("select inserted from zerfaux.schedule_due(%s)", (now,)).fetchone()
        times.append((time.perf_counter() - start) * 1000)
        inserted += int(str(row[0])) if row else 0
        conn.execute(RUN_SCHEDULED)
        start = time.perf_counter()
        conn.execute("select zerfaux.record_rpo_transitions(%s)", (now,))
        rpo.append((time.perf_counter() - start) * 1000)
    return times, rpo, inserted


def spread(conn: psycopg.Connection[tuple[object, ...]], t0: datetime, hours: float) -> tuple[float, int, int, int]:
    # The schedule's spread alone: the RPO bookkeeping of the 48,000 points written is not needed.
    conn.execute("alter table recovery_points disable trigger recovery_points_rpo_mark")
    run_all(conn, SYNCHRONIZED, {"t0": t0})
    starts: list[float] = []
    steps = int(hours * 3600 / 10)
    for k in range(1, steps + 1):  # 10 s apart: each job is started at its own due time anyway
        conn.execute("select zerfaux.schedule_due(%s)", (t0 + timedelta(seconds=10 * k),))
        starts += [float(r[0]) for r in conn.execute(RUN_SCHEDULED).fetchall()]  # type: ignore[arg-type]
    base = t0.timestamp()
    per_second = collections.Counter(int(s - base) for s in starts)
    mean = len(starts) / (hours * 3600)
    # Without offsets: each interval's groups all start at t0 + interval, in one second.
    cohorts = conn.execute("select count(*) from protection_groups where name like 'bench-%%'"
                           " group by rpo_minutes order by 1 desc limit 1").fetchone()
    return max(per_second.values()) / mean, max(per_second.values()), len(starts), int(str(cohorts[0])) if cohorts else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--hours", type=float, default=1.0)
    args = parser.parse_args()
    name, url = scratch_database("zf_bench_schedule")
    try:
        migrate(url)
        seed(url)
        with psycopg.connect(url, autocommit=True) as conn:
            t0 = conn.execute("select date_trunc('second', now())").fetchone()[0]  # type: ignore[index]
            run_all(conn, GROUPS, {"target": TARGET, "n": args.groups})
            run_all(conn, HISTORY, {"t0": t0})
            conn.execute("vacuum analyze")
            times, rpo, inserted = pass_times(conn, t0, args.passes)
            floor = []
            for _ in range(args.passes):
                start = time.perf_counter()
                conn.execute("select 1")
                floor.append((time.perf_counter() - start) * 1000)
            print(f"schedule_due() over {args.groups} groups, {args.passes} passes 3 s apart:"
                  f" {inserted} jobs inserted ({inserted / args.passes:.1f} per pass)")
            print(f"  pass time p50 {percentile(times, 50):.1f} ms  p99 {percentile(times, 99):.1f} ms"
                  f"  (target p99 <= 50 ms; `select 1` round trip p50 {percentile(floor, 50):.2f} ms)")
            print(f"  record_rpo_transitions() after each pass: p50 {percentile(rpo, 50):.1f} ms"
                  f"  p99 {percentile(rpo, 99):.1f} ms")
            ratio, busiest, starts, cohort = spread(conn, t0, args.hours)
            print(f"spread: every group replicated at once, then {args.hours:g} h of scheduled starts"
                  f" ({starts} starts, mean {starts / (args.hours * 3600):.1f}/s): busiest second {busiest};"
                  f" without offsets {cohort} groups would share one second")
    finally:
        drop_database(name)
    print(f"RATIO {ratio:.2f} schedule spread")


if __name__ == "__main__":
    main()
