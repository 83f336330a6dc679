"""Dispatch throughput and commit-to-claim latency, against procrastinate in the same run.

    .venv/bin/python bench/dispatch.py [--jobs 5000] [--concurrency 8]

Both sides drain the same number of no-op jobs from the same Postgres server, one worker each,
with the same concurrency. Zerfaux runs its real dispatcher and store with a handler that does
nothing; procrastinate runs a task that does nothing. Last line: the throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.common import drop_database, percentile, scratch_database  # noqa: E402
from bench.sources import report as source_report  # noqa: E402
from bench.sources import source_latencies  # noqa: E402
from listener.dispatcher import DispatchSettings, Dispatcher  # noqa: E402
from listener.migrate import migrate  # noqa: E402
from listener.sources.notify import NotifySource  # noqa: E402
from listener.store_pg import PostgresStore  # noqa: E402


class NoOp:
    kind = "bench.noop"

    async def __call__(self, ctx: Any, payload: Mapping[str, Any]) -> dict[str, Any]:
        return {}


def enqueue(url: str, count: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "insert into zerfaux.operations (kind, subject_id) select 'bench.noop', gen_random_uuid()"
            " from generate_series(1, %s)", (count,),
        )


def dispatcher_for(store: PostgresStore, concurrency: int) -> Dispatcher:
    return Dispatcher(store, {"bench.noop": NoOp()}, DispatchSettings(
        worker_id="bench", concurrency=concurrency, lease_seconds=30, idle_seconds=1.0))


async def zerfaux_throughput(url: str, jobs: int, concurrency: int) -> float:
    enqueue(url, jobs)
    store = PostgresStore(url, pool_size=concurrency + 4)
    await store.open()
    try:
        started = time.perf_counter()
        await dispatcher_for(store, concurrency).run(until_idle=True)
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    with psycopg.connect(url) as conn:
        done = conn.execute("select count(*) from zerfaux.operations where status = 'succeeded'").fetchone()
    assert done and done[0] == jobs, f"only {done} of {jobs} succeeded"
    return jobs / elapsed


async def zerfaux_latency(url: str, samples: int, concurrency: int) -> list[float]:
    """Single inserts, each its own commit, on an idle listener woken by NOTIFY."""
    store = PostgresStore(url, pool_size=concurrency + 4)
    await store.open()
    dispatcher = dispatcher_for(store, concurrency)
    notify = NotifySource(url, dispatcher.wake, dispatcher.poke)
    tasks = [asyncio.create_task(dispatcher.run()), asyncio.create_task(notify.run())]
    try:
        while not notify.connected:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for _ in range(samples):
                await conn.execute("insert into zerfaux.operations (kind, subject_id) values ('bench.noop', gen_random_uuid())")
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            cur = await conn.execute(
                "select extract(epoch from started_at - created_at) from zerfaux.operations"
                " where status = 'succeeded' and started_at > now() - interval '1 hour'"
                " order by created_at desc limit %s", (samples,))
            return [float(r[0]) * 1000 for r in await cur.fetchall()]
    finally:
        dispatcher.stop()
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


async def procrastinate_throughput(url: str, jobs: int, concurrency: int) -> float:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await noop.batch_defer_async(*({} for _ in range(jobs)))
        started = time.perf_counter()
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
        elapsed = time.perf_counter() - started
    return jobs / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    zname, zurl = scratch_database("bench_zerfaux")
    pname, purl = scratch_database("bench_procrastinate")
    try:
        migrate(zurl)
        zerfaux_rate = await zerfaux_throughput(zurl, args.jobs, args.concurrency)
        latencies = await zerfaux_latency(zurl, args.latency_samples, args.concurrency)
        by_source = await source_latencies(zurl, args.latency_samples // 2, sweep_seconds=1.0)
        procrastinate_rate = await procrastinate_throughput(purl, args.jobs, args.concurrency)
    finally:
        drop_database(zname)
        drop_database(pname)

    print(f"jobs: {args.jobs} no-op, concurrency {args.concurrency}, one worker each, same Postgres server")
    print(f"zerfaux        {zerfaux_rate:9.0f} jobs/s")
    print(f"procrastinate  {procrastinate_rate:9.0f} jobs/s")
    print(f"commit-to-claim (NOTIFY, idle listener, {len(latencies)} single inserts): "
          f"p50 {percentile(latencies, 50):.1f} ms  p99 {percentile(latencies, 99):.1f} ms")
    print("\n".join(source_report(by_source, 1.0)))
    print(f"RATIO {zerfaux_rate / procrastinate_rate:.2f} dispatch throughput vs procrastinate")


if __name__ == "__main__":
    asyncio.run(main())
