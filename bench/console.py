"""The DR console's groups page and live feed with 1,000 groups and 100 running replications.

    .venv/bin/python bench/console.py [--groups 1000] [--running 100] [--requests 300]

Its own database on the test Postgres (migrations and seed applied): ``--groups`` groups with
RPOs from 5 to 60 minutes, each with a day of recovery points at its replication interval (at
most 48, as retention keeps), a completed job and a few RPO events; ``--running`` of them
replicating now (status 'running', half-way). One admin (all groups) signs in with a JWT.

The console is the listener's own HTTP app (listener/console) under uvicorn in this process, on
loopback, with its database connections counted (a connection class that counts every statement
it is asked to run), so "queries per refresh" is what the page really sent, whatever the number
of groups. Each figure comes after a warm-up.

- page: time to first byte of ``GET /`` (request sent → status line and headers in; the page is
  rendered before its headers leave), p50 and p99 over ``--requests`` requests, one at a time.
- queries per refresh: statements per ``GET /`` (must not grow with the groups).
- feed: one ``/feed`` client; every running job's progress is moved in one transaction; time to
  the client's next event and the statements the feed ran for it.
- baseline: ``select * from protection_status`` (all rows fetched) as the same user (role
  authenticated, the same JWT claims) on one connection, p50 and p99.

Last line: ``RATIO <baseline p99 ms / page p99 ms> console overhead`` (target >= 0.25: the page
costs at most four times the bare query).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from bench.common import drop_database, percentile, scratch_database  # noqa: E402
from listener.migrate import migrate, seed  # noqa: E402
from tests.support.tokens import user_jwt  # noqa: E402

PRIMARY = "00000000-0000-4000-a000-000000000001"
DR = "00000000-0000-4000-a000-000000000002"
TARGET = "00000000-0000-4000-b000-000000000001"
SECRET = "bench-console-jwt-secret-0123456789abcdef"
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


class Counted:
    """Statements sent on the console's connections (every query goes through a cursor's execute)."""

    n = 0


def counting_connection() -> type[Any]:
    class CountingConnection(psycopg.AsyncConnection):  # type: ignore[type-arg]
        # connection.execute goes through a cursor's execute, so only cursors count. BEGIN and
        # COMMIT (conn.transaction()) are sent beside them and are not counted.
        def cursor(self, *args: Any, **kw: Any) -> Any:
            cur = super().cursor(*args, **kw)
            execute = cur.execute

            async def counted(query: Any, params: Any = None, **kw2: Any) -> Any:
                Counted.n += 1
                return await execute(query, params, **kw2)

            cur.execute = counted  # type: ignore[method-assign]
            return cur

    return CountingConnection


async def serve(url: str) -> tuple[Any, Any, Any]:
    """The console's routes under uvicorn on loopback, with counted connections."""
    from starlette.applications import Starlette

    from listener.console import Console, routes
    from listener.console.auth import Verifier
    from listener.console.feed import Feed
    from listener.console.queries import ConsoleDB
    from listener.http import build_server

    db = ConsoleDB(url, connection_class=counting_connection())
    console = Console(Verifier(SECRET, None), db, Feed(url, db))
    await console.start()
    server = build_server(Starlette(routes=routes(console)), "127.0.0.1", 0)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    return console, server, task


async def page_times(base: str, token: str, n: int) -> tuple[list[float], float, int]:
    """TTFB of ``GET /`` one request at a time; statements per request; the page's size."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/html"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        for _ in range(max(5, n // 10)):  # warm-up: pool, plans, templates
            (await client.get("/")).raise_for_status()
        times: list[float] = []
        before = Counted.n
        size = 0
        for _ in range(n):
            start = time.perf_counter()
            async with client.stream("GET", "/") as response:
                times.append((time.perf_counter() - start) * 1000)
                body = await response.aread()
                assert response.status_code == 200, (response.status_code, body[:300])
                size = len(body)
        return times, (Counted.n - before) / n, size


async def feed_round(url: str, base: str, token: str, rounds: int) -> tuple[list[float], float]:
    """One /feed client; each round moves every running job's progress in one transaction and
    times the client's next event; statements the console ran per round."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        async with client.stream("GET", "/feed") as response:
            assert response.status_code == 200, response.status_code
            lines = response.aiter_lines()

            async def next_event() -> None:
                async for line in lines:
                    if line.startswith("data:"):
                        return
                raise AssertionError("the feed ended")

            await asyncio.wait_for(next_event(), 30)  # what is known now
            await asyncio.sleep(1.0)
            before = Counted.n
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                for _ in range(rounds):
                    start = time.perf_counter()
                    await conn.execute("update replication_jobs set bytes_transferred = bytes_transferred + 1048576"
                                       " where status = 'running'")
                    await asyncio.wait_for(next_event(), 30)
                    times.append((time.perf_counter() - start) * 1000)
            return times, (Counted.n - before) / rounds


async def measure(url: str, requests: int, rounds: int) -> dict[str, Any]:
    console, server, task = await serve(url)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        token = user_jwt(SECRET, ADMIN, expires_in=3600)
        page, per_page, size = await page_times(base, token, requests)
        feed, per_round = await feed_round(url, base, token, rounds)
        return {"page": page, "per_page": per_page, "size": size, "feed": feed, "per_round": per_round}
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        await console.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--running", type=int, default=100)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--feed-rounds", type=int, default=30)
    args = parser.parse_args()
    name, url = scratch_database("zf_bench_console")
    try:
        migrate(url)
        seed(url)
        build_world(url, args.groups, args.running)
        base = baseline(url, args.requests)
        got = asyncio.run(measure(url, args.requests, args.feed_rounds))
    finally:
        drop_database(name)
    page, feed = got["page"], got["feed"]
    print(f"console groups page, {args.groups} groups, {args.running} replicating,"
          f" {args.requests} requests one at a time ({got['size'] / 1024:.0f} KiB each):")
    print(f"  time to first byte p50 {percentile(page, 50):.1f} ms  p99 {percentile(page, 99):.1f} ms")
    print(f"  queries per refresh {got['per_page']:.1f} (statements the page sent; BEGIN/COMMIT not counted)")
    print(f"  live feed: {args.running} jobs' progress moved in one commit -> next event p50"
          f" {percentile(feed, 50):.0f} ms p99 {percentile(feed, 99):.0f} ms;"
          f" {got['per_round']:.1f} queries per update ({args.feed_rounds} rounds)")
    print(f"  baseline: select * from protection_status as the same user, p50 {percentile(base, 50):.1f} ms"
          f"  p99 {percentile(base, 99):.1f} ms")
    print(f"RATIO {percentile(base, 99) / percentile(page, 99):.2f} console overhead")


if __name__ == "__main__":
    main()
