"""Dispatch throughput and commit-to-claim latency, against procrastinate in the same run.

    .venv/bin/python bench/dispatch.py [--jobs 5000] [--concurrency 8] [--processes 1,2,4]

Both sides drain the same number of no-op jobs from the same Postgres server, one worker
process each, with the same concurrency. Zerfaux runs its real dispatcher and store with a
handler that does nothing; procrastinate runs an async task that does nothing, twice: with its
defaults, and as its documentation recommends for throughput (an async task with
``concurrency`` sub-workers, ``delete_jobs="always"`` so finished jobs leave the table,
LISTEN/NOTIFY on, its default). The RATIO line compares like with like: one Zerfaux process
against one procrastinate worker in the recommended setup, same concurrency, jobs enqueued
before either starts. Scale-out: the same drain by 1, 2 and 4 Zerfaux processes on one
database (bench/dispatch_worker.py), each total printed; adding processes must not lower it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import subprocess
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


def dispatcher_for(store: PostgresStore, concurrency: int, worker_id: str = "bench") -> Dispatcher:
    return Dispatcher(store, {"bench.noop": NoOp()}, DispatchSettings(
        worker_id=worker_id, concurrency=concurrency, lease_seconds=30, idle_seconds=1.0))


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


def scale_out(url: str, jobs: int, concurrency: int, processes: int) -> float:
    """Jobs per second drained by ``processes`` listener processes, from the go signal to the
    last exit (start-up excluded: each connects first and says ready)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("delete from zerfaux.operations")
    enqueue(url, jobs)
    worker = str(Path(__file__).with_name("dispatch_worker.py"))
    procs = [subprocess.Popen([sys.executable, worker, url, str(concurrency), f"bench-{processes}-{i}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    codes = [proc.wait(timeout=600) for proc in procs]
    elapsed = time.perf_counter() - started
    assert codes == [0] * processes, codes
    with psycopg.connect(url) as conn:
        done = conn.execute("select count(*) from zerfaux.operations where status = 'succeeded'").fetchone()
    assert done and done[0] == jobs, f"only {done} of {jobs} succeeded"
    return jobs / elapsed


# What procrastinate's documentation says to do for throughput ("Execute multiple jobs at the
# same time": an async task and concurrency; "Delete finished jobs": delete_jobs="always");
# listen_notify is on by default. The defaults run is printed beside it.
PROCRASTINATE_RECOMMENDED = {"delete_jobs": "always", "listen_notify": True}
PROCRASTINATE_DEFAULTS: dict[str, Any] = {}


async def procrastinate_throughput(url: str, jobs: int, concurrency: int, options: Mapping[str, Any]) -> float:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await noop.batch_defer_async(*({} for _ in range(jobs)))
        started = time.perf_counter()
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False,
                                   **options)
        elapsed = time.perf_counter() - started
    return jobs / elapsed


def procrastinate_version() -> str:
    try:
        return importlib.metadata.version("procrastinate")
    except importlib.metadata.PackageNotFoundError:
        return "?"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--processes", default="1,2,4", help="listener process counts for the scale-out run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    counts = [int(n) for n in args.processes.split(",") if n]
    zname, zurl = scratch_database("bench_zerfaux")
    pname, purl = scratch_database("bench_procrastinate")
    qname, qurl = scratch_database("bench_procrastinate_defaults")
    try:
        migrate(zurl)
        zerfaux_rate = await zerfaux_throughput(zurl, args.jobs, args.concurrency)
        procrastinate_rate = await procrastinate_throughput(purl, args.jobs, args.concurrency,
                                                            PROCRASTINATE_RECOMMENDED)
        procrastinate_default = await procrastinate_throughput(qurl, args.jobs, args.concurrency,
                                                               PROCRASTINATE_DEFAULTS)
        latencies = await zerfaux_latency(zurl, args.latency_samples, args.concurrency)
        by_source = await source_latencies(zurl, args.latency_samples // 2, sweep_seconds=1.0)
        scaled = {n: scale_out(zurl, args.jobs, args.concurrency, n) for n in counts}
    finally:
        drop_database(zname)
        drop_database(pname)
        drop_database(qname)

    load = os.getloadavg()
    print(f"jobs: {args.jobs} no-op, concurrency {args.concurrency}, one worker process each, same Postgres"
          f" server; load average {load[0]:.1f} on {os.cpu_count()} cores")
    print(f"zerfaux        {zerfaux_rate:9.0f} jobs/s")
    print(f"procrastinate  {procrastinate_rate:9.0f} jobs/s  procrastinate {procrastinate_version()},"
          f" concurrency={args.concurrency}, async task, "
          + ", ".join(f"{k}={v!r}" for k, v in PROCRASTINATE_RECOMMENDED.items()) + " (as its docs recommend)")
    print(f"procrastinate  {procrastinate_default:9.0f} jobs/s  same, its defaults (delete_jobs='never')")
    for n, rate in scaled.items():
        print(f"zerfaux x{n} processes {rate:7.0f} jobs/s total (bench/dispatch_worker.py, concurrency"
              f" {args.concurrency} each)")
    print(f"commit-to-claim (NOTIFY, idle listener, {len(latencies)} single inserts): "
          f"p50 {percentile(latencies, 50):.1f} ms  p99 {percentile(latencies, 99):.1f} ms")
    print("\n".join(source_report(by_source, 1.0)))
    print(f"RATIO {zerfaux_rate / procrastinate_rate:.2f} dispatch throughput, one Zerfaux process vs one"
          " procrastinate worker as its docs recommend, same concurrency and jobs")


if __name__ == "__main__":
    asyncio.run(main())
