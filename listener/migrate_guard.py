"""Keep an application's privileges in ``public`` as they were across a landed migration that
ran blanket statements there.

``20261126090300_security.sql`` (landed, so never edited) revokes everything on *all* tables of
``public`` from anon and authenticated and grants everything on them to service_role. Installed
into a Supabase project that already holds an application, that strips the application's own
tables of their API grants. The runner therefore snapshots, inside the migration's transaction,
every privilege on the relations of ``public`` that are not Zerfaux's, applies the file byte for
byte (what it records stays what the Supabase CLI would record), and puts back what changed: it
grants what was lost and revokes what was added. Nobody sees the stripped state, since it is one
transaction. A privilege granted by another role than the migrating one survives the file's
REVOKE anyway (a REVOKE removes only the grants its issuer made), so re-granting as the
migrating role gives back the same grantor.

Later migrations name Zerfaux's objects only; ``tests/integration/test_supabase_install.py``
fails on any new blanket statement on ``public``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from listener import sqlfile

log = logging.getLogger(__name__)

_QUERIES = sqlfile.load(Path(__file__).with_name("migrate_guard.sql"))

# The migrations with blanket statements on public, and the relations of public that were
# Zerfaux's when each ran: those it may change, every other one it may not.
GUARDED: dict[str, tuple[str, ...]] = {
    "20261126090300": ("vcenters", "vcenter_vms", "vcenter_datastores", "replication_targets",
                       "protection_groups", "protected_vms", "replication_jobs"),
}

_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "USAGE"}


class Privilege(NamedTuple):
    relation: str  # already quoted: schema.name
    is_sequence: bool
    attname: str | None
    grantor: str
    grantee: str
    privilege_type: str
    is_grantable: bool


def snapshot(conn: psycopg.Connection[Any], ours: tuple[str, ...]) -> set[Privilege]:
    rows = conn.execute(_QUERIES["public_privileges"], {"ours": list(ours)}).fetchall()  # type: ignore[arg-type]
    return {Privilege(*row) for row in rows}


def _statement(p: Privilege, grant: bool) -> sql.Composed:
    if p.privilege_type not in _PRIVILEGES:
        raise ValueError(f"unexpected privilege {p.privilege_type!r} on {p.relation}")
    relation = sql.SQL(p.relation)  # quoted by the query (quote_ident)
    grantee = sql.SQL("public") if p.grantee == "public" else sql.Identifier(p.grantee)
    column = sql.SQL(" ({})").format(sql.Identifier(p.attname)) if p.attname else sql.SQL("")
    kind = sql.SQL("sequence" if p.is_sequence else "table")
    if grant:
        option = sql.SQL(" with grant option") if p.is_grantable else sql.SQL("")
        return sql.SQL("grant {}{} on {} {} to {}{}").format(
            sql.SQL(p.privilege_type), column, kind, relation, grantee, option)
    return sql.SQL("revoke {}{} on {} {} from {}").format(
        sql.SQL(p.privilege_type), column, kind, relation, grantee)


def restore(conn: psycopg.Connection[Any], before: set[Privilege], ours: tuple[str, ...],
            migration: str) -> None:
    """Make the privileges of the other relations of public what they were in ``before``."""
    after = snapshot(conn, ours)
    present = {p.relation for p in after}
    lost = sorted((p for p in before - after if p.relation in present), key=str)  # a dropped relation is not ours to recreate
    added = sorted(after - before, key=str)
    for p in added:
        conn.execute(_statement(p, grant=False))
    for p in lost:
        conn.execute(_statement(p, grant=True))
    if lost or added:
        log.info("%s: kept the privileges of the application's relations in public as they were "
                 "(%d put back, %d taken back)", migration, len(lost), len(added))
    left = snapshot(conn, ours) ^ {p for p in before if p.relation in present}
    if left:
        log.warning("%s: %d privileges of the application's relations in public could not be put "
                    "back exactly (granted by another role?): %s; see docs/deploy-supabase.md",
                    migration, len(left), ", ".join(sorted(f"{p.privilege_type} on {p.relation} "
                                                           f"to {p.grantee}" for p in left))[:2000])
