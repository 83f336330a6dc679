"""The claim, leases and ownership, against real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from listener.store_pg import PostgresStore
from tests.integration.conftest import GROUP, PRIMARY, TARGET, add_groups, queue_jobs
from tests.support.pg import Database


@pytest.fixture
async def store(world: Database) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(world.url, pool_size=6)
    await s.open()
    yield s
    await s.close()


def expire_leases(db: Database) -> None:
    db.sql("update zerfaux.operations set lease_expires_at = now() - interval '1 second' where status = 'running'")


async def test_two_workers_racing_for_one_row_one_wins(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    stores = [PostgresStore(world.url, pool_size=2) for _ in range(8)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        results = await asyncio.gather(*(s.claim(f"w{i}", 5, 30) for i, s in enumerate(stores)))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    winners = [i for i, claimed in enumerate(results) if claimed]
    assert len(winners) == 1 and len(results[winners[0]]) == 1
    assert world.value("select worker_id from zerfaux.operations") == f"w{winners[0]}"


async def test_many_rows_many_workers_each_claimed_once(world: Database, store: PostgresStore) -> None:
    world.sql("insert into replication_targets (name, ssh_host, target_root, max_concurrent)"
              " values ('wide', 'h', 'tank/r', 1000)")
    groups = add_groups(world, 200)
    world.sql("update protection_groups set replication_target_id = (select id from replication_targets where name = 'wide')")
    queue_jobs(world, groups)
    stores = [PostgresStore(world.url, pool_size=2) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        claimed: list[list[str]] = [[] for _ in stores]

        async def worker(i: int) -> None:
            while True:
                got = await stores[i].claim(f"w{i}", 7, 30)
                if not got:
                    return
                claimed[i].extend(str(op.id) for op in got)

        await asyncio.gather(*(worker(i) for i in range(len(stores))))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    every = [op for ops in claimed for op in ops]
    assert len(every) == 200 and len(set(every)) == 200
    assert world.value("select count(*) from zerfaux.operations where status = 'running'") == 200


async def test_claim_hands_the_handler_its_rows(world: Database, store: PostgresStore) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    [op] = await store.claim("w1", 10, 30)
    assert op.kind == "replication.run" and op.attempts == 1
    assert op.payload is not None
    assert op.payload["target"]["id"] == TARGET and op.payload["group"]["id"] == GROUP
    assert op.payload["job"]["status"] == "running"
    assert world.value("select status from replication_jobs") == "running"


async def test_an_expired_lease_is_taken_over_and_the_old_worker_writes_nothing(world: Database, store: PostgresStore) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    [first] = await store.claim("dead", 10, 30)
    assert await store.claim("other", 10, 30) == []  # held
    expire_leases(world)
    [second] = await store.claim("other", 10, 30)
    assert second.id == first.id and second.attempts == 2
    # the first worker comes back from the dead: every write is refused
    assert await store.heartbeat("dead", [first.id], 30) == {}
    assert await store.progress(first.id, "dead", {"x": 1}) == "lost"
    assert (await store.complete_many("dead", [(first.id, {"vms": [], "datastores": []})]))[first.id][0] is False
    assert await store.fail(first.id, "dead", "boom", True, 0) == "lost"
    assert world.value("select last_synced_at from vcenters where id = %s", (PRIMARY,)) is None
    assert (await store.complete_many("other", [(second.id, {"vms": [], "datastores": []})]))[second.id][0] is True
    assert world.value("select status from zerfaux.operations") == "succeeded"


async def test_a_dead_worker_on_the_last_attempt_fails_the_operation(world: Database, store: PostgresStore) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update zerfaux.operations set max_attempts = 1")
    await store.claim("dead", 10, 30)
    expire_leases(world)
    assert await store.claim("other", 10, 30) == []
    row = world.one("select status, last_error from zerfaux.operations")
    assert row["status"] == "failed" and "stopped responding" in row["last_error"]
    assert "stopped responding" in world.value("select last_sync_error from vcenters where id = %s", (PRIMARY,))


async def test_one_operation_per_subject_at_a_time(world: Database, store: PostgresStore) -> None:
    vm = world.value("insert into vcenter_vms (vcenter_id, moref, name) values (%s, 'vm-1', 'a') returning id", (PRIMARY,))
    world.sql("insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion, needs_dr_shell)"
              " values (%s, %s, true, true)", (GROUP, vm))
    first = await store.claim("w1", 10, 30)
    assert len(first) == 1
    assert await store.claim("w2", 10, 30) == []
    assert (await store.complete_many("w1", [(first[0].id, {"datastore": "zfs-protect-01"})]))[first[0].id][0]
    second = await store.claim("w2", 10, 30)
    assert len(second) == 1 and second[0].kind != first[0].kind


async def test_max_concurrent_per_target_is_respected(world: Database, store: PostgresStore) -> None:
    world.sql("update replication_targets set max_concurrent = 2")
    queue_jobs(world, add_groups(world, 5))
    assert len(await store.claim("w1", 10, 30)) == 2
    assert await store.claim("w2", 10, 30) == []
    world.sql("update replication_targets set max_concurrent = 3")
    assert len(await store.claim("w2", 10, 30)) == 1


async def test_fail_retries_then_gives_up_after_max_attempts(world: Database, store: PostgresStore) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update zerfaux.operations set max_attempts = 2")
    [op] = await store.claim("w", 1, 30)
    assert await store.fail(op.id, "w", "vCenter unreachable", False, 60) == "retrying"
    row = world.one("select status, run_after > now() + interval '50 seconds' as later from zerfaux.operations")
    assert row == {"status": "queued", "later": True}
    assert "retrying" in world.value("select last_sync_error from vcenters where id = %s", (PRIMARY,))
    assert await store.claim("w", 1, 30) == []  # not due yet
    world.sql("update zerfaux.operations set run_after = now()")
    [op] = await store.claim("w", 1, 30)
    assert await store.fail(op.id, "w", "vCenter unreachable", False, 60) == "failed"
    assert world.value("select last_error from zerfaux.operations") == "failed after 2 attempts: vCenter unreachable"


async def test_release_gives_work_back_without_counting_the_attempt(world: Database, store: PostgresStore) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    [op] = await store.claim("leaving", 1, 30)
    assert await store.release("leaving", [op.id]) == 1
    row = world.one("select o.status, o.attempts, j.status as job from zerfaux.operations o"
                    " join replication_jobs j on j.id = o.subject_id")
    assert row == {"status": "queued", "attempts": 0, "job": "pending"}
    [again] = await store.claim("staying", 1, 30)
    assert again.id == op.id and again.attempts == 1


async def test_prune_removes_only_old_finished_operations(world: Database, store: PostgresStore) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update zerfaux.operations set status = 'succeeded', finished_at = now() - interval '40 days'"
              " where subject_id = %s", (PRIMARY,))
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    assert await store.prune(30) == 1
    assert [r["kind"] for r in world.sql("select kind from zerfaux.operations")] == ["replication.run"]


async def test_a_dr_shell_waits_for_the_storage_vmotion_of_its_vm(world: Database, store: PostgresStore) -> None:
    vm = world.value("insert into vcenter_vms (vcenter_id, moref, name) values (%s, 'vm-1', 'a') returning id", (PRIMARY,))
    # the DR shell is asked first, the vMotion a moment later: the vMotion still goes first
    pvm = world.value("insert into protected_vms (protection_group_id, vm_id, needs_dr_shell) values (%s, %s, true)"
                      " returning id", (GROUP, vm))
    world.sql("update protected_vms set needs_storage_vmotion = true where id = %s", (pvm,))
    [first] = await store.claim("w", 10, 30)
    assert first.kind == "vm.storage_vmotion"
    assert await store.fail(first.id, "w", "vCenter busy", False, 3600) == "retrying"
    assert await store.claim("w", 10, 30) == []  # the retry is not due: the shell still waits
    world.sql("update zerfaux.operations set run_after = now() where id = %s", (first.id,))
    [again] = await store.claim("w", 10, 30)
    assert again.id == first.id
    assert (await store.complete_many("w", [(again.id, {"datastore": "zfs-protect-01"})]))[again.id][0]
    [shell] = await store.claim("w", 10, 30)
    assert shell.kind == "vm.dr_shell"
