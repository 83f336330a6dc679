"""Apply ``supabase/migrations/*.sql`` in order, as the Supabase CLI would.

Each file runs in one transaction and is recorded in ``supabase_migrations.schema_migrations``
(the CLI's own table), so ``supabase db push`` and ``zerfaux migrate`` agree on what is applied.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "supabase" / "migrations"
SEED_FILE = MIGRATIONS_DIR.parent / "seed.sql"
_FILE = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9_\-]+)\.sql$")

_BOOKKEEPING = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
    version text primary key, statements text[], name text
);
"""


class MigrationError(RuntimeError):
    """A migration failed; nothing of it was applied."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named <timestamp>_<name>.sql")
        found.append(Migration(match["version"], match["name"], path))
    return found


def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is pending; return what was applied (empty when up to date)."""
    applied: list[Migration] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # One migrator at a time, whoever else starts alongside.
        conn.execute("select pg_advisory_lock(hashtext('zerfaux.migrate'))")
        try:
            conn.execute(_BOOKKEEPING)
            done = {row[0] for row in conn.execute("select version from supabase_migrations.schema_migrations")}
            for migration in discover(directory):
                if migration.version in done:
                    continue
                sql = migration.path.read_text()
                try:
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute(
                            "insert into supabase_migrations.schema_migrations (version, statements, name)"
                            " values (%s, %s, %s)",
                            (migration.version, [sql], migration.name),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {migration.path.name} failed and was rolled back: "
                        f"{exc.diag.message_primary or exc}"
                        + (f" (at: {exc.diag.context.splitlines()[0]})" if exc.diag.context else "")
                    ) from exc
                log.info("applied migration %s", migration.path.name)
                applied.append(migration)
        finally:
            conn.execute("select pg_advisory_unlock(hashtext('zerfaux.migrate'))")
    return applied


def seed(conninfo: str, path: Path = SEED_FILE) -> None:
    """Load the demo data; the file is written to be safe to load again."""
    with psycopg.connect(conninfo) as conn:
        conn.execute(path.read_text())
