"""Apply ``supabase/migrations/*.sql`` in order, as the Supabase CLI would.

Each file runs in one transaction and is recorded in ``supabase_migrations.schema_migrations``
(the CLI's own table), so ``supabase db push`` and ``zerfaux migrate`` agree on what is applied.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg

from listener import migrate_guard

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9_\-]+)\.sql$")
_CHECKOUT = Path(__file__).resolve().parent.parent


class MigrationError(RuntimeError):
    """A migration failed (nothing of it was applied), or there are none to apply."""


def sql_root() -> Traversable:
    """Where ``migrations/`` and ``seed.sql`` are: the ``zerfaux_sql`` package data an install
    ships (setup.py maps that package onto ``supabase/``, so git holds one copy), or, run from a
    checkout that was never installed, its ``supabase/`` directory."""
    try:
        return importlib.resources.files("zerfaux_sql")
    except ModuleNotFoundError:
        pass  # not installed: a checkout run in place
    except NotADirectoryError:
        # An editable install: setuptools' finder hook sits in the namespace path beside the
        # mapped directory, and importlib.resources (3.11) refuses anything but directories.
        spec = importlib.util.find_spec("zerfaux_sql")
        for location in (spec.submodule_search_locations or []) if spec else []:
            if Path(location, "migrations").is_dir():
                return Path(location)
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "supabase" / "migrations").is_dir():
        return _CHECKOUT / "supabase"
    raise MigrationError(
        "no migrations found: this installation of zerfaux has no zerfaux_sql package (the SQL of "
        "supabase/migrations); reinstall it from a wheel or checkout built with setup.py"
    )


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Traversable


_BOOKKEEPING = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
    version text primary key, statements text[], name text
);
"""


def discover(directory: Traversable | None = None) -> list[Migration]:
    """The migration files in order; ``MigrationError`` when there are none (a package built
    without its SQL would otherwise report "up to date" and apply nothing)."""
    where = directory if directory is not None else sql_root() / "migrations"
    files = sorted((f for f in where.iterdir() if f.name.endswith(".sql") and f.is_file()),
                   key=lambda f: f.name) if where.is_dir() else []
    if not files:
        raise MigrationError(
            f"no migrations found in {where}: expected <timestamp>_<name>.sql files (the "
            "package's zerfaux_sql/migrations, supabase/migrations in a checkout)"
        )
    found = []
    for path in files:
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named <timestamp>_<name>.sql")
        found.append(Migration(match["version"], match["name"], path))
    return found


_NOT_PERMITTED = (
    "; run `zerfaux migrate` as the role that owns the project's schema public (on Supabase: "
    "postgres). A role that is not a superuser also needs the API roles anon, authenticated and "
    "service_role to exist already (a superuser creates them on bare Postgres; Supabase has them) "
    "and to own publication supabase_realtime if it exists: docs/deploy-supabase.md, \"Running "
    "as a role that is not a superuser\""
)


def _log_notice(diag: psycopg.errors.Diagnostic) -> None:
    level = logging.WARNING if diag.severity_nonlocalized == "WARNING" else logging.INFO
    log.log(level, "migration: %s", diag.message_primary)


def migrate(conninfo: str, directory: Traversable | None = None) -> list[Migration]:
    """Apply what is pending; return what was applied (empty when up to date)."""
    applied: list[Migration] = []
    migrations = discover(directory)  # before connecting: a build without its SQL fails here
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # One migrator at a time, whoever else starts alongside.
        conn.execute("select pg_advisory_lock(hashtext('zerfaux.migrate'))")
        try:
            conn.execute(_BOOKKEEPING)
            done = {row[0] for row in conn.execute("select version from supabase_migrations.schema_migrations")}
            # A migration says what it skipped or what to check (a feature absent, a relation
            # of the application) with RAISE NOTICE; the operator reads it in the log.
            conn.add_notice_handler(_log_notice)
            for migration in migrations:
                if migration.version in done:
                    continue
                sql = migration.path.read_text()
                ours = migrate_guard.GUARDED.get(migration.version)
                try:
                    with conn.transaction():
                        before = migrate_guard.snapshot(conn, ours) if ours is not None else None
                        conn.execute(sql)
                        if ours is not None and before is not None:
                            migrate_guard.restore(conn, before, ours, migration.path.name)
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
                        + (_NOT_PERMITTED if isinstance(exc, psycopg.errors.InsufficientPrivilege) else "")
                    ) from exc
                log.info("applied migration %s", migration.path.name)
                applied.append(migration)
        finally:
            conn.execute("select pg_advisory_unlock(hashtext('zerfaux.migrate'))")
    return applied


def seed(conninfo: str, path: Traversable | None = None) -> None:
    """Load the demo data; the file is written to be safe to load again."""
    source = path if path is not None else sql_root() / "seed.sql"
    if not source.is_file():
        raise MigrationError(f"no seed found at {source}: the package was built without supabase/seed.sql")
    with psycopg.connect(conninfo) as conn:
        conn.execute(source.read_text())
