"""A sync asked while a sync runs runs again after it; a batch of 200 completions is one call
with one subtransaction, correct item by item."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from listener.store_pg import PostgresStore
from tests.integration.conftest import PRIMARY, operations
from tests.integration.test_claim_fairness import many_groups_on_one_target
from tests.support.pg import Database

INVENTORY: dict[str, list[object]] = {"vms": [], "datastores": []}


@pytest.fixture
async def store(world: Database) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(world.url, pool_size=2)
    await s.open()
    yield s
    await s.close()


def ask_sync(db: Database) -> None:
    db.sql("update vcenters set sync_requested_at = clock_timestamp() where id = %s", (PRIMARY,))


async def test_a_sync_asked_while_one_runs_runs_again_after_it(world: Database, store: PostgresStore) -> None:
    ask_sync(world)
    [first] = await store.claim("w", 4, 30)
    ask_sync(world)  # while it runs: its input may predate the request
    ask_sync(world)  # twice: still one more run, not two
    assert [o["status"] for o in operations(world, "vcenter.sync")] == ["running"]
    assert world.value("select rerun_requested from zerfaux.operations") is True
    assert (await store.complete_many("w", [(first.id, INVENTORY)]))[first.id] == (True, None)
    assert [o["status"] for o in operations(world, "vcenter.sync")] == ["succeeded", "queued"]
    [second] = await store.claim("w", 4, 30)
    assert second.kind == "vcenter.sync" and second.id != first.id and second.attempts == 1
    assert (await store.complete_many("w", [(second.id, INVENTORY)]))[second.id] == (True, None)
    assert [o["status"] for o in operations(world, "vcenter.sync")] == ["succeeded", "succeeded"]


async def test_a_sync_asked_while_one_is_queued_is_the_same_sync(world: Database, store: PostgresStore) -> None:
    ask_sync(world)
    ask_sync(world)
    [op] = operations(world, "vcenter.sync")
    assert op["status"] == "queued" and op["rerun_requested"] is False


async def test_a_rerun_asked_before_a_final_failure_still_runs(world: Database, store: PostgresStore) -> None:
    ask_sync(world)
    [first] = await store.claim("w", 4, 30)
    ask_sync(world)
    assert await store.fail(first.id, "w", "bad password", True, 0) == "failed"
    assert [o["status"] for o in operations(world, "vcenter.sync")] == ["failed", "queued"]


async def test_a_retry_serves_a_rerun_asked_meanwhile(world: Database, store: PostgresStore) -> None:
    ask_sync(world)
    [first] = await store.claim("w", 4, 30)
    ask_sync(world)
    assert await store.fail(first.id, "w", "timeout", False, 0) == "retrying"
    world.sql("update zerfaux.operations set run_after = now()")
    [again] = await store.claim("w", 4, 30)
    assert again.id == first.id
    assert (await store.complete_many("w", [(again.id, INVENTORY)]))[again.id] == (True, None)
    assert [o["status"] for o in operations(world, "vcenter.sync")] == ["succeeded"]


async def test_200_completions_in_one_call_are_all_written(world: Database, store: PostgresStore) -> None:
    many_groups_on_one_target(world, 200, max_concurrent=200)
    claimed = await store.claim("w", 200, 30)
    assert len(claimed) == 200
    items = [(op.id, {"snapshot_name": f"zerfaux-{i}", "bytes_transferred": i}) for i, op in enumerate(claimed)]
    answers = await store.complete_many("w", items)
    assert answers == {op.id: (True, None) for op in claimed}
    rows = {r["id"]: r for r in world.sql("select id, status, snapshot_name, bytes_transferred from replication_jobs")}
    for i, op in enumerate(claimed):
        assert rows[op.subject_id] == {"id": op.subject_id, "status": "completed",
                                       "snapshot_name": f"zerfaux-{i}", "bytes_transferred": i}
    assert world.value("select count(*) from zerfaux.operations where status = 'succeeded'") == 200


async def test_one_bad_item_fails_alone_and_the_rest_are_written(world: Database, store: PostgresStore) -> None:
    many_groups_on_one_target(world, 100, max_concurrent=100)
    claimed = await store.claim("w", 100, 30)
    items = [(op.id, {"snapshot_name": "s", "bytes_transferred": 1}) for op in claimed]
    items[37] = (claimed[37].id, {"bytes_transferred": "lots"})  # not a number: the write fails
    stranger = uuid4()
    answers = await store.complete_many("w", [*items, (stranger, {})])
    assert answers[stranger] == (False, None)  # not held by this worker
    bad = answers.pop(claimed[37].id)
    assert bad[0] is False and bad[1] is not None and "bigint" in bad[1]
    assert all(answers[op.id] == (True, None) for i, op in enumerate(claimed) if i != 37)
    assert world.value("select count(*) from replication_jobs where status = 'completed'") == 99
    assert world.value("select status from zerfaux.operations where id = %s", (claimed[37].id,)) == "running"


def test_items_that_cannot_be_read_are_answered_not_fatal(world: Database) -> None:
    rows = world.sql("select id, done, error from zerfaux.complete_many('w', %s::jsonb)",
                     ('[{"id": "not-a-uuid", "result": {}}, {"result": {}}]',))
    assert [r["done"] for r in rows] == [False, False]
    assert all('"id" must be a uuid' in r["error"] for r in rows)
