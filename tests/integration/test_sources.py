"""LISTEN/NOTIFY and the sweep: each only wakes the dispatcher, and each recovers by itself."""

from __future__ import annotations

import asyncio
import time

from listener.sources.notify import NotifySource
from listener.sources.sweep import SweepSource
from listener.store_pg import PostgresStore
from tests.integration.conftest import PRIMARY
from tests.support.engine import engine_settings, eventually, running
from tests.support.pg import Database


async def test_notify_wakes_an_idle_listener_long_before_the_sweep(world: Database) -> None:
    async with running(engine_settings(world.url, ZERFAUX_SWEEP_SECONDS="60")) as listener:
        notify = next(s for s in listener.sources if s.name == "notify")
        await eventually(lambda: notify.connected)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
        await eventually(lambda: world.value("select last_synced_at from vcenters where id = %s", (PRIMARY,)), timeout=10)
        assert time.monotonic() - started < 10  # the sweep alone would take 60 s


async def test_notify_reconnects_after_its_connection_is_killed_and_sweeps(world: Database) -> None:
    woken: list[float] = []
    source = NotifySource(world.url, lambda: woken.append(time.monotonic()), lambda: None, max_backoff=0.5)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.connected)
        first_wakes = len(woken)  # one wake on connect: cover what was missed
        assert first_wakes == 1
        killed = world.value("select count(pg_terminate_backend(pid)) from pg_stat_activity"
                             " where datname = current_database() and query ilike 'listen%%'")
        assert killed == 1
        await eventually(lambda: len(woken) >= 2, timeout=15)  # reconnected, swept
        assert source.connected
        world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
        await eventually(lambda: len(woken) >= 3, timeout=10)  # and hears new work again
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_sweep_wakes_and_prunes_old_finished_operations(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update zerfaux.operations set status = 'succeeded', finished_at = now() - interval '31 days'")
    store = PostgresStore(world.url)
    await store.open()
    woken: list[int] = []
    try:
        await SweepSource(store, lambda: woken.append(1), 60, retention_days=30).sweep_once()
    finally:
        await store.close()
    assert woken == [1]
    assert world.value("select count(*) from zerfaux.operations") == 0
