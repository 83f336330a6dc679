"""Migrations apply to an empty database, twice is a no-op, a broken one leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from listener.migrate import MigrationError, discover, migrate
from tests.support.pg import Database

TABLES = {
    ("public", "vcenters"), ("public", "vcenter_vms"), ("public", "vcenter_datastores"),
    ("public", "replication_targets"), ("public", "protection_groups"), ("public", "protected_vms"),
    ("public", "replication_jobs"), ("zerfaux", "operations"), ("zerfaux", "workers"),
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
