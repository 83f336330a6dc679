"""Commit-to-claim latency by wake-up source, on an idle listener.

    .venv/bin/python bench/sources.py [--samples 100] [--sweep-seconds 1]

One listener at a time (the real dispatcher and Postgres store, a no-op handler, an idle wait of
120 s so that only the source under test wakes it), fed single inserts, each its own commit.
Latency is ``started_at - created_at`` of each operation, both read from the database clock.

- notify: LISTEN/NOTIFY on a direct connection.
- realtime: the Realtime fake (tests/fakes), which is itself fed by NOTIFY and then reads the
  row, so this is NOTIFY plus one websocket hop and one query. Hosted Realtime polls its WAL slot
  every 100 ms, so expect it to add up to about that much on a real project.
- broadcast: the same fake with Broadcast from Database: the trigger's realtime.send writes a row
  into a test-only realtime.messages (tests/fakes/realtime_schema.sql), whose insert the fake hears
  by NOTIFY and reads; hosted Realtime reads realtime.messages through a replication slot instead.
- webhook: the bench POSTs the database-webhook body to the real HTTP app right after the
  commit (what pg_net does, minus pg_net's own queueing, which this does not model).
- sweep: no source but the periodic sweep, every ``--sweep-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from bench.common import drop_database, percentile, scratch_database  # noqa: E402
from listener.dispatcher import DispatchSettings, Dispatcher  # noqa: E402
from listener.http import build_server, create_app, run_server  # noqa: E402
from listener.metrics import Metrics  # noqa: E402
from listener.migrate import migrate  # noqa: E402
from listener.sources.notify import NotifySource  # noqa: E402
from listener.sources.realtime import RealtimeSource  # noqa: E402
from listener.sources.sweep import SweepSource  # noqa: E402
from listener.sources.webhook import WebhookSource  # noqa: E402
from listener.store_pg import PostgresStore  # noqa: E402

SOURCES = ("notify", "realtime", "broadcast", "webhook", "sweep")
REALTIME_SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "fakes" / "realtime_schema.sql"
SECRET = "bench-webhook-secret"


class NoOp:
    kind = "bench.noop"

    async def __call__(self, ctx: Any, payload: Mapping[str, Any]) -> dict[str, Any]:
        return {}


@contextlib.asynccontextmanager
async def _source(name: str, url: str, store: PostgresStore, dispatcher: Dispatcher,
                  sweep_seconds: float) -> AsyncIterator[tuple[Any, str | None]]:
    """The source under test, running and connected; and the webhook URL when it is the webhook."""
    tasks: list[asyncio.Future[Any]] = []
    hook_url = None
    with contextlib.ExitStack() as stack:
        if name == "notify":
            source: Any = NotifySource(url, dispatcher.wake, dispatcher.poke)
        elif name == "realtime":
            from tests.fakes.supabase import FakeSupabase

            fake = stack.enter_context(FakeSupabase(url))
            source = RealtimeSource(fake.url, fake.key, dispatcher.wake, dispatcher.poke, wakeups="changes")
        elif name == "broadcast":
            from tests.fakes.supabase import FakeSupabase

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(REALTIME_SCHEMA.read_text())
                conn.execute("select zerfaux.install_broadcast_policies()")
            fake = stack.enter_context(FakeSupabase(url))
            source = RealtimeSource(fake.url, fake.key, dispatcher.wake, dispatcher.poke, wakeups="broadcast")
        elif name == "webhook":
            source = WebhookSource(dispatcher.wake, dispatcher.poke)
            app = create_app(secret=SECRET, webhook=source, store=store, sources=[source], metrics=Metrics())
            server = build_server(app, "127.0.0.1", 0)
            tasks.append(asyncio.ensure_future(run_server(server, source)))
        else:
            source = SweepSource(store, dispatcher.wake, sweep_seconds, 30.0)
        if name != "webhook":
            tasks.append(asyncio.ensure_future(source.run()))
        try:
            while not source.connected:
                await asyncio.sleep(0.02)
            if name == "webhook":
                hook_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/webhooks/supabase"
            yield source, hook_url
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def measure(url: str, name: str, samples: int = 100, spacing: float = 0.05,
                  sweep_seconds: float = 1.0) -> list[float]:
    """Milliseconds from commit to claim for ``samples`` single inserts woken by source ``name``."""
    store = PostgresStore(url, pool_size=12)
    await store.open()
    dispatcher = Dispatcher(store, {"bench.noop": NoOp()}, DispatchSettings(
        worker_id=f"bench-{name}", concurrency=8, lease_seconds=30, idle_seconds=120.0))
    run = asyncio.create_task(dispatcher.run())
    ids: list[str] = []
    try:
        async with _source(name, url, store, dispatcher, sweep_seconds) as (_, hook_url), \
                httpx.AsyncClient() as client, \
                await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await asyncio.sleep(0.3)  # start-up wake-ups pass
            for _ in range(samples):
                cur = await conn.execute("insert into zerfaux.operations (kind, subject_id)"
                                         " values ('bench.noop', gen_random_uuid()) returning id")
                row = await cur.fetchone()
                assert row is not None
                ids.append(str(row[0]))
                if hook_url is not None:
                    body = {"type": "INSERT", "schema": "zerfaux", "table": "operations",
                            "record": {"id": ids[-1], "kind": "bench.noop"}, "old_record": None}
                    await client.post(hook_url, json=body, headers={"Authorization": f"Bearer {SECRET}"})
                await asyncio.sleep(spacing)
            for _ in range(int(10 * (sweep_seconds + 5) / 0.1)):
                cur = await conn.execute("select count(*) from zerfaux.operations where id = any(%s::uuid[])"
                                         " and status = 'succeeded'", (ids,))
                done = await cur.fetchone()
                if done and done[0] == len(ids):
                    break
                await asyncio.sleep(0.1)
            cur = await conn.execute("select extract(epoch from started_at - created_at) from zerfaux.operations"
                                     " where id = any(%s::uuid[]) and status = 'succeeded'", (ids,))
            latencies = [float(r[0]) * 1000 for r in await cur.fetchall()]
    finally:
        dispatcher.stop()
        await asyncio.gather(run, return_exceptions=True)
        await store.close()
    assert len(latencies) == samples, f"{name}: only {len(latencies)} of {samples} claimed"
    return latencies


async def source_latencies(url: str, samples: int = 100, sweep_seconds: float = 1.0) -> dict[str, list[float]]:
    """Every source in turn on one migrated database: {source: latencies in ms}."""
    return {name: await measure(url, name, samples, sweep_seconds=sweep_seconds) for name in SOURCES}


def report(latencies: Mapping[str, list[float]], sweep_seconds: float) -> list[str]:
    lines = []
    for name, values in latencies.items():
        label = f"{name} (every {sweep_seconds:g} s)" if name == "sweep" else name
        lines.append(f"commit-to-claim {label:<18} idle listener, {len(values)} single inserts: "
                     f"p50 {percentile(values, 50):7.1f} ms  p99 {percentile(values, 99):7.1f} ms")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--sweep-seconds", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    name, url = scratch_database("bench_sources")
    try:
        migrate(url)
        latencies = await source_latencies(url, args.samples, args.sweep_seconds)
    finally:
        drop_database(name)
    print("\n".join(report(latencies, args.sweep_seconds)))


if __name__ == "__main__":
    asyncio.run(main())
