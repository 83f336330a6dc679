"""Each change of DESIGN §3 enqueues exactly one operation, in the same transaction."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.integration.conftest import GROUP, PRIMARY, add_vm, operations, protect
from tests.support.pg import Database


def test_setting_sync_requested_at_enqueues_a_sync(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    ops = operations(world, "vcenter.sync")
    assert [(str(o["subject_id"]), o["status"]) for o in ops] == [(PRIMARY, "queued")]


def test_editing_another_vcenter_column_enqueues_nothing(world: Database) -> None:
    world.sql("update vcenters set host = 'elsewhere.example' where id = %s", (PRIMARY,))
    assert operations(world) == []


def test_inserting_a_replication_job_enqueues_and_fills_datasets(world: Database) -> None:
    job = world.one("insert into replication_jobs (protection_group_id) values (%s) returning *", (GROUP,))
    assert job["source_dataset"] == "tank/vmstore"
    assert job["target_dataset"] == "tank/replicas/vmstore"
    assert job["status"] == "pending"
    [op] = operations(world, "replication.run")
    assert op["subject_id"] == job["id"] and op["concurrency_key"].startswith("target:")


def test_flipping_needs_storage_vmotion_enqueues(world: Database) -> None:
    pvm = protect(world, add_vm(world))
    assert operations(world) == []
    world.sql("update protected_vms set needs_storage_vmotion = true where id = %s", (pvm,))
    assert [o["kind"] for o in operations(world)] == ["vm.storage_vmotion"]


def test_inserting_with_both_flags_enqueues_both(world: Database) -> None:
    protect(world, add_vm(world), needs_storage_vmotion=True, needs_dr_shell=True)
    assert sorted(o["kind"] for o in operations(world)) == ["vm.dr_shell", "vm.storage_vmotion"]


def test_a_double_flip_gives_one_operation(world: Database) -> None:
    pvm = protect(world, add_vm(world))
    for _ in range(2):
        world.sql("update protected_vms set needs_dr_shell = true where id = %s", (pvm,))
        world.sql("update protected_vms set needs_dr_shell = false where id = %s", (pvm,))
    world.sql("update protected_vms set needs_dr_shell = true where id = %s", (pvm,))
    assert len(operations(world, "vm.dr_shell")) == 1
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update vcenters set sync_requested_at = now() + interval '1 second' where id = %s", (PRIMARY,))
    assert len(operations(world, "vcenter.sync")) == 1


def test_a_rolled_back_change_enqueues_nothing(world: Database) -> None:
    with psycopg.connect(world.url) as conn:
        conn.execute("update vcenters set sync_requested_at = now()")
        conn.rollback()
    assert operations(world) == []


def test_enqueueing_notifies_the_listener(world: Database) -> None:
    with psycopg.connect(world.url, autocommit=True) as listener:
        listener.execute("listen zerfaux_operations")
        world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
        note = next(listener.notifies(timeout=5))
    assert note.channel == "zerfaux_operations" and '"vcenter.sync"' in note.payload


def test_cancelling_a_pending_job_ends_it_at_once(world: Database) -> None:
    job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    world.sql("update replication_jobs set cancel_requested = true where id = %s", (job,))
    row = world.one("select status, error from replication_jobs where id = %s", (job,))
    assert row["status"] == "cancelled"
    assert [o["status"] for o in operations(world)] == ["cancelled"]


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("update replication_jobs set status = 'done'", "replication_jobs_status_check"),
        ("update vcenters set site = 'moon'", "vcenters_site_check"),
        ("update replication_targets set transport = 'ftp'", "replication_targets_transport_check"),
        ("update zerfaux.operations set status = 'paused'", "operations_status_check"),
    ],
)
def test_invalid_values_are_rejected_with_the_constraint_name(world: Database, statement: str, constraint: str) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        world.sql(statement)


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        ("update vcenters set host = repeat('h', 300)", "vcenters_host_length"),
        ("update protection_groups set source_dataset = repeat('a/', 200)", "protection_groups_source_dataset_length"),
        ("update protection_groups set protection_datastore = 'ds] [evil'", "protection_groups_protection_datastore_name"),
        ("update replication_targets set dr_datastore = e'dr\\nx'", "replication_targets_dr_datastore_name"),
        ("update replication_targets set ssh_host_key = repeat('k', 20000)", "replication_targets_ssh_host_key_length"),
        ("update protection_groups set dr_vm_suffix = repeat('-', 40)", "protection_groups_dr_vm_suffix_length"),
    ],
)
def test_oversized_or_malformed_values_are_refused_and_change_nothing(world: Database, statement: str, constraint: str) -> None:
    before = world.sql("select * from protection_groups"), world.sql("select * from replication_targets")
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        world.sql(statement)
    assert (world.sql("select * from protection_groups"), world.sql("select * from replication_targets")) == before


def test_a_second_pending_job_of_a_group_is_refused_naming_the_group_and_the_job(world: Database) -> None:
    job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    with pytest.raises(psycopg.errors.UniqueViolation) as refused:
        world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    message = str(refused.value)
    assert "gold" in message and GROUP in message and str(job) in message and "pending" in message
    assert refused.value.diag.constraint_name == "replication_jobs_one_active_per_group"
    assert len(operations(world, "replication.run")) == 1
    # A finished job frees the group.
    world.sql("update replication_jobs set status = 'completed' where id = %s", (job,))
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    assert world.value("select count(*) from replication_jobs where status = 'pending'") == 1


def test_two_racing_inserts_of_one_group_give_one_job(world: Database) -> None:
    """Both pass the trigger before either commits: the index refuses the second."""
    with psycopg.connect(world.url) as first, psycopg.connect(world.url) as second:
        first.execute("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        second.execute("set lock_timeout = '10s'")
        with pytest.raises(psycopg.errors.UniqueViolation):
            committer = threading.Timer(0.5, first.commit)
            committer.start()
            try:
                second.execute("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
            finally:
                committer.join()
    assert world.value("select count(*) from replication_jobs") == 1


def test_a_vm_joins_only_a_group_of_its_vcenter(world: Database) -> None:
    elsewhere = world.value("select id from vcenters where site = 'dr'")
    vm = world.value("insert into vcenter_vms (vcenter_id, moref, name) values (%s, 'vm-dr-1', 'dr-only-01')"
                     " returning id", (elsewhere,))
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        protect(world, vm)
    assert "dr-only-01" in str(refused.value) and "vc-dr" in str(refused.value)
    assert "gold" in str(refused.value) and "vc-primary" in str(refused.value)
    assert world.sql("select * from protected_vms") == []
