"""Installing Zerfaux into a Supabase project that already holds an application.

The database is prepared as Supabase prepares one (supabase_project.sql): the API roles and
``authenticator``, an owner role that is not a superuser (Supabase's ``postgres``: CREATEROLE,
BYPASSRLS), schema ``auth`` with ``auth.users`` and ``auth.uid()``, schema ``extensions``, the
empty publication ``supabase_realtime``, and the owner's default privileges in ``public`` before
2026 (every new table, sequence and function granted to the API roles) or since 2026 (tables and
sequences granted to none). An application (supabase_app.sql) holds tables, a view, sequences and
a function there with its own grants and policies. ``zerfaux migrate`` runs as the owner; then the
catalog must show the application's privileges, policies and default privileges exactly as they
were, and Zerfaux must work for service_role and for its own roles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from listener.migrate import discover, seed
from listener.migrate_guard import GUARDED
from tests.integration.conftest import GROUP
from tests.integration.test_advisors import LINTS, OFFENDERS
from tests.support.pg import Database, admin_url, drop_database, url_for

HERE = Path(__file__).resolve().parent
OWNER = "zf_project_owner"  # Supabase's `postgres`, under a name of its own: roles are cluster-wide
APP = ("todos", "todos_id_seq", "app_audit", "app_audit_id_seq", "open_todos", "ticket_numbers")
ROLES = f"""do $$ begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then create role anon nologin noinherit; end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then create role authenticated nologin noinherit; end if;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then create role service_role nologin noinherit bypassrls; end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticator') then create role authenticator login noinherit; end if;
    if not exists (select 1 from pg_roles where rolname = '{OWNER}') then
        create role {OWNER} login createrole bypassrls nosuperuser;
    end if;
end $$"""
DEFAULTS = {
    "pre-2026": f"""alter default privileges for role {OWNER} in schema public
                        grant all on tables to anon, authenticated, service_role;
                    alter default privileges for role {OWNER} in schema public
                        grant all on sequences to anon, authenticated, service_role;
                    alter default privileges for role {OWNER} in schema public
                        grant all on functions to anon, authenticated, service_role;""",
    "2026": f"""alter default privileges for role {OWNER} in schema public
                    grant all on functions to anon, authenticated, service_role;""",
}
ADMIN = "5b000000-0000-4000-9000-000000000001"
OPERATOR = "5b000000-0000-4000-9000-000000000002"
VIEWER = "5b000000-0000-4000-9000-000000000003"
STRANGER = "5b000000-0000-4000-9000-000000000004"


def run_sql(url: str, text: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(text.replace(':"owner"', f'"{OWNER}"'))  # type: ignore[arg-type]


def prepare(defaults: str, publication_owner: str = OWNER) -> Database:
    """A new project database with its application; the returned URL connects as the owner."""
    run_sql(admin_url(), ROLES)
    run_sql(admin_url(), "grant anon, authenticated, service_role to authenticator")
    run_sql(admin_url(), f"grant anon, authenticated, service_role to {OWNER}")
    name = f"zf_sb_install_{uuid.uuid4().hex[:8]}"
    run_sql(admin_url(), f'create database "{name}" owner {OWNER}')
    try:
        run_sql(url_for(name), (HERE / "supabase_project.sql").read_text())
        run_sql(url_for(name), f'alter publication supabase_realtime owner to "{publication_owner}"')
        run_sql(url_for(name), "insert into auth.users (id, email) select unnest('{"
                + ",".join((ADMIN, OPERATOR, VIEWER, STRANGER)) + "}'::uuid[]), 'u@example.org'")
        owner_url = url_for(name).replace("postgres@", f"{OWNER}@", 1)
        run_sql(owner_url, DEFAULTS[defaults])
        run_sql(owner_url, (HERE / "supabase_app.sql").read_text())
    except BaseException:
        drop_database(name)
        raise
    return Database(name, owner_url)


def zerfaux_migrate(db: Database) -> subprocess.CompletedProcess[str]:
    zerfaux = Path(sys.executable).with_name("zerfaux")
    return subprocess.run([str(zerfaux), "migrate"], env={**os.environ, "DATABASE_URL": db.url},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", params=list(DEFAULTS))
def project(request: pytest.FixtureRequest, pg_server: str) -> Iterator[Database]:
    db = prepare(request.param)
    try:
        yield db
    finally:
        drop_database(db.name)


def catalog(url: str) -> dict[str, Any]:
    """What a user would compare: grants, ACLs, policies, RLS flags and default privileges of the
    application's objects, read as the cluster's superuser (every row visible)."""
    superuser = url.replace(f"{OWNER}@", "postgres@", 1)
    with psycopg.connect(superuser, row_factory=dict_row) as conn:
        def rows(query: str, *params: Any) -> list[dict[str, Any]]:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]
        return {
            "role_table_grants": rows("""select grantor, grantee, table_name, privilege_type, is_grantable
                                           from information_schema.role_table_grants
                                          where table_schema = 'public' and table_name = any(%s)
                                          order by 1, 2, 3, 4""", list(APP)),
            "column_privileges": rows("""select grantor, grantee, table_name, column_name, privilege_type
                                           from information_schema.column_privileges
                                          where table_schema = 'public' and table_name = any(%s)
                                          order by 1, 2, 3, 4, 5""", list(APP)),
            "relacl": rows("""select relname, relrowsecurity,
                                     array(select x::text from unnest(relacl) x order by 1) as acl
                                from pg_class where relnamespace = 'public'::regnamespace and relname = any(%s)
                               order by 1""", list(APP)),
            "attacl": rows("""select c.relname, a.attname, array(select x::text from unnest(a.attacl) x order by 1) as acl
                                from pg_attribute a join pg_class c on c.oid = a.attrelid
                               where c.relnamespace = 'public'::regnamespace and c.relname = any(%s)
                                 and a.attacl is not null order by 1, 2""", list(APP)),
            "proacl": rows("""select proname, array(select x::text from unnest(proacl) x order by 1) as acl
                                from pg_proc where pronamespace = 'public'::regnamespace
                                 and proname = 'todo_count'"""),
            "policies": rows("""select tablename, policyname, permissive, roles, cmd, qual, with_check
                                  from pg_policies where schemaname = 'public' and tablename = any(%s)
                                 order by 1, 2""", list(APP)),
            "default_acl": rows("""select defaclrole::regrole::text as role, defaclnamespace::regnamespace::text as schema,
                                          defaclobjtype, array(select x::text from unnest(defaclacl) x order by 1) as acl
                                     from pg_default_acl order by 1, 2, 3"""),
            "publication": rows("select schemaname, tablename from pg_publication_tables"
                                " where pubname = 'supabase_realtime' and schemaname = 'public'"
                                " and tablename = any(%s)", list(APP)),
        }


@pytest.fixture(scope="module")
def installed(project: Database) -> tuple[dict[str, Any], dict[str, Any], subprocess.CompletedProcess[str]]:
    before = catalog(project.url)
    run = zerfaux_migrate(project)
    assert run.returncode == 0, run.stdout + run.stderr
    return before, catalog(project.url), run


def test_a_step_the_owner_may_not_take_fails_naming_the_fix(pg_server: str) -> None:
    """Realtime's publication owned by another role: the landed migration that adds Zerfaux's
    tables to it cannot, and the whole migration is rolled back with a message saying what to do."""
    db = prepare("2026", publication_owner="postgres")
    try:
        run = zerfaux_migrate(db)
        assert run.returncode != 0
        assert "20261126090300_security.sql failed and was rolled back: must be owner of publication" in run.stderr
        assert "run `zerfaux migrate` as the role that owns the project's schema public" in run.stderr
        assert db.value("select count(*) from information_schema.role_table_grants"
                        " where table_schema = 'public' and table_name = 'todos' and grantee = 'anon'") == 0
        assert db.value("select count(*) from information_schema.column_privileges where table_schema = 'public'"
                        " and table_name = 'todos' and grantee = 'anon'") == 3
    finally:
        drop_database(db.name)


def test_the_migrations_ran_as_a_role_that_is_not_a_superuser(project: Database, installed: Any) -> None:
    with psycopg.connect(project.url) as conn:
        row = conn.execute("select current_user, rolsuper from pg_roles where rolname = current_user").fetchone()
        owners = conn.execute("select distinct relowner::regrole::text from pg_class"
                              " where relnamespace = 'zerfaux'::regnamespace").fetchall()
    assert row == (OWNER, False)
    assert owners == [(OWNER,)]
    # The guard says what it did, and the pre-2026 defaults gave the app's new tables to
    # service_role already, so only some variants need a take-back; a put-back always happens.
    assert "20261126090300_security.sql: kept the privileges of the application's relations" in installed[2].stderr
    # Migration 20261201157000 names, for its owner to check, what no API role may use.
    assert "migration: app_audit: anon and authenticated have no privilege on it" in installed[2].stderr
    assert "migration: todos: anon and authenticated have no privilege" not in installed[2].stderr


@pytest.mark.parametrize("what", ["role_table_grants", "column_privileges", "relacl", "attacl", "proacl",
                                  "policies", "default_acl", "publication"])
def test_the_applications_privileges_and_policies_are_exactly_as_before(installed: Any, what: str) -> None:
    before, after, _ = installed
    assert before[what] or what == "publication", f"the application has no {what}: the test would prove nothing"
    assert after[what] == before[what]


def test_the_landed_migration_is_recorded_byte_for_byte(project: Database, installed: Any) -> None:
    """The guard changes how 20261126090300 is applied, not what is recorded: the Supabase CLI
    and ``zerfaux migrate`` keep agreeing on the history."""
    for version in GUARDED:
        path = next(m.path for m in discover() if m.version == version)
        recorded = project.value("select statements[1] from supabase_migrations.schema_migrations"
                                 " where version = %s", (version,))
        assert recorded == path.read_text()


def as_role(conn: psycopg.Connection[Any], role: str, user: str | None = None) -> None:
    conn.execute(f"set local role {role}")  # type: ignore[arg-type]
    claims = {"role": role} | ({"sub": user} if user else {})
    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))


def test_zerfaux_works_for_service_role_and_its_roles(project: Database, installed: Any) -> None:
    seed(project.url)
    with psycopg.connect(project.url, autocommit=True) as conn:
        with conn.transaction():
            as_role(conn, "service_role")
            conn.execute("insert into zerfaux.operators (user_id, role, protection_group_id) values"
                         " (%s, 'admin', null), (%s, 'operator', %s), (%s, 'viewer', %s)",
                         (ADMIN, OPERATOR, GROUP, VIEWER, GROUP))
            assert conn.execute("select count(*) from zerfaux.operators").fetchone() == (3,)
        with conn.transaction():
            as_role(conn, "authenticated", ADMIN)
            conn.execute("insert into protection_groups (name) values ('sb-install-new')")
        with conn.transaction():
            as_role(conn, "authenticated", OPERATOR)
            job = conn.execute("insert into replication_jobs (protection_group_id) values (%s) returning id",
                               (GROUP,)).fetchone()
        assert job is not None
        with conn.transaction():
            as_role(conn, "authenticated", VIEWER)
            seen = [r[0] for r in conn.execute("select name from protection_groups order by name")]
            jobs = conn.execute("select count(*) from replication_jobs").fetchone()
        assert seen == ["gold"] and jobs == (1,)
        with conn.transaction():
            as_role(conn, "authenticated", STRANGER)
            nothing = [conn.execute(f"select count(*) from {t}").fetchone()[0]  # type: ignore[index]
                       for t in ("protection_groups", "replication_jobs", "vcenters", "zerfaux.operations")]
        assert nothing == [0, 0, 0, 0]
        with conn.transaction():
            as_role(conn, "anon")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute("select 1 from protection_groups")
    assert project.value("select count(*) from zerfaux.operations where subject_id = %s", (job[0],)) == 1
    assert project.value("select count(*) from protection_groups where name = 'sb-install-new'") == 1


def test_the_application_still_works_for_its_users(project: Database, installed: Any) -> None:
    with psycopg.connect(project.url, autocommit=True) as conn:
        with conn.transaction():
            as_role(conn, "authenticated", VIEWER)
            conn.execute("insert into public.todos (task) values ('water the plants')")
            mine = conn.execute("select count(*) from public.todos").fetchone()
            assert mine is not None and mine[0] >= 1
        with conn.transaction():
            as_role(conn, "anon")
            tasks = [r[0] for r in conn.execute("select task from public.open_todos")]
            assert "water the plants" in tasks
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute("select user_id from public.todos")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute("select 1 from public.app_audit")


# A statement on every object of public, or on the objects a role creates later, reaches the
# application's: migrations name Zerfaux's objects instead (docs/deploy-supabase.md).
BLANKET = re.compile(r"\bon\s+all\s+(tables|sequences|functions|procedures|routines)\s+in\s+schema\s+(\w+\s*,\s*)*public\b"
                     r"|\balter\s+default\s+privileges\b", re.I)


def test_no_migration_runs_a_blanket_statement_on_public_but_the_guarded_one() -> None:
    found = []
    for migration in discover():
        text = re.sub(r"--[^\n]*", "", migration.path.read_text())
        if BLANKET.search(text) and migration.version not in GUARDED:
            found.append(migration.path.name)
    assert found == []
    assert all(BLANKET.search(m.path.read_text()) for m in discover() if m.version in GUARDED)


@pytest.mark.parametrize("lint", OFFENDERS)
def test_the_advisors_find_nothing_in_the_installed_project(project: Database, installed: Any, lint: str) -> None:
    assert [r["offender"] for r in project.sql(LINTS[lint])] == []
