"""The pgTAP tests of ``supabase/tests/`` (what ``supabase test db`` runs), run by ``pg_prove``
against a clone of the migrated template, so ``make test`` holds them to the same migrations."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg
import pytest

from tests.support.pg import Database, create_database, drop_database
from tests.support.require import missing

TESTS = Path(__file__).resolve().parents[2] / "supabase" / "tests"


@pytest.fixture
def tap_db(pg_template: str) -> Iterator[Database]:
    db = create_database(pg_template)
    try:
        try:
            db.sql("create extension pgtap")
        except psycopg.Error as exc:
            missing("pgTAP", f"create extension pgtap: {exc} (Debian: postgresql-15-pgtap)")
        yield db
    finally:
        drop_database(db.name)


def libpq_env(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    env = {"PGDATABASE": parts.path.lstrip("/"), "PGHOST": parts.hostname or "127.0.0.1",
           "PGPORT": str(parts.port or 5432), "PGUSER": unquote(parts.username or "postgres")}
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


def test_the_pgtap_suite_passes(tap_db: Database) -> None:
    prove = shutil.which("pg_prove")
    if prove is None:
        missing("pg_prove", "not on PATH (Debian: postgresql-15-pgtap)")
    files = sorted(str(p) for p in TESTS.glob("*.sql"))
    assert files, f"no pgTAP tests in {TESTS}"
    run = subprocess.run([prove, "--failures", *files], env={**os.environ, **libpq_env(tap_db.url)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Result: PASS" in run.stdout, run.stdout + run.stderr
