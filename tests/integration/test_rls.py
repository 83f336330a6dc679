"""Row Level Security and grants, as policy tables checked against the database.

Two tables, both written once below from docs/authorization.md and the README's RLS paragraph:

1. Columns (``POLICY``). Every table of ``public``, ``zerfaux`` and ``supabase_migrations`` and
   every function of ``public`` and ``zerfaux`` is found in the catalog (a new one nobody decided
   about fails here); each API role (anon, authenticated, service_role, under ``set role`` as
   PostgREST does for a JWT's role) tries to select, insert and update each column, delete, and
   execute each function. ``authenticated`` is tried as a global admin, the most a signed-in user
   can be given, so what it cannot do no signed-in user can:
   - anon: nothing at all.
   - authenticated: reads the control plane except the ``*_secret`` columns, and the operations;
     writes the configuration columns (an admin's), the request columns (``sync_requested_at``,
     a job's group and ``cancel_requested``, a protected VM's group, VM and two flags) and roles;
     executes only the policies' helper functions, no engine function.
   - service_role: every table of the control plane and the engine, and every engine function.
   - supabase_migrations: no API role (the Supabase CLI's own bookkeeping).

2. Rows (``CHECKS``). Each persona (anon; a stranger who signed up and has no row in
   ``zerfaux.operators``; a viewer, an operator and an admin of the seed's group ``gold``; a
   global admin; service_role) tries each request on a row of its group (``mine``) and of another
   group (``other``); what it may do follows from the role each request needs.

On three databases, since the same migrations must hold on each: a bare Postgres; one whose
``public`` schema has Supabase's default privileges before 2026 (new tables, sequences and
functions granted to anon, authenticated and service_role); and one as Supabase makes them since
2026 (``supabase-2026``: the roles exist, new tables and sequences in ``public`` are granted to no
API role), where whatever an API role may do must come from an explicit grant of a migration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from listener.migrate import migrate, seed
from tests.integration.conftest import DR, GROUP, PRIMARY, TARGET, add_vm, protect
from tests.support.pg import Database, create_database, drop_database

ROLES = ("anon", "authenticated", "service_role")
EVERY = "every column"
BUT_SECRETS = "every column but *_secret"
SECRET_LIKE = re.compile(r"secret|password|passwd|private|token|credential", re.I)

# The other group of the world below, with its own vCenter and target.
OTHER_VC = "00000000-0000-4000-a000-0000000000f1"
OTHER_TARGET = "00000000-0000-4000-b000-0000000000f1"
OTHER = "00000000-0000-4000-c000-0000000000f1"
# A spare vCenter, target and group nothing refers to, for deletes.
SPARE_VC = "00000000-0000-4000-a000-0000000000e1"
SPARE_TARGET = "00000000-0000-4000-b000-0000000000e1"
SPARE_GROUP = "00000000-0000-4000-c000-0000000000e1"
# Users (JWT `sub`); BYSTANDER is a viewer in both groups whose rows admins manage.
STRANGER = "10000000-0000-4000-9000-000000000000"
VIEWER = "10000000-0000-4000-9000-000000000001"
OPERATOR = "10000000-0000-4000-9000-000000000002"
GROUP_ADMIN = "10000000-0000-4000-9000-000000000003"
ADMIN = "10000000-0000-4000-9000-000000000004"
BYSTANDER = "10000000-0000-4000-9000-000000000005"
RUN_MINE = "40000000-0000-4000-9000-000000000001"
RUN_OTHER = "40000000-0000-4000-9000-000000000002"


@dataclass(frozen=True)
class Access:
    select: str | tuple[str, ...] = ()  # EVERY, BUT_SECRETS or the columns
    insert: str | tuple[str, ...] = ()
    update: str | tuple[str, ...] = ()
    delete: bool = False


NOTHING = Access()
ALL = Access(select=EVERY, insert=EVERY, update=EVERY, delete=True)
READ = Access(select=EVERY)
VCENTER_CONFIG = ("name", "host", "port", "username", "password_secret", "verify_tls", "site")
TARGET_CONFIG = ("name", "ssh_host", "ssh_port", "ssh_user", "ssh_key_secret", "ssh_host_key", "target_root",
                 "dr_datastore", "transport", "max_concurrent", "wire_compression", "bandwidth_limit_mbps",
                 "placeholder_datastore", "nfs_host", "nfs_clients")
BOOT_ORDER = ("boot_priority", "boot_delay_seconds", "tools_timeout_seconds")
VM_RECOVERY = (*BOOT_ORDER, "shutdown_timeout_seconds")  # set like the boot order (issue 14)
MAPPING_CONFIG = ("protection_group_id", "source_network", "recovery_network", "test_network")
GROUP_CONFIG = ("name", "source_vcenter_id", "dr_vcenter_id", "replication_target_id", "source_dataset",
                "protection_datastore", "rpo_minutes", "retention_snapshots", "source_ssh_host", "source_ssh_port",
                "source_ssh_user", "source_ssh_key_secret", "source_ssh_host_key", "dr_cluster",
                "dr_resource_pool", "dr_folder", "dr_network", "dr_vm_suffix", "paused",
                "replication_interval_minutes", "retention_grid", "source_retention_grid", "encryption_key_secret",
                "recursive", "commit_policy", "commit_timeout_minutes")

# The column grants, once. Rows: tables; columns: roles.
POLICY: dict[str, dict[str, Access]] = {
    "public.vcenters": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=BUT_SECRETS, insert=(*VCENTER_CONFIG, "sync_requested_at"),
                                update=(*VCENTER_CONFIG, "sync_requested_at"), delete=True),
    },
    "public.vcenter_vms": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "public.vcenter_datastores": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "public.replication_targets": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=BUT_SECRETS, insert=TARGET_CONFIG, update=TARGET_CONFIG, delete=True),
    },
    "public.protection_groups": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=BUT_SECRETS, insert=GROUP_CONFIG, update=GROUP_CONFIG, delete=True),
    },
    "public.protected_vms": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY,
                                insert=("protection_group_id", "vm_id", "needs_storage_vmotion", "needs_dr_shell",
                                        *VM_RECOVERY),
                                update=("needs_storage_vmotion", "needs_dr_shell", *VM_RECOVERY), delete=True),
    },
    "public.replication_jobs": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY, insert=("protection_group_id",),
                                update=("cancel_requested",)),
    },
    "public.network_mappings": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY, insert=MAPPING_CONFIG, update=MAPPING_CONFIG, delete=True),
    },
    "public.recovery_points": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    # A person asks for a run and may cancel it; the engine writes the rest and every step.
    "public.recovery_runs": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY,
                                insert=("protection_group_id", "kind", "recovery_point_id", "test_run_id", "options"),
                                update=("cancel_requested",)),
    },
    "public.recovery_run_steps": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "public.rpo_events": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    # A view, computed when read: nobody writes it.
    "public.protection_status": {"anon": NOTHING, "service_role": READ, "authenticated": READ},
    "zerfaux.operations": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "zerfaux.workers": {"anon": NOTHING, "service_role": ALL, "authenticated": READ},
    "zerfaux.settings": {"anon": NOTHING, "service_role": ALL, "authenticated": NOTHING},
    "zerfaux.operators": {
        "anon": NOTHING, "service_role": ALL,
        "authenticated": Access(select=EVERY, insert=("user_id", "role", "protection_group_id"),
                                update=("role",), delete=True),
    },
    # The schedule's and the RPO watch's bookkeeping (docs/rpo.md): the engine's own.
    "zerfaux.schedule_slots": {"anon": NOTHING, "service_role": ALL, "authenticated": NOTHING},
    "zerfaux.schedule_dirty": {"anon": NOTHING, "service_role": ALL, "authenticated": NOTHING},
    "zerfaux.rpo_state": {"anon": NOTHING, "service_role": ALL, "authenticated": NOTHING},
    "zerfaux.rpo_dirty": {"anon": NOTHING, "service_role": ALL, "authenticated": NOTHING},
    # The kinds' registry is written by migrations only (the database owner).
    "zerfaux.kinds": {"anon": NOTHING, "service_role": READ, "authenticated": NOTHING},
    "supabase_migrations.schema_migrations": {"anon": NOTHING, "authenticated": NOTHING, "service_role": NOTHING},
}

# The policies' helpers: executable by authenticated (a policy runs them as the caller).
POLICY_HELPERS = {"zerfaux.role_rank", "zerfaux.has_role", "zerfaux.is_member", "zerfaux.group_ids",
                  "zerfaux.vcenter_ids", "zerfaux.target_ids", "zerfaux.operation_subjects"}

# The smallest valid row of each table, for insert checks (SQL expressions).
MINIMAL_ROW: dict[str, dict[str, str]] = {
    "public.vcenters": {"name": "'rls-' || gen_random_uuid()", "host": "'h'"},
    "public.vcenter_vms": {"vcenter_id": f"'{PRIMARY}'", "moref": "'vm-' || gen_random_uuid()", "name": "'x'"},
    "public.vcenter_datastores": {"vcenter_id": f"'{PRIMARY}'", "moref": "'ds-' || gen_random_uuid()", "name": "'x'"},
    "public.replication_targets": {"name": "'rls-' || gen_random_uuid()", "ssh_host": "'h'", "target_root": "'t'"},
    "public.protection_groups": {"name": "'rls-' || gen_random_uuid()"},
    "public.protected_vms": {"protection_group_id": f"'{GROUP}'"},
    "public.replication_jobs": {"protection_group_id": f"'{SPARE_GROUP}'"},  # a group with no job running
    "public.network_mappings": {"protection_group_id": f"'{GROUP}'", "source_network": "'rls-' || gen_random_uuid()",
                                "recovery_network": "'dr-net'"},
    "public.recovery_points": {"protection_group_id": f"'{GROUP}'", "snapshot_name": "'zerfaux_rls'",
                               "guid": "gen_random_uuid()::text", "created_at": "now()"},
    "public.rpo_events": {"protection_group_id": f"'{GROUP}'", "new_status": "'ok'", "reason": "'rls'"},
    # gold has a point on its target, no unmapped network and no test under way (populate).
    "public.recovery_runs": {"protection_group_id": f"'{GROUP}'", "kind": "'test'"},
    "public.recovery_run_steps": {"run_id": f"'{RUN_MINE}'", "seq": "100 + (random() * 1e6)::integer",
                                  "name": "'validate'"},
    "public.protection_status": {"protection_group_id": f"'{GROUP}'"},
    "zerfaux.operations": {"kind": "'rls.test'", "subject_id": "gen_random_uuid()"},
    "zerfaux.workers": {"worker_id": "'rls-' || gen_random_uuid()"},
    "zerfaux.settings": {"name": "'rls-' || gen_random_uuid()", "value": "'x'", "set_by": "'rls'"},
    "zerfaux.operators": {"user_id": "gen_random_uuid()", "role": "'viewer'"},
    "zerfaux.kinds": {"kind": "'rls-' || gen_random_uuid()", "input_fn": "'zerfaux.ping'"},
    "zerfaux.schedule_slots": {"protection_group_id": f"'{SPARE_GROUP}'", "slot": "0.5"},
    "zerfaux.schedule_dirty": {"protection_group_id": "gen_random_uuid()"},
    "zerfaux.rpo_state": {"protection_group_id": f"'{SPARE_GROUP}'", "status": "'ok'"},
    "zerfaux.rpo_dirty": {"protection_group_id": "gen_random_uuid()"},
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
# Since 2026 (new projects from 2026-05-30, all from 2026-10-30) Supabase no longer grants new
# tables in public to the API roles; functions stay executable (PUBLIC's default).
SUPABASE_2026 = """
    alter default privileges in schema public revoke all on tables from anon, authenticated, service_role;
    alter default privileges in schema public revoke all on sequences from anon, authenticated, service_role;
    alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
"""
API_ROLES = """do $$ begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then create role anon nologin noinherit; end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then create role authenticated nologin noinherit; end if;
    if not exists (select 1 from pg_roles where rolname = 'service_role') then create role service_role nologin noinherit bypassrls; end if;
end $$"""


def populate(db: Database) -> None:
    """At least one row in every table, in two groups, so an allowed request visibly touches one
    and a refused one is refused by its policy, not for want of rows."""
    db.sql("insert into vcenters (id, name, host) values (%s, 'vc-other', 'vc-other.example'),"
           " (%s, 'vc-spare', 'vc-spare.example')", (OTHER_VC, SPARE_VC))
    db.sql("insert into replication_targets (id, name, ssh_host, target_root) values"
           " (%s, 'other-zfs', 'other-zfs.example', 'tank/other'), (%s, 'spare-zfs', 'spare.example', 'tank/spare')",
           (OTHER_TARGET, SPARE_TARGET))
    db.sql("insert into protection_groups (id, name, source_vcenter_id, replication_target_id, source_dataset)"
           " values (%s, 'other', %s, %s, 'tank/other'), (%s, 'spare', null, null, null)",
           (OTHER, OTHER_VC, OTHER_TARGET, SPARE_GROUP))
    db.sql("update vcenters set sync_requested_at = now()")
    protect(db, add_vm(db), needs_storage_vmotion=True)
    other_vm = db.value("insert into vcenter_vms (vcenter_id, moref, name) values (%s, 'vm-7', 'other-01')"
                        " returning id", (OTHER_VC,))
    db.sql("insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion) values (%s, %s, true)",
           (OTHER, other_vm))
    db.sql("insert into replication_jobs (protection_group_id) values (%s), (%s)", (GROUP, OTHER))
    db.sql("insert into vcenter_datastores (vcenter_id, moref, name) values (%s, 'ds-1', 'nfs-01'),"
           " (%s, 'ds-2', 'nfs-02')", (PRIMARY, OTHER_VC))
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at) values"
           " (%s, 'zerfaux_a', '1', now()), (%s, 'zerfaux_b', '2', now())", (GROUP, OTHER))
    db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network) values"
           " (%s, 'VM Network', 'DR Network'), (%s, 'VM Network', 'DR Network')", (GROUP, OTHER))
    db.sql("insert into rpo_events (protection_group_id, new_status, reason) values"
           " (%s, 'ok', 'seed'), (%s, 'ok', 'seed')", (GROUP, OTHER))
    # A finished test in each group, with its steps (the engine's, as the owner writes them).
    db.sql("insert into recovery_runs (id, protection_group_id, kind) values (%s, %s, 'test'), (%s, %s, 'test')",
           (RUN_MINE, GROUP, RUN_OTHER, OTHER))
    db.sql("update recovery_runs set status = 'completed', completed_at = now()")
    db.sql("update zerfaux.operations set status = 'succeeded', finished_at = now() where kind = 'recovery.run'")
    db.sql("insert into recovery_run_steps (run_id, seq, name, status) values (%s, 1, 'validate', 'done'),"
           " (%s, 1, 'validate', 'done')", (RUN_MINE, RUN_OTHER))
    db.sql("insert into zerfaux.workers (worker_id) values ('w-1')")
    db.sql("select zerfaux.claim_mode('stub')")
    db.sql("insert into zerfaux.operators (user_id, role, protection_group_id) values"
           " (%s, 'viewer', %s), (%s, 'operator', %s), (%s, 'admin', %s), (%s, 'admin', null),"
           " (%s, 'viewer', %s), (%s, 'viewer', %s)",
           (VIEWER, GROUP, OPERATOR, GROUP, GROUP_ADMIN, GROUP, ADMIN, BYSTANDER, GROUP, BYSTANDER, OTHER))


@pytest.fixture(scope="module", params=["bare", "supabase-defaults", "supabase-2026"])
def policy_db(request: pytest.FixtureRequest, pg_server: str) -> Iterator[Database]:
    db = create_database()
    try:
        if request.param != "bare":
            db.sql(API_ROLES)
            db.sql(SUPABASE_DEFAULTS if request.param == "supabase-defaults" else SUPABASE_2026)
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


def become(conn: psycopg.Connection[Any], role: str, user: str | None = None) -> None:
    """What PostgREST does for a request: the JWT's role, and its claims for auth.uid()."""
    conn.execute(f"set local role {role}")  # type: ignore[arg-type]
    claims = {"role": role} | ({"sub": user} if user else {})
    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))


def attempt(conn: psycopg.Connection[Any], role: str, sql: str, user: str | None = ADMIN,
            setup: str = "") -> tuple[str, int]:
    """('denied', 0), ('ok', rowcount) or ('error', 0): an error other than a privilege error
    comes after the privilege checks (a constraint, a null argument), so the role was allowed.
    An RLS refusal of a new row is a privilege error too; one of rows to read, update or delete
    is ('ok', 0). `authenticated` acts as `user` (by default a global admin)."""
    try:
        with conn.transaction(force_rollback=True):
            if setup:
                conn.execute(setup)  # type: ignore[arg-type]
            become(conn, role, user if role == "authenticated" else None)
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


def is_view(conn: psycopg.Connection[Any], table: str) -> bool:
    return bool(conn.execute("select relkind = 'v' as v from pg_class where oid = %s::regclass",
                             (table,)).fetchone()["v"])  # type: ignore[index]


def write_privileges(conn: psycopg.Connection[Any], table: str, role: str) -> set[str]:
    """A view that cannot be written refuses before the privilege check: ask the catalog."""
    return {p for p in ("insert", "update", "delete")
            if conn.execute("select has_table_privilege(%s, %s, %s) as ok", (role, table, p)).fetchone()["ok"]}  # type: ignore[index]


def expected_writes(table: str, role: str) -> set[str]:
    access = POLICY[table][role]
    return {p for p, spec in (("insert", access.insert), ("update", access.update), ("delete", access.delete)) if spec}


def row_count(conn: psycopg.Connection[Any], table: str) -> int:
    return int(conn.execute(f"select count(*) as n from {table}").fetchone()["n"])  # type: ignore[index]


# --- the column matrix ------------------------------------------------------------------------

def test_the_policy_names_every_table_and_rls_is_on_for_ours(conn: psycopg.Connection[Any]) -> None:
    assert sorted(POLICY) == catalog_tables(conn), "a table was added or removed: decide its policy here"
    rows = conn.execute("""select n.nspname || '.' || c.relname as name, c.relrowsecurity as rls
                             from pg_class c join pg_namespace n on n.oid = c.relnamespace
                            where n.nspname in ('public', 'zerfaux') and c.relkind in ('r', 'p')""").fetchall()
    assert [r["name"] for r in rows if not r["rls"]] == []


def test_no_policy_lets_everyone_through(conn: psycopg.Connection[Any]) -> None:
    """Supabase's advisor lint 0024: a permissive policy whose condition is always true."""
    rows = conn.execute("""select schemaname || '.' || tablename || ' ' || policyname as name, qual, with_check
                             from pg_policies where schemaname in ('public', 'zerfaux')""").fetchall()
    assert rows
    assert [r["name"] for r in rows
            if re.sub(r"[\s()]", "", r["qual"] or "") in ("true", "1=1")
            or re.sub(r"[\s()]", "", r["with_check"] or "") in ("true", "1=1")] == []


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_select(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    cols = columns(conn, table)
    expected = allowed_columns(POLICY[table][role].select, cols)
    seen = {c for c in cols if attempt(conn, role, f"select {c} from {table} limit 1")[0] != "denied"}
    assert seen == expected
    if expected:  # allowed columns show every row to a global admin
        some = sorted(expected)[0]
        assert attempt(conn, role, f"select {some} from {table}") == ("ok", row_count(conn, table)) != ("ok", 0)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_insert(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    if is_view(conn, table):
        assert write_privileges(conn, table, role) == expected_writes(table, role)
        return
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
    if is_view(conn, table):
        assert write_privileges(conn, table, role) == expected_writes(table, role)
        return
    cols = columns(conn, table)
    expected = allowed_columns(POLICY[table][role].update, cols)
    # `set c = c` reads c too; a secret column may be written but not read.
    outcomes = {c: attempt(conn, role, f"update {table} set {c} = {'default' if c.endswith('_secret') else c}")
                for c in cols}
    assert {c for c, o in outcomes.items() if o[0] != "denied"} == expected
    for c in expected:  # and the policy lets a global admin reach the rows
        assert outcomes[c][0] == "error" or outcomes[c][1] > 0, (c, outcomes[c])


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("table", sorted(POLICY))
def test_delete(conn: psycopg.Connection[Any], table: str, role: str) -> None:
    if is_view(conn, table):
        assert write_privileges(conn, table, role) == expected_writes(table, role)
        return
    outcome = attempt(conn, role, f"delete from {table}")
    if POLICY[table][role].delete:
        assert outcome[0] == "error" or outcome[1] > 0, outcome  # a foreign key may refuse, RLS may not
    else:
        assert outcome[0] == "denied" or outcome == ("ok", 0)


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
    """Engine functions: service_role only. The policies' helpers: authenticated and
    service_role. Trigger functions: no API role (they run as triggers).

    Every function is found in the catalog, so one a later migration adds without revoking
    PUBLIC's EXECUTE fails here. (Default privileges cannot do this for us: a per-schema
    ``alter default privileges ... revoke execute from public`` has no effect, because PUBLIC's
    EXECUTE is a global default, and changing the global one would change the whole Supabase
    project, not just this schema.)"""
    found = functions(conn)
    assert len(found) >= 20
    assert POLICY_HELPERS <= {fn["name"] for fn in found}
    wrong = []
    for fn in found:
        may = (role == "service_role" and fn["name"].startswith("zerfaux.") and not fn["is_trigger"]) or (
            role == "authenticated" and fn["name"] in POLICY_HELPERS)
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


# --- the row matrix ---------------------------------------------------------------------------

# Persona -> (database role, JWT sub, level). A group-scoped persona holds its level in `gold`
# only; ADMIN holds it everywhere.
PERSONAS: dict[str, tuple[str, str | None, int]] = {
    "anon": ("anon", None, 0),
    "stranger": ("authenticated", STRANGER, 0),
    "viewer": ("authenticated", VIEWER, 1),
    "operator": ("authenticated", OPERATOR, 2),
    "group_admin": ("authenticated", GROUP_ADMIN, 3),
    "admin": ("authenticated", ADMIN, 4),
    "service_role": ("service_role", None, 5),
}
GLOBAL = {"admin", "service_role"}
NEED = {"viewer": 1, "operator": 2, "group_admin": 3, "admin": 4, "service_role": 5}


@dataclass(frozen=True)
class Check:
    """A request, on the row of a group: `{group}`, `{vc}`, `{target}` name `gold`'s or the other
    group's. `need` is the least persona that may; `scoped` says whether a group-scoped persona
    may only in its own group (else the request concerns no group)."""

    name: str
    sql: str
    need: str
    scoped: bool = True
    setup: str = ""


SCOPES = {"mine": {"group": GROUP, "vc": PRIMARY, "target": TARGET, "run": RUN_MINE},
          "other": {"group": OTHER, "vc": OTHER_VC, "target": OTHER_TARGET, "run": RUN_OTHER}}
NEW_VM = ("insert into vcenter_vms (id, vcenter_id, moref, name) values"
          " ('20000000-0000-4000-9000-000000000001', '{vc}', 'vm-new', 'new-01')")

CHECKS = [
    Check("read its vCenter", "select 1 from vcenters where id = '{vc}'", "viewer"),
    Check("ask for a sync", "update vcenters set sync_requested_at = now() where id = '{vc}'", "operator"),
    Check("move a vCenter", "update vcenters set host = 'moved.example' where id = '{vc}'", "admin"),
    Check("add a vCenter", "insert into vcenters (name, host) values ('vc-new', 'new.example')", "admin", False),
    Check("remove a vCenter", f"delete from vcenters where id = '{SPARE_VC}'", "admin", False),
    Check("read the inventory", "select 1 from vcenter_vms where vcenter_id = '{vc}'", "viewer"),
    Check("read the datastores", "select 1 from vcenter_datastores where vcenter_id = '{vc}'", "viewer"),
    Check("rename a VM", "update vcenter_vms set name = 'x' where vcenter_id = '{vc}'", "service_role"),
    Check("read its target", "select 1 from replication_targets where id = '{target}'", "viewer"),
    Check("change a target", "update replication_targets set max_concurrent = 9 where id = '{target}'", "admin"),
    Check("add a target", "insert into replication_targets (name, ssh_host, target_root)"
                          " values ('t-new', 'h', 'tank/new')", "admin", False),
    Check("remove a target", f"delete from replication_targets where id = '{SPARE_TARGET}'", "admin", False),
    Check("read its group", "select 1 from protection_groups where id = '{group}'", "viewer"),
    Check("change a group", "update protection_groups set retention_snapshots = 1 where id = '{group}'", "admin"),
    Check("pause or resume its group", "update protection_groups set paused = not paused where id = '{group}'",
          "operator"),
    Check("pause and change a group", "update protection_groups set paused = not paused, rpo_minutes = 1"
                                      " where id = '{group}'", "admin"),
    Check("set a group's interval", "update protection_groups set replication_interval_minutes = 1"
                                    " where id = '{group}'", "admin"),
    Check("add a group", "insert into protection_groups (name) values ('g-new')", "admin", False),
    Check("remove a group", f"delete from protection_groups where id = '{SPARE_GROUP}'", "admin", False),
    Check("read protected VMs", "select 1 from protected_vms where protection_group_id = '{group}'", "viewer"),
    Check("protect a VM", "insert into protected_vms (protection_group_id, vm_id) values"
                          " ('{group}', '20000000-0000-4000-9000-000000000001')", "operator", setup=NEW_VM),
    Check("ask for a DR shell", "update protected_vms set needs_dr_shell = true"
                                " where protection_group_id = '{group}'", "operator"),
    Check("set a boot order", "update protected_vms set boot_priority = 1, boot_delay_seconds = 30,"
                              " tools_timeout_seconds = 0 where protection_group_id = '{group}'", "operator"),
    Check("read network mappings", "select 1 from network_mappings where protection_group_id = '{group}'", "viewer"),
    Check("map a network", "insert into network_mappings (protection_group_id, source_network, recovery_network)"
                           " values ('{group}', 'App Network', 'DR App')", "admin"),
    Check("remap a network", "update network_mappings set test_network = 'Test LAN'"
                             " where protection_group_id = '{group}'", "admin"),
    Check("unmap a network", "delete from network_mappings where protection_group_id = '{group}'", "admin"),
    Check("unprotect a VM", "delete from protected_vms where protection_group_id = '{group}'", "operator"),
    Check("read jobs", "select 1 from replication_jobs where protection_group_id = '{group}'", "viewer"),
    Check("ask for a replication", "insert into replication_jobs (protection_group_id) values ('{group}')",
          "operator", setup="update replication_jobs set status = 'completed' where protection_group_id = '{group}'"),
    Check("cancel a job", "update replication_jobs set cancel_requested = true"
                          " where protection_group_id = '{group}'", "operator"),
    Check("delete a job", "delete from replication_jobs where protection_group_id = '{group}'", "service_role"),
    Check("read recovery runs", "select 1 from recovery_runs where protection_group_id = '{group}'", "viewer"),
    Check("read a run's steps", "select 1 from recovery_run_steps where run_id = '{run}'", "viewer"),
    Check("read a run's operation", "select 1 from zerfaux.operations where subject_id = '{run}'", "viewer"),
    Check("start a test", "insert into recovery_runs (protection_group_id, kind) values ('{group}', 'test')",
          "operator"),
    Check("clean up a test", "insert into recovery_runs (protection_group_id, kind, test_run_id)"
                             " values ('{group}', 'cleanup', '{run}')", "operator",
          setup="update recovery_runs set status = 'active' where id = '{run}'"),
    Check("cancel a run", "update recovery_runs set cancel_requested = true where id = '{run}'", "operator",
          setup="update recovery_runs set status = 'pending', completed_at = null where id = '{run}'"),
    Check("end a run", "update recovery_runs set status = 'failed' where id = '{run}'", "service_role"),
    # Issue 14: the failover kinds are an admin's; where a group stands is the engine's.
    Check("fail a group over", "insert into recovery_runs (protection_group_id, kind) values ('{group}', 'failover')",
          "group_admin"),
    # The world's replication job is done first: a migration does not start beside one
    # (recovery_runs_replication_in_flight).
    Check("migrate a group", "insert into recovery_runs (protection_group_id, kind)"
                             " values ('{group}', 'planned_migration')", "group_admin",
          setup="update replication_jobs set status = 'completed' where protection_group_id = '{group}'"
                " and status in ('pending', 'running')"),
    Check("set a group's commit policy", "update protection_groups set commit_policy = 'commit',"
                                         " commit_timeout_minutes = 30 where id = '{group}'", "admin"),
    Check("set a group's state", "update protection_groups set state = 'failed_over' where id = '{group}'",
          "service_role"),
    Check("flip a group's direction", "update protection_groups set direction = 'reverse' where id = '{group}'",
          "service_role"),
    Check("set a shutdown timeout", "update protected_vms set shutdown_timeout_seconds = 60"
                                    " where protection_group_id = '{group}'", "operator"),
    Check("write a step", "insert into recovery_run_steps (run_id, seq, name) values ('{run}', 2, 'activate')",
          "service_role"),
    Check("delete a run", "delete from recovery_runs where id = '{run}'", "service_role"),
    Check("read its sync operation", "select 1 from zerfaux.operations where subject_id = '{vc}'", "viewer"),
    Check("read its job's operation", "select 1 from zerfaux.operations o join replication_jobs j"
                                      " on j.id = o.subject_id where j.protection_group_id = '{group}'", "viewer"),
    Check("read its VM's operation", "select 1 from zerfaux.operations o join protected_vms p"
                                     " on p.id = o.subject_id where p.protection_group_id = '{group}'", "viewer"),
    Check("cancel an operation", "update zerfaux.operations set cancel_requested = true"
                                 " where subject_id = '{vc}'", "service_role"),
    Check("read the workers", "select 1 from zerfaux.workers", "viewer", False),
    Check("read another's role", f"select 1 from zerfaux.operators where user_id = '{BYSTANDER}'"
                                 " and protection_group_id = '{group}'", "group_admin"),
    Check("grant a role", "insert into zerfaux.operators (user_id, role, protection_group_id)"
                          " values (gen_random_uuid(), 'operator', '{group}')", "group_admin"),
    Check("change a role", f"update zerfaux.operators set role = 'admin' where user_id = '{BYSTANDER}'"
                           " and protection_group_id = '{group}'", "group_admin"),
    Check("revoke a role", f"delete from zerfaux.operators where user_id = '{BYSTANDER}'"
                           " and protection_group_id = '{group}'", "group_admin"),
    Check("grant a global role", "insert into zerfaux.operators (user_id, role) values (gen_random_uuid(), 'viewer')",
          "admin", False),
]


def expected(persona: str, check: Check, scope: str) -> bool:
    level = PERSONAS[persona][2]
    if level < NEED[check.need]:
        return False
    return not check.scoped or scope == "mine" or persona in GLOBAL


@pytest.mark.parametrize(("check", "scope"), [
    pytest.param(c, scope, id=f"{c.name}-{scope}") for c in CHECKS for scope in (SCOPES if c.scoped else ["any"])])
@pytest.mark.parametrize("persona", list(PERSONAS))
def test_row_matrix(conn: psycopg.Connection[Any], persona: str, check: Check, scope: str) -> None:
    role, user, _ = PERSONAS[persona]
    names = SCOPES.get(scope, SCOPES["mine"])
    sql, setup = check.sql.format(**names), check.setup.format(**names)
    outcome = attempt(conn, role, sql, user=user, setup=setup)
    did = outcome[0] == "ok" and outcome[1] > 0
    assert did == expected(persona, check, scope), outcome


@pytest.mark.parametrize("persona", ["viewer", "operator", "group_admin", "admin"])
def test_a_user_reads_its_own_roles(conn: psycopg.Connection[Any], persona: str) -> None:
    role, user, _ = PERSONAS[persona]
    with conn.transaction(force_rollback=True):
        become(conn, role, user)
        mine = conn.execute("select role, protection_group_id from zerfaux.operators"
                            " where user_id = (select auth.uid())").fetchall()
    assert len(mine) == 1


def test_a_stranger_sees_nothing_anywhere(conn: psycopg.Connection[Any]) -> None:
    """Signed up, no row in zerfaux.operators: every table it may select from reads empty."""
    seen = {}
    with conn.transaction(force_rollback=True):
        become(conn, "authenticated", STRANGER)
        for table, access in POLICY.items():
            if access["authenticated"].select:
                cols = columns(conn, table)
                col = "id" if "id" in cols else cols[0]
                seen[table] = len(conn.execute(f"select {col} from {table}").fetchall())  # type: ignore[arg-type]
    assert seen and set(seen.values()) == {0}, seen


# --- what a person does, end to end ------------------------------------------------------------

def ask_for_everything(session: psycopg.Connection[Any], persona: str) -> dict[str, Any]:
    """A frontend's requests as `persona`; then what they changed, read as the owner."""
    role, user, _ = PERSONAS[persona]
    with session.transaction(force_rollback=True):
        session.execute("update public.replication_jobs set status = 'completed'")
        become(session, role, user)
        session.execute("update public.vcenters set sync_requested_at = now() + interval '1 hour'")
        session.execute("update public.protected_vms set needs_dr_shell = true")
        try:
            with session.transaction():
                session.execute("insert into public.replication_jobs (protection_group_id) values (%s)", (GROUP,))
        except psycopg.errors.InsufficientPrivilege:
            pass
        session.execute("update public.replication_jobs set cancel_requested = true")
        session.execute("reset role")
        return {
            "synced": sorted(r[0] for r in session.execute(
                "select id::text from vcenters where sync_requested_at > now() + interval '30 minutes'")),
            "shells": sorted(r[0] for r in session.execute(
                "select protection_group_id::text from protected_vms where needs_dr_shell")),
            "jobs": [r[0] for r in session.execute("select status from replication_jobs where status <> 'completed'")],
            "cancelled": [r[0] for r in session.execute(
                "select distinct protection_group_id::text from replication_jobs where cancel_requested")],
            "shell_ops": int(session.execute(
                "select count(*) from zerfaux.operations where kind = 'vm.dr_shell'").fetchone()[0]),  # type: ignore[index]
        }


def test_an_operator_asks_for_work_in_its_group_only(policy_db: Database) -> None:
    with psycopg.connect(policy_db.url, autocommit=True) as session:
        done = ask_for_everything(session, "operator")
    assert done == {"synced": sorted([PRIMARY, DR]), "shells": [GROUP], "jobs": ["cancelled"],
                    "cancelled": [GROUP], "shell_ops": 1}


def test_a_stranger_who_signed_up_changes_nothing(policy_db: Database) -> None:
    with psycopg.connect(policy_db.url, autocommit=True) as session:
        done = ask_for_everything(session, "stranger")
    assert done == {"synced": [], "shells": [], "jobs": [], "cancelled": [], "shell_ops": 0}
