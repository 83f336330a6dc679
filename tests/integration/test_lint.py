"""``plpgsql_check`` over every PL/pgSQL function of ``public`` and ``zerfaux``, all warnings on,
as ``supabase db lint`` does: no error and no warning, or the suite fails naming each finding.

Checked statically, so every path of every function is covered, including the ones no test
runs: an unknown column, a type mismatch, a constant EXECUTE naming a missing relation, a
variable never read. A trigger function is checked with the table it is attached to; one
attached to no table cannot be checked and fails here too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from listener import sqlfile
from tests.support.pg import Database, create_database, drop_database
from tests.support.require import missing

QUERIES = sqlfile.load(Path(__file__).with_name("plpgsql_lint.sql"))


@pytest.fixture(scope="module")
def lint_db(pg_template: str) -> Iterator[Database]:
    db = create_database(pg_template)
    try:
        try:
            db.sql("create schema lint; create extension plpgsql_check schema lint")
        except psycopg.Error as exc:
            missing("plpgsql_check", f"create extension plpgsql_check: {exc} (Debian: postgresql-15-plpgsql-check)")
        yield db
    finally:
        drop_database(db.name)


def test_every_plpgsql_function_passes_plpgsql_check(lint_db: Database) -> None:
    assert lint_db.value(QUERIES["checked"]) >= 30, "too few PL/pgSQL functions found: is the schema there?"
    findings = [f"{r['function']}{' on ' + r['relation'] if r['relation'] else ''} line {r['lineno']}: "
                f"{r['level']} {r['sqlstate']} {r['message']}" + (f" ({r['detail']})" if r['detail'] else "")
                for r in lint_db.sql(QUERIES["findings"])]
    assert findings == []


def test_every_trigger_function_is_attached_so_it_can_be_checked(lint_db: Database) -> None:
    assert lint_db.sql(QUERIES["unattached_triggers"]) == []


def test_the_check_finds_what_it_should(lint_db: Database) -> None:
    """The same query on a function with a known fault: the test can fail."""
    lint_db.sql("""create function zerfaux.lint_canary() returns integer language plpgsql
                   set search_path = zerfaux, pg_temp as $$
                   declare v_unused integer; begin return (select count(*) from zerfaux.no_such_table); end $$""")
    try:
        found = {(r["function"], r["level"]) for r in lint_db.sql(QUERIES["findings"])}
        assert ("zerfaux.lint_canary()", "error") in found
        assert ("zerfaux.lint_canary()", "warning extra") in found or ("zerfaux.lint_canary()", "warning") in found
    finally:
        lint_db.sql("drop function zerfaux.lint_canary()")
