"""Row Level Security as DESIGN §4 and the README state it, checked under each API role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.integration.conftest import GROUP, PRIMARY, add_vm, protect
from tests.support.pg import Database

CONTROL_PLANE = ["vcenters", "vcenter_vms", "vcenter_datastores", "replication_targets",
                 "protection_groups", "protected_vms", "replication_jobs"]
ENGINE_TABLES = ["zerfaux.operations", "zerfaux.workers"]
ENGINE_FUNCTIONS = [
    "zerfaux.claim('x', 1, 30)",
    "zerfaux.heartbeat('x', array[]::uuid[], 30)",
    "zerfaux.progress(gen_random_uuid(), 'x', '{}')",
    "zerfaux.complete(gen_random_uuid(), 'x', '{}')",
    "zerfaux.fail(gen_random_uuid(), 'x', 'e', true, 0)",
    "zerfaux.finish_cancelled(gen_random_uuid(), 'x', 'm')",
    "zerfaux.release('x', array[]::uuid[])",
    "zerfaux.prune(30)",
    "zerfaux.queue_state()",
    "zerfaux.enqueue('vcenter.sync', gen_random_uuid())",
    "zerfaux.apply_inventory(gen_random_uuid(), '{}')",
    "zerfaux.operation_input('vcenter.sync', gen_random_uuid())",
]


class As:
    """A connection that runs everything under ``set role``, as PostgREST does for a JWT's role."""

    def __init__(self, db: Database, role: str) -> None:
        self.conn = psycopg.connect(db.url, autocommit=True)
        self.conn.execute(f"set role {role}")

    def rows(self, sql: str, params: Any = None) -> list[Any]:
        cur = self.conn.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def full(world: Database) -> Database:
    world.sql("update vcenters set sync_requested_at = now()")
    protect(world, add_vm(world), needs_storage_vmotion=True)
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    world.sql("insert into vcenter_datastores (vcenter_id, moref, name) values (%s, 'ds-1', 'nfs-01')", (PRIMARY,))
    return world


def connect(db: Database, role: str) -> Iterator[As]:
    session = As(db, role)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def anon(full: Database) -> Iterator[As]:
    yield from connect(full, "anon")


@pytest.fixture
def authenticated(full: Database) -> Iterator[As]:
    yield from connect(full, "authenticated")


@pytest.fixture
def service(full: Database) -> Iterator[As]:
    yield from connect(full, "service_role")


@pytest.mark.parametrize("table", CONTROL_PLANE + ENGINE_TABLES)
def test_anon_sees_nothing(anon: As, table: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        anon.rows(f"select * from {table}" if "." in table else f"select * from public.{table}")


@pytest.mark.parametrize("call", ENGINE_FUNCTIONS)
@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_call_engine_functions(full: Database, role: str, call: str) -> None:
    for session in connect(full, role):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            session.rows(f"select * from {call}")


def test_service_role_calls_engine_functions(service: As) -> None:
    assert service.rows("select * from zerfaux.claim('svc', 10, 30)")


@pytest.mark.parametrize(("table", "column"), [
    ("vcenters", "password_secret"),
    ("replication_targets", "ssh_key_secret"),
    ("protection_groups", "source_ssh_key_secret"),
])
def test_authenticated_cannot_read_secret_columns(authenticated: As, table: str, column: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        authenticated.rows(f"select {column} from public.{table}")


def test_authenticated_reads_the_control_plane_and_the_queue(authenticated: As) -> None:
    assert len(authenticated.rows("select id, name, last_synced_at from public.vcenters")) == 2
    assert authenticated.rows("select name, datastore from public.vcenter_vms")
    assert authenticated.rows("select name from public.vcenter_datastores")
    assert authenticated.rows("select status from public.replication_jobs")
    assert authenticated.rows("select needs_storage_vmotion from public.protected_vms")
    assert len(authenticated.rows("select kind from zerfaux.operations")) == 4


def test_authenticated_asks_for_work_as_a_person_does(authenticated: As, full: Database) -> None:
    authenticated.rows("update public.vcenters set sync_requested_at = now() + interval '1 hour'")
    authenticated.rows("insert into public.replication_jobs (protection_group_id) values (%s)", (GROUP,))
    authenticated.rows("update public.protected_vms set needs_dr_shell = true")
    authenticated.rows("update public.replication_jobs set cancel_requested = true")
    kinds = [r["kind"] for r in full.sql("select kind from zerfaux.operations where status = 'queued'")]
    assert sorted(kinds).count("vm.dr_shell") == 1


@pytest.mark.parametrize("statement", [
    "update public.vcenters set host = 'evil.example'",
    "update public.vcenters set password_secret = 'other'",
    "insert into public.vcenters (name, host) values ('x', 'y')",
    "delete from public.vcenters",
    "update public.replication_targets set ssh_host_key = 'attacker key'",
    "update public.protection_groups set source_dataset = 'tank/other'",
    "update public.replication_jobs set status = 'completed'",
    "update public.replication_jobs set bytes_transferred = 1",
    "update public.protected_vms set dr_shell_vm_created = true",
    "update public.vcenter_vms set datastore = 'x'",
    "delete from public.replication_jobs",
    "insert into zerfaux.operations (kind, subject_id) values ('vcenter.sync', gen_random_uuid())",
    "update zerfaux.operations set status = 'succeeded'",
    "delete from zerfaux.operations",
])
def test_authenticated_cannot_edit_what_the_engine_owns(authenticated: As, statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        authenticated.rows(statement)


def test_authenticated_cannot_read_vault_or_migrations(authenticated: As) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        authenticated.rows("select * from supabase_migrations.schema_migrations")
