"""Row Level Security and grants, as one policy table checked against the database.

Every table of ``public``, ``zerfaux`` and ``supabase_migrations`` and every function of
``public`` and ``zerfaux`` is found in the catalog (a new one nobody decided about fails here),
then each API role (anon, authenticated, service_role, under ``set role`` as PostgREST does for a
JWT's role) tries to select each column, insert each column, update each column, delete, and
execute each function, in a transaction rolled back afterwards. What it may do is written once,
below, from DESIGN §4 and the README's RLS paragraph:

- anon: nothing at all.
- authenticated: reads the control plane except the ``*_secret`` columns, and the operations;
  asks for work as a person does (request a sync, insert or cancel a replication job, protect a
  VM, flip its two flags, unprotect it); writes nothing else; executes no engine function.
- service_role: every table of the control plane and the engine, and every engine function.
- supabase_migrations: no API role (the Supabase CLI's own bookkeeping).

Both on a bare Postgres and on one whose ``public`` schema has Supabase's default privileges
(new tables and functions granted to anon, authenticated and service_role), since the same
migrations must hold on both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from listener.migrate import migrate, seed
from tests.integration.conftest import GROUP, PRIMARY, add_vm, protect
from tests.support.pg import Database, create_database, drop_database

ROLES = ("anon", "authenticated", "service_role")
EVERY = "every column"
BUT_SECRETS = "every column but *_secret"
SECRET_LIKE = re.compile(r"secret|password|passwd|private|token|credential", re.I)


@dataclass(frozen=True)
class Access:
    select: str | tuple[str, ...] = ()  # EVERY, BUT_SECRETS or the columns
    insert: str | tuple[str, ...] = ()
    update: str | tuple[str, ...] = ()
    delete: bool = False


NOTHING = Access()
ALL = Access(select=EVERY, insert=EVERY, update=EVERY, delete=True)
READ = Access(select=EVERY)

# The policy, once. Rows: tables; columns: roles.
POLICY: dict[str, dict[str, Access]] = {
    "public.vcenters": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=BUT_SECRETS, update=("sync_requested_at",)),
    },
    "public.vcenter_vms": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "public.vcenter_datastores": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "public.replication_targets": {"anon": NOTHING, "service_role": ALL, "authenticated": Access(select=BUT_SECRETS)},
    "public.protection_groups": {"anon": NOTHING, "service_role": ALL, "authenticated": Access(select=BUT_SECRETS)},
    "public.protected_vms": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY,
                                insert=("protection_group_id", "vm_id", "needs_storage_vmotion", "needs_dr_shell"),
                                update=("needs_storage_vmotion", "needs_dr_shell"), delete=True),
    },
    "public.replication_jobs": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY, insert=("protection_group_id",),
                                update=("cancel_requested",)),
    },
    "zerfaux.operations": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "zerfaux.workers": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    # The kinds' registry is written by migrations only (the database owner).
    "zerfaux.kinds": {"anon": NOTHING, "service_role": READ, "authenticated": NOTHING},
    "supabase_migrations.schema_migrations": {"anon": NOTHING, "authenticated": NOTHING, "service_role": NOTHING},
}

# The smallest valid row of each table, for insert checks (SQL expressions).
MINIMAL_ROW: dict[str, dict[str, str]] = {
    "public.vcenters": {"name": "'rls-' || gen_random_uuid()", "host": "'h'"},
    "public.vcenter_vms": {"vcenter_id": f"'{PRIMARY}'", "moref": "'vm-' || gen_random_uuid()", "name": "'x'"},
    "public.vcenter_datastores": {"vcenter_id": f"'{PRIMARY}'", "moref": "'ds-' || gen_random_uuid()", "name": "'x'"},
    "public.replication_targets": {"name": "'rls-' || gen_random_uuid()", "ssh_host": "'h'", "target_root": "'t'"},
    "public.protection_groups": {"name": "'rls-' || gen_random_uuid()"},
    "public.protected_vms": {"protection_group_id": f"'{GROUP}'"},
    "public.replication_jobs": {"protection_group_id": f"'{GROUP}'"},
    "zerfaux.operations": {"kind": "'rls.test'", "subject_id": "gen_random_uuid()"},
    "zerfaux.workers": {"worker_id": "'rls-' || gen_random_uuid()"},
    "zerfaux.kinds": {"kind": "'rls-' || gen_random_uuid()", "input_fn": "'zerfaux.ping'"},
    "supabase_migrations.schema_migrations": {"version": "'rls-' || gen_random_uuid()"},
}


def allowed_columns(spec: str | tuple[str, ...], columns: list[str]) -> set[str]:
    if spec == EVERY:
        return set(columns)
    if spec == BUT_SECRETS:
        return {c for c in columns if not c.endswith("_secret")}
    return set(spec)


# --- the database under test ----------------------------------------------------------------

SUPABASE_DEFAULTS = """
    alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
    alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
    alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
"""


def populate(db: Database) -> None:
    """At least one row in every table, so an allowed update or delete visibly touches one."""
    db.sql("update vcenters set sync_requested_at = now()")
    protect(db, add_vm(db), needs_storage_vmotion=True)
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    db.sql("insert into vcenter_datastores (vcenter_id, moref, name) values (%s, 'ds-1', 'nfs-01')", (PRIMARY,))
    db.sql("insert into zerfaux.workers (worker_id) values ('w-1')")


@pytest.fixture(scope="module", params=["bare", "supabase-defaults"])
def policy_db(request: pytest.FixtureRequest, pg_server: str) -> Iterator[Database]:
    db = create_database()
    try:
        if request.param == "supabase-defaults":
            db.sql("""do $$ begin
                if not exists (select 1 from pg_roles where rolname = 'anon') then create role anon nologin noinherit; end if;
                if not exists (select 1 from pg_roles where rolname = 'authenticated') then create role authenticated nologin noinherit; end if;
                if not exists (select 1 from pg_roles where rolname = 'service_role') then create role service_role nologin noinherit bypassrls; end if;
            end $$""")
            db.sql(SUPABASE_DEFAULTS)
        migrate(db.url)
        seed(db.url)
        populate(db)
        yield db
    finally:
        drop_database(db.name)


@pytest.fixture(scope="module")
def conn(policy_db: Database) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with psycopg.connect(policy_db.url, autocommit=True, row_factory=dict_row) as connection:
        yield connection


def attempt(conn: psycopg.Connection[Any], role: str, sql: str) -> tuple[str, int]:
    """('denied', 0), ('ok', rowcount) or ('error', 0): an error other than a privilege error
    comes after the privilege checks (a constraint, a null argument), so the role was allowed."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(f"set local role {role}")
            cur = conn.execute(sql)  # type: ignore[arg-type]
            return "ok", cur.rowcount
    except psycopg.errors.InsufficientPrivilege:
        return "denied", 0
    except psycopg.Error:
        return "error", 0


def catalog_tables(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("""
        select n.nspname || '.' || c.relname as name from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname in ('public', 'zerfaux', 'supabase_migrations') and c.relkind in ('r', 'p', 'v', 'm')
         order by 1""").fetchall()
    return [r["name"] for r in rows]


def columns(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute("select attname from pg_attribute where attrelid = %s::regclass and attnum > 0"
                        " and not attisdropped order by attnum", (table,)).fetchall()
    return [r["attname"] for r in rows]


def row_count(conn: psycopg.Connection[Any], table: str) -> int:
    return int(conn.execute(f"select count(*) as n from {table}").fetchone()["n"])  # type: ignore[index]


# --- the matrix -------------------------------------------------------------------------------

def test_the_policy_names_every_table_and_rls_is_on_for_ours(conn: psycopg.Connection[Any]) -> None:
    assert sorted(POLICY) == catalog_tables(conn), "a table was added or removed: decide its policy here"
    rows = conn.execute("""select n.nspname || '.' || c.relname as name, c.relrowsecurity as rls
                             from pg_class c join pg_namespace n on n.oid = c.relnamespace
                            where n.nspname in ('public', 'zerfaux') and c.relkind in ('r', 'p')""").fetchall()
    assert [r["name"] for r in rows if not r["rls"]] == []


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_select(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    cols = columns(conn, table)
    expected = allowed_columns(POLICY[table][role].select, cols)
    seen = {c for c in cols if attempt(conn, role, f"select {c} from {table} limit 1")[0] != "denied"}
    assert seen == expected
    if expected:  # allowed columns show every row (policies read `using (true)`)
        some = sorted(expected)[0]
        assert attempt(conn, role, f"select {some} from {table}") == ("ok", row_count(conn, table)) != ("ok", 0)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_insert(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    cols = columns(conn, table)
    expected = allowed_columns(POLICY[table][role].insert, cols)
    base = MINIMAL_ROW[table]
    outcome = attempt(conn, role, f"insert into {table} ({', '.join(base)}) values ({', '.join(base.values())})")
    if not expected:
        assert outcome[0] == "denied"
        return
    assert outcome == ("ok", 1)
    # Naming a column in an insert needs its privilege, even with DEFAULT as the value.
    seen = {c for c in cols if c in base or attempt(
        conn, role, f"insert into {table} ({', '.join([*base, c])}) values ({', '.join([*base.values(), 'default'])})"
    )[0] != "denied"}
    assert seen == expected | set(base)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_update(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    cols = columns(conn, table)
    expected = allowed_columns(POLICY[table][role].update, cols)
    outcomes = {c: attempt(conn, role, f"update {table} set {c} = {c}") for c in cols}
    assert {c for c, o in outcomes.items() if o[0] != "denied"} == expected
    for c in expected:  # and the policy lets it reach the rows
        assert outcomes[c][0] == "error" or outcomes[c][1] > 0, (c, outcomes[c])


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_delete(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    outcome = attempt(conn, role, f"delete from {table}")
    if POLICY[table][role].delete:
        assert outcome[0] == "error" or outcome[1] > 0, outcome  # a foreign key may refuse, RLS may not
    else:
        assert outcome[0] == "denied"


def functions(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return conn.execute("""
        select n.nspname || '.' || p.proname as name, p.oid,
               p.prorettype = 'trigger'::regtype as is_trigger,
               coalesce((select string_agg('null::' || format_type(t, null), ', ' order by i)
                           from unnest(p.proargtypes) with ordinality as a(t, i)), '') as null_args
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname in ('public', 'zerfaux') order by 1""").fetchall()


@pytest.mark.parametrize("role", ROLES)
def test_execute(conn: psycopg.Connection[Any], role: str) -> None:
    """Engine functions: service_role only. Trigger functions: no API role (they run as triggers).

    Every function is found in the catalog, so one a later migration adds without revoking
    PUBLIC's EXECUTE fails here. (Default privileges cannot do this for us: a per-schema
    ``alter default privileges ... revoke execute from public`` has no effect, because PUBLIC's
    EXECUTE is a global default, and changing the global one would change the whole Supabase
    project, not just this schema.)"""
    found = functions(conn)
    assert len(found) >= 20
    wrong = []
    for fn in found:
        may = role == "service_role" and fn["name"].startswith("zerfaux.") and not fn["is_trigger"]
        if fn["is_trigger"]:
            can = conn.execute("select has_function_privilege(%s, %s::oid, 'execute') as ok",
                               (role, fn["oid"])).fetchone()["ok"]  # type: ignore[index]
            if can and role != "service_role":
                wrong.append(f"{role} may execute trigger function {fn['name']}")
            continue
        outcome = attempt(conn, role, f"select {fn['name']}({fn['null_args']})")
        if (outcome[0] != "denied") != may:
            wrong.append(f"{role} {'may' if outcome[0] != 'denied' else 'may not'} execute {fn['name']}")
    assert wrong == []


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_no_credential_is_readable_through_an_api_role(conn: psycopg.Connection[Any], role: str) -> None:
    readable = [f"{t}.{c}" for t in POLICY for c in columns(conn, t)
                if attempt(conn, role, f"select {c} from {t} limit 1")[0] != "denied"]
    assert [c for c in readable if SECRET_LIKE.search(c.rsplit(".", 1)[1])] == []
    assert attempt(conn, role, "select zerfaux.vault_secret('vc-primary-password')")[0] == "denied"


# --- what a person does, end to end ------------------------------------------------------------

def test_authenticated_asks_for_work_as_a_person_does(policy_db: Database) -> None:
    with psycopg.connect(policy_db.url, autocommit=True) as session:
        with session.transaction(force_rollback=True):
            session.execute("set local role authenticated")
            session.execute("update public.vcenters set sync_requested_at = now() + interval '1 hour'")
            session.execute("insert into public.replication_jobs (protection_group_id) values (%s)", (GROUP,))
            session.execute("update public.protected_vms set needs_dr_shell = true")
            session.execute("update public.replication_jobs set cancel_requested = true")
            session.execute("reset role")
            kinds = [r[0] for r in session.execute(
                "select kind from zerfaux.operations where status = 'queued'").fetchall()]
    assert kinds.count("vm.dr_shell") == 1 and kinds.count("vcenter.sync") == 2
