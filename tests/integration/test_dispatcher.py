"""The dispatcher end to end on real Postgres, with stub backends or handlers made to misbehave."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from handlers import PermanentError, TransientError
from handlers.context import OperationContext
from listener.dispatcher import DispatchSettings, Dispatcher
from listener.service import make_store
from listener.store import Store
from tests.integration.conftest import GROUP, PRIMARY, protect
from tests.support.engine import drain, engine_settings, eventually, running
from tests.support.pg import Database


async def test_every_kind_converges_with_stub_backends(world: Database, store_env: dict[str, str]) -> None:
    world.sql("update vcenters set sync_requested_at = now()")
    await drain(engine_settings(world.url, ZERFAUX_STUB_VMS="30", **store_env))
    assert world.value("select count(*) from vcenter_vms where removed_at is null") == 60
    assert world.value("select count(*) from vcenters where last_synced_at >= sync_requested_at") == 2

    vm = world.value("select id from vcenter_vms where name = 'vc-primary-vm-0001'")
    pvm = protect(world, vm, needs_storage_vmotion=True)
    job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    await drain(engine_settings(world.url, **store_env))
    world.sql("update protected_vms set needs_dr_shell = true where id = %s", (pvm,))
    await drain(engine_settings(world.url, **store_env))

    row = world.one("select p.*, v.datastore, v.disks from protected_vms p join vcenter_vms v on v.id = p.vm_id where p.id = %s", (pvm,))
    assert not row["needs_storage_vmotion"] and row["datastore"] == "zfs-protect-01"
    assert all(d["file"].startswith("[zfs-protect-01] ") for d in row["disks"])
    assert row["dr_shell_vm_created"] and row["dr_shell_vm_id"].startswith("vm-") and row["last_error"] is None
    job_row = world.one("select * from replication_jobs where id = %s", (job,))
    assert job_row["status"] == "completed" and job_row["bytes_transferred"] == job_row["bytes_estimated"] > 0
    assert job_row["snapshot_name"].startswith("zerfaux_") and job_row["completed_at"] is not None
    assert world.value("select count(*) from zerfaux.operations where status <> 'succeeded'") == 0


async def test_a_second_replication_is_incremental_from_the_first(world: Database) -> None:
    for _ in range(2):
        world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        await drain(engine_settings(world.url))
    first, second = world.sql("select * from replication_jobs order by completed_at")
    assert first["base_snapshot"] is None
    assert second["base_snapshot"] == first["snapshot_name"]
    assert second["bytes_transferred"] < first["bytes_transferred"] / 10


async def test_a_vcenter_sync_marks_vms_no_longer_seen(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    await drain(engine_settings(world.url, ZERFAUX_STUB_VMS="10"))
    world.sql("update vcenters set sync_requested_at = now() + interval '1 minute' where id = %s", (PRIMARY,))
    await drain(engine_settings(world.url, ZERFAUX_STUB_VMS="7"))
    assert world.value("select count(*) from vcenter_vms where removed_at is null") == 7
    assert world.value("select count(*) from vcenter_vms where removed_at is not null") == 3


async def test_a_job_whose_group_has_no_target_fails_saying_what_to_fix(world: Database) -> None:
    world.sql("update protection_groups set replication_target_id = null")
    job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    await drain(engine_settings(world.url))
    row = world.one("select status, error from replication_jobs where id = %s", (job,))
    assert row["status"] == "failed"
    assert "set protection_groups.replication_target_id" in row["error"]
    assert world.value("select attempts from zerfaux.operations") == 1


async def test_an_unknown_kind_fails_naming_the_kinds_it_knows(world: Database) -> None:
    world.sql("insert into zerfaux.operations (kind, subject_id) values ('vm.teleport', gen_random_uuid())")
    await drain(engine_settings(world.url))
    row = world.one("select status, last_error, attempts from zerfaux.operations")
    assert row["status"] == "failed" and row["attempts"] == 1
    assert "unknown operation kind 'vm.teleport'" in row["last_error"] and "vcenter.sync" in row["last_error"]


# --- handlers made to misbehave -----------------------------------------------------------------

class Scripted:
    """A handler whose attempts fail as told, then succeed; counts its calls."""

    kind = "vcenter.sync"

    def __init__(self, errors: list[Exception], delay: float = 0.0) -> None:
        self.errors = errors
        self.calls = 0
        self.delay = delay

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.errors:
            raise self.errors.pop(0)
        return {"vms": [], "datastores": []}


@contextlib.asynccontextmanager
async def dispatcher_for(db: Database, handler: Any, store_env: dict[str, str] | None = None,
                         **overrides: Any) -> AsyncIterator[tuple[Dispatcher, Store]]:
    store = make_store(engine_settings(db.url, **(store_env or {})))
    await store.open()
    settings = DispatchSettings(**{"worker_id": "test-worker", "lease_seconds": 5.0, "idle_seconds": 0.2,
                                   "retry_base_seconds": 0.05, "retry_max_seconds": 0.2, **overrides})
    try:
        yield Dispatcher(store, {handler.kind: handler}, settings), store
    finally:
        await store.close()


async def test_transient_errors_are_retried_with_backoff_until_success(world: Database, store_env: dict[str, str]) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    handler = Scripted([TransientError("vCenter timed out"), RuntimeError("socket closed")])
    async with dispatcher_for(world, handler, store_env) as (dispatcher, _):
        await asyncio.wait_for(dispatcher.run(until_idle=True), 30)
    assert handler.calls == 3
    row = world.one("select status, attempts from zerfaux.operations")
    assert row == {"status": "succeeded", "attempts": 3}
    assert world.value("select last_sync_error from vcenters where id = %s", (PRIMARY,)) is None


async def test_retries_stop_at_max_attempts_with_the_last_error(world: Database, store_env: dict[str, str]) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update zerfaux.operations set max_attempts = 3")
    handler = Scripted([TransientError(f"timeout {i}") for i in range(10)])
    async with dispatcher_for(world, handler, store_env) as (dispatcher, _):
        await asyncio.wait_for(dispatcher.run(until_idle=True), 30)
    assert handler.calls == 3
    assert world.value("select last_sync_error from vcenters where id = %s", (PRIMARY,)) == "failed after 3 attempts: timeout 2"


async def test_a_permanent_error_fails_at_once(world: Database, store_env: dict[str, str]) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    handler = Scripted([PermanentError("authentication failed for admin@vc")])
    async with dispatcher_for(world, handler, store_env) as (dispatcher, _):
        await asyncio.wait_for(dispatcher.run(until_idle=True), 30)
    assert handler.calls == 1
    row = world.one("select status, attempts, last_error from zerfaux.operations")
    assert row == {"status": "failed", "attempts": 1, "last_error": "authentication failed for admin@vc"}


async def test_a_worker_that_lost_its_lease_writes_nothing(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    handler = Scripted([], delay=3.0)
    async with dispatcher_for(world, handler, lease_seconds=1.0) as (dispatcher, _):
        task = asyncio.create_task(dispatcher.run())
        await eventually(lambda: handler.calls == 1)
        # another worker took the operation over (as after a lease expiry), and renews it
        world.sql("update zerfaux.operations set worker_id = 'thief', lease_expires_at = now() + interval '1 hour'")
        await eventually(lambda: dispatcher.running == 0, timeout=5)
        dispatcher.stop()
        await task
    row = world.one("select status, worker_id from zerfaux.operations")
    assert row == {"status": "running", "worker_id": "thief"}
    assert world.value("select last_synced_at from vcenters where id = %s", (PRIMARY,)) is None


async def test_cancelling_a_running_replication_ends_it_cancelled(world: Database, store_env: dict[str, str]) -> None:
    job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    async with running(engine_settings(world.url, ZERFAUX_STUB_SECONDS="30", **store_env)):
        await eventually(lambda: world.value("select bytes_transferred from replication_jobs") > 0, timeout=10)
        world.sql("update replication_jobs set cancel_requested = true where id = %s", (job,))
        await eventually(lambda: world.value("select status from replication_jobs") == "cancelled", timeout=10)
    row = world.one("select j.status, j.error, o.status as op from replication_jobs j"
                    " join zerfaux.operations o on o.subject_id = j.id")
    assert row["op"] == "cancelled" and "cancelled" in row["error"]


async def test_shutdown_releases_running_work_for_another_worker(world: Database) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    settings = engine_settings(world.url, ZERFAUX_STUB_SECONDS="60", ZERFAUX_SHUTDOWN_GRACE_SECONDS="0.2")
    async with running(settings):
        await eventually(lambda: world.value("select status from replication_jobs") == "running")
    row = world.one("select o.status, o.attempts, o.worker_id, j.status as job from zerfaux.operations o"
                    " join replication_jobs j on j.id = o.subject_id")
    assert row == {"status": "queued", "attempts": 0, "worker_id": None, "job": "pending"}
    await drain(engine_settings(world.url))
    assert world.value("select status from replication_jobs") == "completed"


async def test_a_database_that_drops_mid_run_is_reconnected_and_nothing_is_lost(world: Database) -> None:
    settings = engine_settings(world.url, ZERFAUX_STUB_SECONDS="1")
    async with running(settings):
        world.sql("insert into replication_jobs (protection_group_id) select %s from generate_series(1, 3)", (GROUP,))
        await eventually(lambda: world.value("select count(*) from replication_jobs where status = 'running'") > 0)
        killed = world.value("select count(pg_terminate_backend(pid)) from pg_stat_activity"
                             " where datname = current_database() and pid <> pg_backend_pid()")
        assert killed > 0
        world.sql("update vcenters set sync_requested_at = now()")
        await eventually(lambda: world.value("select count(*) from replication_jobs where status = 'completed'") == 3, timeout=60)
        await eventually(lambda: world.value("select count(*) from vcenters where last_synced_at is not null") == 2, timeout=30)
    assert world.value("select count(*) from zerfaux.operations where status <> 'succeeded'") == 0


@pytest.mark.parametrize("concurrency", ["1", "4"])
async def test_global_concurrency_limits_what_runs_at_once(world: Database, concurrency: str) -> None:
    world.sql("update replication_targets set max_concurrent = 100")
    world.sql("insert into replication_jobs (protection_group_id) select %s from generate_series(1, 6)", (GROUP,))
    peak = 0
    async with running(engine_settings(world.url, ZERFAUX_STUB_SECONDS="0.5", ZERFAUX_CONCURRENCY=concurrency)):
        for _ in range(200):
            peak = max(peak, world.value("select count(*) from replication_jobs where status = 'running'"))
            if world.value("select count(*) from replication_jobs where status = 'completed'") == 6:
                break
            await asyncio.sleep(0.02)
    assert 1 <= peak <= int(concurrency)
    assert world.value("select count(*) from replication_jobs where status = 'completed'") == 6
