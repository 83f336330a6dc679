"""The Realtime source against the Realtime fake, fed by real Postgres changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from listener.sources.realtime import RealtimeSource
from tests.fakes.supabase import FakeSupabase
from tests.integration.conftest import GROUP
from tests.support.engine import eventually
from tests.support.hints import Hints
from tests.support.pg import Database


@pytest.fixture
def fake(seeded_db: Database) -> Iterator[FakeSupabase]:
    with FakeSupabase(seeded_db.url) as supabase:
        yield supabase


@asynccontextmanager
async def started(fake: FakeSupabase) -> AsyncIterator[tuple[RealtimeSource, Hints]]:
    hints = Hints()
    source = RealtimeSource(fake.url, fake.key, hints.wake, hints.poke,
                            max_backoff=0.2, subscribe_timeout=2.0, check_seconds=0.2)
    task = asyncio.create_task(source.run())
    try:
        yield source, hints
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not source.connected


def request_sync(db: Database) -> None:
    db.sql("update vcenters set sync_requested_at = now() where site = 'primary'")


async def test_connected_only_once_subscribed_then_every_insert_wakes(seeded_db: Database, fake: FakeSupabase) -> None:
    fake.realtime.subscribed_delay = 1.0
    async with started(fake) as (source, hints):
        await eventually(lambda: fake.realtime.joins >= 1)
        await asyncio.sleep(0.5)
        assert not source.connected and hints.wakes == 0
        await eventually(lambda: source.connected, timeout=5)
        assert hints.wakes == 1  # the wake that covers the time before the subscription
        request_sync(seeded_db)
        await eventually(lambda: hints.wakes == 2)
        assert fake.realtime.events_sent == 1 and hints.pokes == 0


async def test_a_cancel_request_on_a_running_job_pokes(seeded_db: Database, fake: FakeSupabase) -> None:
    job = seeded_db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    seeded_db.sql("update replication_jobs set status = 'running' where id = %s", (job,))
    async with started(fake) as (source, hints):
        await eventually(lambda: source.connected)
        seeded_db.sql("update replication_jobs set bytes_transferred = 10 where id = %s", (job,))
        seeded_db.sql("update replication_jobs set cancel_requested = true where id = %s", (job,))
        await eventually(lambda: hints.pokes == 1)


@pytest.mark.parametrize("how", ["clean", "abrupt"])
async def test_after_a_close_it_resubscribes_and_wakes(seeded_db: Database, fake: FakeSupabase, how: str) -> None:
    async with started(fake) as (source, hints):
        await eventually(lambda: source.connected)
        if how == "clean":
            fake.call(fake.realtime.close_clean)
        else:
            fake.call(fake.realtime.close_abrupt)
        await eventually(lambda: source.reconnects >= 1 and source.connected)
        assert hints.wakes == 2  # one per subscription: the gap is covered
        assert fake.realtime.live_subscriptions == 1
        request_sync(seeded_db)
        await eventually(lambda: hints.wakes == 3)


async def test_a_subscription_error_is_retried_until_it_succeeds(fake: FakeSupabase) -> None:
    fake.realtime.fail_subscribe = True
    async with started(fake) as (source, hints):
        await eventually(lambda: fake.realtime.joins >= 3)
        assert not source.connected and hints.wakes == 0
        fake.realtime.fail_subscribe = False
        await eventually(lambda: source.connected)
        assert hints.wakes == 1


async def test_a_subscription_never_confirmed_times_out_and_retries(fake: FakeSupabase) -> None:
    fake.realtime.subscribed_delay = 3.0  # longer than the source's 2 s subscribe timeout
    async with started(fake) as (source, hints):
        await eventually(lambda: fake.realtime.joins >= 2, timeout=10)
        assert not source.connected
        fake.realtime.subscribed_delay = 0.0
        await eventually(lambda: source.connected, timeout=10)


async def test_a_dropped_event_is_lost_but_the_next_one_arrives(seeded_db: Database, fake: FakeSupabase) -> None:
    async with started(fake) as (source, hints):
        await eventually(lambda: source.connected)
        fake.realtime.drop_events = 1
        request_sync(seeded_db)
        await asyncio.sleep(0.5)
        assert hints.wakes == 1 and fake.realtime.events_sent == 0
        seeded_db.sql("update zerfaux.operations set status = 'succeeded'")
        request_sync(seeded_db)
        await eventually(lambda: hints.wakes == 2)


async def test_a_wrong_key_never_connects(fake: FakeSupabase) -> None:
    hints = Hints()
    source = RealtimeSource(fake.url, "wrong", hints.wake, hints.poke, max_backoff=0.2)
    task = asyncio.create_task(source.run())
    await asyncio.sleep(1.0)
    assert not source.connected and source.reconnects >= 2 and hints.wakes == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_work_given_back_wakes_and_other_updates_do_not(seeded_db: Database, fake: FakeSupabase) -> None:
    async with started(fake) as (source, hints):
        await eventually(lambda: source.connected)
        request_sync(seeded_db)  # the INSERT of an operation
        await eventually(lambda: hints.wakes == 2)
        op = seeded_db.value("select id from zerfaux.operations order by created_at desc limit 1")
        # A listener takes it and renews its lease: UPDATEs that are no work for anyone else.
        seeded_db.sql("update zerfaux.operations set status = 'running', worker_id = 'w1', started_at = now(),"
                      " lease_expires_at = now() + interval '1 minute' where id = %s", (op,))
        seeded_db.sql("update zerfaux.operations set lease_expires_at = now() + interval '2 minutes' where id = %s",
                      (op,))
        await asyncio.sleep(0.5)
        assert hints.wakes == 2 and fake.realtime.events_sent == 1
        # It gives the work back (a graceful shutdown): the UPDATE to 'queued' wakes the others.
        assert seeded_db.value("select zerfaux.release('w1', array[%s]::uuid[])", (op,)) == 1
        await eventually(lambda: hints.wakes == 3)
        assert fake.realtime.events_sent == 2 and hints.pokes == 0
