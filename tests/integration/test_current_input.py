"""zerfaux.current_input through both stores: a running attempt reads its rows again (a target's limit)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from listener.store import Store
from listener.store_pg import PostgresStore
from listener.store_postgrest import PostgrestStore
from tests.fakes.supabase import FakeSupabase
from tests.integration.conftest import GROUP, TARGET
from tests.support.pg import Database


@pytest.fixture(params=["postgres", "postgrest"])
async def store(request: pytest.FixtureRequest, world: Database) -> AsyncIterator[Store]:
    if request.param == "postgres":
        pg = PostgresStore(world.url, pool_size=2, retry_seconds=5.0)
        await pg.open()
        yield pg
        await pg.close()
        return
    with FakeSupabase(world.url) as fake:
        rest = PostgrestStore(fake.url, fake.key, retry_seconds=5.0)
        await rest.open()
        yield rest
        await rest.close()


async def test_a_running_attempt_reads_its_target_row_as_it_is_now(world: Database, store: Store) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    [op] = await store.claim("w1", 4, 30.0)
    assert op.kind == "replication.run" and op.payload is not None
    assert op.payload["target"]["bandwidth_limit_mbps"] is None
    world.sql("update replication_targets set bandwidth_limit_mbps = 12.5 where id = %s", (TARGET,))
    now = await store.current_input(op.id, "w1")
    assert now is not None and float(now["target"]["bandwidth_limit_mbps"]) == 12.5
    assert now["job"]["id"] == op.payload["job"]["id"]
    assert await store.current_input(op.id, "w2") is None  # not this worker's: nothing to read
