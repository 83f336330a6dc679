"""Migrations apply to an empty database, twice is a no-op, a broken one leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from listener.migrate import MigrationError, discover, migrate, seed, sql_root
from tests.integration.conftest import GROUP
from tests.support.pg import Database

TABLES = {
    ("public", "vcenters"), ("public", "vcenter_vms"), ("public", "vcenter_datastores"),
    ("public", "replication_targets"), ("public", "protection_groups"), ("public", "protected_vms"),
    ("public", "replication_jobs"), ("zerfaux", "operations"), ("zerfaux", "workers"), ("zerfaux", "operators"),
}


def test_all_migrations_apply_to_an_empty_database_and_are_recorded(empty_db: Database) -> None:
    applied = migrate(empty_db.url)
    assert [m.version for m in applied] == [m.version for m in discover()]
    recorded = empty_db.sql("select version, name, statements from supabase_migrations.schema_migrations order by version")
    assert [r["version"] for r in recorded] == [m.version for m in applied]
    assert all(r["statements"] and r["name"] for r in recorded)
    tables = {(r["table_schema"], r["table_name"]) for r in empty_db.sql(
        "select table_schema, table_name from information_schema.tables where table_schema in ('public', 'zerfaux')")}
    assert TABLES <= tables


def test_a_second_run_changes_nothing(empty_db: Database) -> None:
    migrate(empty_db.url)
    before = empty_db.sql("select version from supabase_migrations.schema_migrations")
    assert migrate(empty_db.url) == []
    assert empty_db.sql("select version from supabase_migrations.schema_migrations") == before


def test_a_broken_migration_is_named_and_leaves_nothing_half_applied(empty_db: Database, tmp_path: Path) -> None:
    for found in discover():
        (tmp_path / found.path.name).write_text(found.path.read_text())
    (tmp_path / "29990101000000_broken.sql").write_text(
        "create table public.half_applied (id int);\nselect * from no_such_table;\n"
    )
    with pytest.raises(MigrationError, match="29990101000000_broken.sql") as caught:
        migrate(empty_db.url, tmp_path)
    assert "no_such_table" in str(caught.value)
    assert empty_db.value("select to_regclass('public.half_applied') is null")
    assert not empty_db.sql("select 1 from supabase_migrations.schema_migrations where version = '29990101000000'")
    # everything before it did land, and a fixed file applies on the next run
    assert len(empty_db.sql("select 1 from supabase_migrations.schema_migrations")) == len(discover())
    (tmp_path / "29990101000000_broken.sql").write_text("create table public.half_applied (id int);\n")
    assert [m.name for m in migrate(empty_db.url, tmp_path)] == ["broken"]


def test_the_api_roles_exist_on_bare_postgres_with_the_right_powers(db: Database) -> None:
    roles = {r["rolname"]: r for r in db.sql(
        "select rolname, rolcanlogin, rolbypassrls from pg_roles where rolname in ('anon', 'authenticated', 'service_role')")}
    assert set(roles) == {"anon", "authenticated", "service_role"}
    assert roles["service_role"]["rolbypassrls"]
    assert not roles["anon"]["rolbypassrls"] and not roles["authenticated"]["rolbypassrls"]
    assert all(r["relrowsecurity"] for r in db.sql(
        "select c.relrowsecurity from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where c.relkind = 'r' and n.nspname in ('public', 'zerfaux')"))


def test_migration_files_follow_the_supabase_naming() -> None:
    names = [m.path.name for m in discover()]
    assert names == sorted(names)
    assert all(len(m.version) == 14 for m in discover())


def test_no_migration_files_is_an_error_not_up_to_date(empty_db: Database, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations found in"):
        migrate(empty_db.url, tmp_path)
    assert empty_db.value("select to_regclass('supabase_migrations.schema_migrations') is null")


def test_jobs_queued_before_the_one_job_rule_are_cancelled_but_the_oldest(empty_db: Database, tmp_path: Path) -> None:
    """A database that queued several jobs of one group before the rule still migrates: the
    oldest pending job stays, the others end cancelled, and so do their operations."""
    rule = "20261201100200"
    for path in Path(str(sql_root() / "migrations")).glob("*.sql"):
        if path.name < rule:
            shutil.copy(path, tmp_path / path.name)
    migrate(empty_db.url, tmp_path)
    seed(empty_db.url)
    jobs = [empty_db.value("insert into replication_jobs (protection_group_id, created_at)"
                           " values (%s, now() + make_interval(secs => %s)) returning id::text", (GROUP, i))
            for i in range(3)]
    migrate(empty_db.url)
    rows = {r["id"]: r for r in empty_db.sql(
        "select j.id::text, j.status, j.error, o.status as op from replication_jobs j"
        " join zerfaux.operations o on o.subject_id = j.id")}
    assert [rows[j]["status"] for j in jobs] == ["pending", "cancelled", "cancelled"]
    assert [rows[j]["op"] for j in jobs] == ["queued", "cancelled", "cancelled"]
    assert "one pending or running replication job per group" in rows[jobs[1]]["error"]


AUTH_OBJECTS = """
    select 'function ' || p.oid::regprocedure::text || ' ' || md5(p.prosrc) as obj
      from pg_proc p where p.pronamespace = 'auth'::regnamespace
    union all
    select 'relation ' || c.relname from pg_class c where c.relnamespace = 'auth'::regnamespace
    order by 1"""


def test_on_supabase_nothing_is_created_in_auth_and_roles_follow_auth_users(empty_db: Database) -> None:
    # Supabase's own auth.uid() and auth.users, as a project has them before any migration.
    empty_db.sql("""create schema auth;
        create table auth.users (id uuid primary key);
        create function auth.uid() returns uuid language sql stable as
            $$ select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;""")
    before = empty_db.sql(AUTH_OBJECTS)
    migrate(empty_db.url)
    assert empty_db.sql(AUTH_OBJECTS) == before
    user = empty_db.value("insert into auth.users values (gen_random_uuid()) returning id")
    empty_db.sql("insert into zerfaux.operators (user_id, role) values (%s, 'viewer')", (user,))
    empty_db.sql("delete from auth.users where id = %s", (user,))
    assert empty_db.sql("select * from zerfaux.operators") == []


def test_on_bare_postgres_auth_uid_reads_the_request_claims(db: Database) -> None:
    user = "10000000-0000-4000-9000-000000000042"
    with psycopg.connect(db.url) as conn:
        assert conn.execute("select auth.uid()").fetchone() == (None,)
        conn.execute("select set_config('request.jwt.claims', %s, true)", (f'{{"sub": "{user}"}}',))
        assert str(conn.execute("select auth.uid()").fetchone()[0]) == user  # type: ignore[index]
