"""The DR console's groups page and live feed with 1,000 groups and 100 running replications.

    .venv/bin/python bench/console.py [--groups 1000] [--running 100] [--requests 300]

Its own database on the test Postgres (migrations and seed applied): ``--groups`` groups with
RPOs from 5 to 60 minutes, each with a day of recovery points at its replication interval (at
most 48, as retention keeps), a completed job and a few RPO events; ``--running`` of them
replicating now (status 'running', half-way). One admin (all groups) signs in with a JWT.

The console is the listener's own HTTP app (listener/http.create_app with listener/console) under
uvicorn on loopback, in a thread of this process (tests/support/console.py's ConsoleServer), its
database connections counting every statement they run, so "queries per refresh" is what the
page really sent. Each figure comes after a warm-up.

- page: time to first byte of ``GET /`` (page 1: the worst ``PAGE_SIZE`` groups and the counts
  over all; request sent → status line and headers in; the page is
  rendered before its headers leave), p50 and p99 over ``--requests`` requests, one at a time.
- the last page (``/?page=N``, the largest offset): the same, fewer requests; not in the ratio.
- queries per refresh: statements per ``GET /`` (must not grow with the groups).
- feed: one ``/feed`` client; every running job's progress is moved in one transaction; time to
  the client's next event and the statements the feed ran for it.
- the page's own groups query alone, as the same user: the database's share of the page.
- baseline: ``select * from protection_status`` (all rows fetched) as the same user (role
  authenticated, the same JWT claims) on one connection, p50 and p99.

Last line: ``RATIO <baseline p99 ms / page p99 ms> console overhead`` (target >= 0.25: the page
costs at most four times the bare query).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from bench.common import drop_database, percentile, scratch_database  # noqa: E402
from listener.console.paging import PAGE_SIZE  # noqa: E402
from listener.migrate import migrate, seed  # noqa: E402
from tests.support.console import ConsoleServer, CountingConnection, make_jwt  # noqa: E402
from tests.support.pg import Database  # noqa: E402

PRIMARY = "00000000-0000-4000-a000-000000000001"
DR = "00000000-0000-4000-a000-000000000002"
TARGET = "00000000-0000-4000-b000-000000000001"
ADMIN = "00000000-0000-4000-8000-00000000beef"

WORLD = [
    "select setseed(0.23)",
    "update replication_targets set max_concurrent = 1000",
    """insert into protection_groups (name, source_vcenter_id, dr_vcenter_id, replication_target_id,
                                      source_dataset, protection_datastore, rpo_minutes, paused)
       select 'bench-' || lpad(i::text, 5, '0'), %(vc)s, %(dr)s, %(t)s, 'tank/bench-' || i, 'zfs-protect-01',
              5 + floor(random() * 56)::int, false
         from generate_series(1, %(n)s) i""",
    # A day of points at each group's interval (RPO / 2), at most 48 (retention), the newest a
    # random share of an interval ago; a few groups lag behind (a sawtooth that creeps upward).
    """insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at, bytes)
       select g.id, 'zerfaux_' || k, gen_random_uuid()::text,
              now() - (k + r.phase) * g.rpo_minutes * interval '30 seconds' - r.lag,
              now() - (k + r.phase) * g.rpo_minutes * interval '30 seconds' - r.lag + interval '20 seconds',
              1048576 * (1 + k)
         from protection_groups g
        cross join lateral (select random() as phase, g.id as gid,
                                   case when random() < 0.05 then interval '90 minutes' else interval '0' end as lag) r
        cross join generate_series(0, 47) k
        where g.name like 'bench-%%'""",
    """insert into rpo_events (protection_group_id, at, old_status, new_status, rpo_seconds, reason)
       select g.id, now() - interval '1 hour' * e, 'ok', case when e %% 2 = 0 then 'at_risk' else 'ok' end,
              g.rpo_minutes * 45, 'bench'
         from protection_groups g cross join generate_series(1, 3) e where g.name like 'bench-%%'""",
    # Each group's last completed job, then the running ones.
    "insert into replication_jobs (protection_group_id) select id from protection_groups where name like 'bench-%%'",
    """update replication_jobs set status = 'completed', started_at = now() - interval '10 minutes',
              completed_at = now() - interval '9 minutes', bytes_transferred = 1048576, bytes_estimated = 1048576""",
    "delete from zerfaux.operations",
    """insert into replication_jobs (protection_group_id)
       select id from protection_groups where name like 'bench-%%' order by name limit %(running)s""",
    """update replication_jobs set status = 'running', started_at = now() - interval '1 minute',
              bytes_transferred = 512 * 1048576, bytes_estimated = 1024 * 1048576 where status = 'pending'""",
    "insert into zerfaux.operators (user_id, role) values (%(admin)s, 'admin')",
]


def build_world(url: str, groups: int, running: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in WORLD:
            conn.execute(sql, {"vc": PRIMARY, "dr": DR, "t": TARGET, "n": groups,  # type: ignore[arg-type]
                               "running": running, "admin": ADMIN})
        conn.execute("vacuum analyze")


def baseline(url: str, n: int) -> list[float]:
    """``select * from protection_status`` as the signed-in admin, all rows fetched."""
    claims = json.dumps({"sub": ADMIN, "role": "authenticated", "aud": "authenticated"})
    times: list[float] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, false)", (claims,))
        for i in range(n + n // 5):
            start = time.perf_counter()
            rows = conn.execute("select * from protection_status").fetchall()
            if i >= n // 5:  # the first fifth warms up
                times.append((time.perf_counter() - start) * 1000)
        assert len(rows) > 0, "the admin sees no group: the bench's operators row is wrong"
    return times


def groups_query(url: str, n: int) -> list[float]:
    """The page's own groups query (listener/console/console.sql 'groups_page', page 1 of
    PAGE_SIZE groups and the counts over all) as the same user, rows fetched: how much of the
    page is the database's."""
    from listener.console.paging import PAGE_SIZE
    from listener.console.queries import QUERIES

    claims = json.dumps({"sub": ADMIN, "role": "authenticated", "aud": "authenticated"})
    times: list[float] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, false)", (claims,))
        for i in range(n + n // 5):
            start = time.perf_counter()
            conn.execute(QUERIES["groups_page"], {"limit": PAGE_SIZE, "offset": 0}).fetchall()
            if i >= n // 5:
                times.append((time.perf_counter() - start) * 1000)
    return times


def page_times(base: str, token: str, n: int, path: str = "/") -> tuple[list[float], float, int]:
    """TTFB of ``GET path`` one request at a time; statements per request; the page's size."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/html"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(max(5, n // 10)):  # warm-up: pool, plans, templates
            client.get(path).raise_for_status()
        times: list[float] = []
        before = CountingConnection.statements
        size = 0
        for _ in range(n):
            start = time.perf_counter()
            with client.stream("GET", path) as response:
                times.append((time.perf_counter() - start) * 1000)  # status line and headers are in
                body = response.read()
                assert response.status_code == 200, (response.status_code, body[:300])
                size = len(body)
        return times, (CountingConnection.statements - before) / n, size


def feed_rounds(url: str, base: str, token: str, running: list[str], rounds: int) -> tuple[list[float], float]:
    """One /feed client. Each round moves every running job's progress in one commit and times
    until the client has been told of every one of those groups; statements per round."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    times: list[float] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client, \
            client.stream("GET", "/feed") as response, psycopg.connect(url, autocommit=True) as conn:
        assert response.status_code == 200, response.status_code
        lines = response.iter_lines()

        def told(wanted: set[str]) -> None:
            seen: set[str] = set()
            for line in lines:
                if line.startswith("data:"):
                    seen.add(str(json.loads(line[5:]).get("id")))
                    if wanted <= seen:
                        return
            raise AssertionError("the feed ended")

        told(set(running))  # what is known when it connects
        before = CountingConnection.statements
        for _ in range(rounds):
            start = time.perf_counter()
            conn.execute("update replication_jobs set bytes_transferred = bytes_transferred + 1048576"
                         " where status = 'running'")
            told(set(running))
            times.append((time.perf_counter() - start) * 1000)
        return times, (CountingConnection.statements - before) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--running", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--feed-rounds", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    name, url = scratch_database("zf_bench_console")
    try:
        migrate(url)
        seed(url)
        build_world(url, args.groups, args.running)
        with psycopg.connect(url) as conn:
            running = [str(r[0]) for r in conn.execute(
                "select protection_group_id from replication_jobs where status = 'running'").fetchall()]
        base = baseline(url, args.requests)
        query = groups_query(url, max(20, args.requests // 5))
        with ConsoleServer(Database(name, url), counting=True) as server:
            gc.freeze()  # as `zerfaux run` does once everything is loaded (listener/cli.py)
            token = make_jwt(ADMIN)
            page, per_page, size = page_times(server.url, token, args.requests)
            # The last page (the healthiest groups, the largest offset): a figure, not the ratio's.
            last_page = f"/?page={max(1, -(-args.groups // PAGE_SIZE))}"
            tail, _, _ = page_times(server.url, token, max(20, args.requests // 5), last_page)
            feed, per_round = feed_rounds(url, server.url, token, running, args.feed_rounds)
    finally:
        drop_database(name)
    print(f"console groups page: {args.groups} groups, {len(running)} replicating;"
          f" {args.requests} requests one at a time after a warm-up ({size / 1024:.0f} KiB a page)")
    print(f"  time to first byte p50 {percentile(page, 50):.1f} ms  p99 {percentile(page, 99):.1f} ms")
    print(f"  the last page ({last_page}): p50 {percentile(tail, 50):.1f} ms  p99 {percentile(tail, 99):.1f} ms")
    print(f"  queries per refresh {per_page:.1f} (statements sent on the console's connections;"
          f" BEGIN/COMMIT not counted)")
    print(f"  of which the page's groups query alone (console.sql 'groups_page', as the same user):"
          f" p50 {percentile(query, 50):.1f} ms  p99 {percentile(query, 99):.1f} ms")
    print(f"  live feed: {len(running)} jobs' progress moved in one commit -> the client told of all"
          f" p50 {percentile(feed, 50):.0f} ms  p99 {percentile(feed, 99):.0f} ms;"
          f" {per_round:.1f} queries per update ({args.feed_rounds} rounds)")
    print(f"  baseline: select * from protection_status as the same user, p50 {percentile(base, 50):.1f} ms"
          f"  p99 {percentile(base, 99):.1f} ms")
    print(f"RATIO {percentile(base, 99) / percentile(page, 99):.2f} console overhead")


if __name__ == "__main__":
    main()
