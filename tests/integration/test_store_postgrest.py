"""The PostgREST store against the PostgREST fake, which calls the real SQL functions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from listener.store import StoreUnavailable
from listener.store_postgrest import PostgrestStore
from tests.fakes.supabase import FakeSupabase
from tests.support.pg import Database


@pytest.fixture
def fake(db: Database) -> Iterator[FakeSupabase]:
    with FakeSupabase(db.url) as supabase:
        yield supabase


@pytest.fixture
async def store(fake: FakeSupabase) -> AsyncIterator[PostgrestStore]:
    store = PostgrestStore(fake.url, fake.key, retry_seconds=5.0)
    await store.open()
    yield store
    await store.close()


def _request_sync(db: Database) -> str:
    return str(db.value(
        "insert into public.vcenters (name, host, username, password_secret, sync_requested_at)"
        " values ('vc', 'vc.example', 'u', 'vc-pw', now()) returning id"))


async def test_a_sync_claimed_and_completed_writes_the_inventory_in_one_call(db: Database, store: PostgrestStore) -> None:
    vcenter = _request_sync(db)
    [op] = await store.claim("w1", 4, 30.0)
    assert (op.kind, str(op.subject_id), op.attempts) == ("vcenter.sync", vcenter, 1)
    assert op.payload is not None and op.payload["vcenter"]["name"] == "vc"
    assert await store.heartbeat("w1", [op.id], 30.0) == {op.id: False}
    assert await store.progress(op.id, "w1", {"step": "listing"}) == "ok"
    inventory = {"vms": [{"moref": f"vm-{i}", "name": f"vm{i}", "disks": [], "num_cpu": 2} for i in range(300)],
                 "datastores": [{"moref": "ds-1", "name": "ds1", "capacity_bytes": 100, "free_bytes": 25}]}
    assert await store.complete_many("w1", [(op.id, inventory)]) == {op.id: (True, None)}
    assert db.value("select count(*) from public.vcenter_vms where vcenter_id = %s", (vcenter,)) == 300
    assert db.value("select used_percent from public.vcenter_datastores") == 75
    assert db.value("select status from zerfaux.operations where id = %s", (op.id,)) == "succeeded"
    state = await store.queue_state()
    assert (state.queued, state.running, state.next_run_after) == (0, 0, None)


async def test_a_worker_that_lost_its_lease_writes_nothing(db: Database, store: PostgrestStore) -> None:
    _request_sync(db)
    [op] = await store.claim("w1", 1, 30.0)
    assert await store.heartbeat("w2", [op.id], 30.0) == {}
    assert await store.progress(op.id, "w2", {}) == "lost"
    assert await store.complete_many("w2", [(op.id, {"vms": []})]) == {op.id: (False, None)}
    assert await store.fail(op.id, "w2", "boom", False, 1.0) == "lost"
    assert not await store.finish_cancelled(op.id, "w2", "no")


async def test_fail_retries_then_release_and_queue_state_carry_a_datetime(db: Database, store: PostgrestStore) -> None:
    _request_sync(db)
    [op] = await store.claim("w1", 1, 30.0)
    assert await store.fail(op.id, "w1", "vCenter timed out", False, 60.0) == "retrying"
    state = await store.queue_state()
    assert state.queued == 1 and state.runnable == 0
    assert state.next_run_after is not None and state.next_run_after.tzinfo is not None
    assert db.value("select last_sync_error from public.vcenters") .startswith("attempt 1 failed, next attempt at ")
    db.sql("update zerfaux.operations set run_after = now()")
    [again] = await store.claim("w1", 1, 30.0)
    assert await store.release("w1", [again.id]) == 1
    assert db.value("select status from zerfaux.operations") == "queued"
    assert await store.prune(0.0) == 0


async def test_vault_secret_is_none_without_vault_and_read_where_vault_exists(db: Database, store: PostgrestStore) -> None:
    assert await store.vault_secret("vc-pw") is None
    db.sql("create schema vault; create view vault.decrypted_secrets as"
           " select 'vc-pw'::text as name, 's3cret'::text as decrypted_secret")
    assert await store.vault_secret("vc-pw") == "s3cret"
    assert await store.vault_secret("other") is None


async def test_gateway_errors_are_ridden_out(db: Database, fake: FakeSupabase, store: PostgrestStore) -> None:
    fake.faults.unavailable = 3
    assert (await store.queue_state()).queued == 0
    assert fake.faults.unavailable == 0


async def test_a_database_that_stays_away_becomes_store_unavailable(fake: FakeSupabase) -> None:
    store = PostgrestStore(fake.url, fake.key, retry_seconds=0.5)
    await store.open()
    try:
        fake.faults.unavailable = 1000
        with pytest.raises(StoreUnavailable, match="does not answer"):
            await store.claim("w1", 1, 30.0)
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()


async def test_a_wrong_key_or_a_dead_url_is_named_at_open(fake: FakeSupabase) -> None:
    with pytest.raises(StoreUnavailable, match="does not answer"):
        await PostgrestStore(fake.url, "not-the-key").open()
    with pytest.raises(StoreUnavailable, match="does not answer"):
        await PostgrestStore("http://127.0.0.1:9", fake.key, retry_seconds=0.2).open()


async def test_the_engine_functions_refuse_anon(fake: FakeSupabase) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{fake.url}/rest/v1/rpc/claim", headers={
            "apikey": fake.key, "Content-Profile": "zerfaux"},
            json={"p_worker": "x", "p_limit": 1, "p_lease_seconds": 1})
    assert answer.status_code == 401 and answer.json()["code"] == "42501"
