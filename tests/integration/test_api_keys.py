"""The server key on the wire (issue 16, section 3), against the gateway rules of the fakes
(tests/fakes/keys.py): an sb_secret_ key travels only as ``apikey``, the legacy JWT as
``apikey`` and bearer token, and a key the gateway would not take gets nowhere."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from listener.sources.realtime import RealtimeSource
from listener.store import StoreUnavailable
from listener.store_postgrest import PostgrestStore
from tests.fakes.supabase import FakeSupabase
from tests.support.engine import eventually
from tests.support.hints import Hints
from tests.support.pg import Database


@pytest.fixture
def fake(seeded_db: Database) -> Iterator[FakeSupabase]:
    with FakeSupabase(seeded_db.url) as supabase:
        yield supabase


async def test_a_secret_key_goes_in_apikey_only_and_works(fake: FakeSupabase) -> None:
    store = PostgrestStore(fake.url, fake.keys.secret_key, retry_seconds=2.0)
    await store.open()
    try:
        assert (await store.queue_state()).queued == 0
        assert await store.claim("w-secret", 1, 30.0) == []
    finally:
        await store.close()
    assert fake.faults.credentials and set(fake.faults.credentials) == {(fake.keys.secret_key, None)}


async def test_the_legacy_service_role_jwt_goes_as_apikey_and_bearer(fake: FakeSupabase) -> None:
    store = PostgrestStore(fake.url, fake.key, retry_seconds=2.0)
    await store.open()
    try:
        assert (await store.queue_state()).queued == 0
    finally:
        await store.close()
    assert set(fake.faults.credentials) == {(fake.key, f"Bearer {fake.key}")}


async def test_the_gateway_refuses_a_secret_key_as_bearer_or_from_a_browser(fake: FakeSupabase) -> None:
    key = fake.keys.secret_key
    async with httpx.AsyncClient(base_url=fake.url, headers={"Content-Profile": "zerfaux"}) as client:
        ok = await client.post("/rest/v1/rpc/queue_state", headers={"apikey": key}, json={})
        bearer = await client.post("/rest/v1/rpc/queue_state", headers={"apikey": key, "Authorization": f"Bearer {key}"}, json={})
        browser = await client.post("/rest/v1/rpc/queue_state", headers={"apikey": key, "User-Agent": "Mozilla/5.0"}, json={})
        none = await client.post("/rest/v1/rpc/queue_state", json={})
    assert ok.status_code == 200 and (bearer.status_code, browser.status_code, none.status_code) == (401, 401, 401)


async def test_a_publishable_key_reaches_nothing_of_the_engine(fake: FakeSupabase) -> None:
    with pytest.raises(StoreUnavailable, match="refused the key"):
        store = PostgrestStore(fake.url, fake.keys.publishable_key, retry_seconds=0.5)
        await store.open()
        try:
            await store.claim("w-anon", 1, 30.0)
        finally:
            await store.close()


async def test_realtime_with_a_secret_key_sends_no_access_token(seeded_db: Database, fake: FakeSupabase) -> None:
    hints = Hints()
    source = RealtimeSource(fake.url, fake.keys.secret_key, hints.wake, hints.poke, max_backoff=0.2,
                            subscribe_timeout=2.0, check_seconds=0.2, wakeups="changes")
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.connected)
        seeded_db.sql("update vcenters set sync_requested_at = now() where site = 'primary'")
        await eventually(lambda: hints.wakes == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert fake.realtime.join_payloads and all("access_token" not in p for p in fake.realtime.join_payloads)
