"""The claim without a global lock: a full key blocks nothing else, max_concurrent stays exact
across claimers racing on one key, and a retried claim gets back what it already holds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest

from listener.store_pg import PostgresStore
from tests.integration.conftest import PRIMARY, TARGET
from tests.support.pg import Database


@pytest.fixture
async def store(world: Database) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(world.url, pool_size=4)
    await s.open()
    yield s
    await s.close()


def many_groups_on_one_target(db: Database, groups: int, max_concurrent: int) -> None:
    """One queued replication job per group (one active job per group is the rule), all of
    them on the seed's target."""
    db.sql("update replication_targets set max_concurrent = %s where id = %s", (max_concurrent, TARGET))
    db.sql("insert into protection_groups (name, source_vcenter_id, dr_vcenter_id, replication_target_id,"
           " source_dataset, protection_datastore)"
           " select 'bulk-' || i, %s, %s, %s, 'tank/bulk' || i, 'ds-' || i from generate_series(1, %s) i",
           (PRIMARY, PRIMARY, TARGET, groups))
    db.sql("insert into replication_jobs (protection_group_id)"
           " select id from protection_groups where name like 'bulk-%%' order by name")


async def test_a_sync_asked_behind_300_replications_for_one_full_target_is_claimed(world: Database, store: PostgresStore) -> None:
    many_groups_on_one_target(world, 300, max_concurrent=1)
    [first] = await store.claim("w1", 8, 30)  # the target takes one at a time
    assert first.kind == "replication.run"
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    claimed = await store.claim("w2", 8, 30)
    # The sync is not behind the 299 queued jobs: the claim sees past a key that is full.
    assert [(op.kind, str(op.subject_id)) for op in claimed] == [("vcenter.sync", PRIMARY)]
    assert world.value("select count(*) from zerfaux.operations where kind = 'replication.run'"
                       " and status = 'running'") == 1


async def test_claimers_racing_on_one_key_never_exceed_max_concurrent(world: Database) -> None:
    many_groups_on_one_target(world, 60, max_concurrent=3)
    stores = [PostgresStore(world.url, pool_size=2) for _ in range(8)]
    await asyncio.gather(*(s.open() for s in stores))
    peak = 0
    finished = 0
    try:
        async def worker(i: int) -> None:
            nonlocal peak, finished
            for _ in range(40):
                got = await stores[i].claim(f"w{i}", 3, 30)
                running = world.value("select count(*) from zerfaux.operations where status = 'running'")
                peak = max(peak, running)
                done = await stores[i].complete_many(f"w{i}", [(op.id, {"snapshot_name": "s"}) for op in got])
                finished += sum(1 for ok, _ in done.values() if ok)
                await asyncio.sleep(0)

        await asyncio.gather(*(worker(i) for i in range(len(stores))))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert peak <= 3
    # Every claim and completion counted once: what the workers saw matches the rows.
    assert finished == world.value("select count(*) from replication_jobs where status = 'completed'")
    assert finished > 3


def test_two_claimers_in_open_transactions_on_one_key_take_one_slot_between_them(world: Database) -> None:
    """The key's try-lock: the second claimer, while the first has not committed, takes nothing
    of that key (rather than a second slot); after the commit it sees the key full."""
    many_groups_on_one_target(world, 5, max_concurrent=1)
    with psycopg.connect(world.url) as a, psycopg.connect(world.url) as b:
        got_a = a.execute("select id from zerfaux.claim('a', 5, 30)").fetchall()
        got_b = b.execute("select id from zerfaux.claim('b', 5, 30)").fetchall()
        assert len(got_a) == 1 and got_b == []
        a.commit()
        b.rollback()
        assert b.execute("select id from zerfaux.claim('b', 5, 30)").fetchall() == []
        b.commit()
    assert world.value("select count(*) from zerfaux.operations where status = 'running'") == 1


def test_a_retried_claim_gets_its_lost_batch_back_without_a_new_attempt(world: Database) -> None:
    many_groups_on_one_target(world, 4, max_concurrent=10)
    first = {r["id"]: r for r in world.sql("select id, attempts from zerfaux.claim('w', 3, 30, '{}'::uuid[])")}
    assert len(first) == 3 and {r["attempts"] for r in first.values()} == {1}
    # The answer was lost: the same worker, knowing it holds nothing, asks again.
    again = {r["id"]: r for r in world.sql("select id, attempts from zerfaux.claim('w', 3, 30, '{}'::uuid[])")}
    assert again == first
    assert world.value("select max(attempts) from zerfaux.operations") == 1
    assert world.value("select max(attempts) from replication_jobs") == 1
    # Knowing what it holds, it gets only new work.
    held = list(first)
    [new] = world.sql("select id, attempts from zerfaux.claim('w', 3, 30, %s::uuid[])", (held,))
    assert new["id"] not in first and new["attempts"] == 1
    assert world.value("select count(*) from zerfaux.operations where status = 'running' and worker_id = 'w'") == 4


def test_another_workers_operations_are_never_handed_back(world: Database) -> None:
    many_groups_on_one_target(world, 2, max_concurrent=10)
    world.sql("select * from zerfaux.claim('a', 1, 30)")
    got = world.sql("select id from zerfaux.claim('b', 5, 30, %s::uuid[])", ([str(uuid.uuid4())],))
    assert len(got) == 1
    assert world.value("select count(distinct worker_id) from zerfaux.operations where status = 'running'") == 2
