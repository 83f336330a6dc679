"""Retention grids in the database: the SQL parser agrees with the Python one, and a bad grid is refused.

The same strings go through ``handlers.backends.zfs.grid.grid_error`` and
``zerfaux.retention_grid_error``: both accept the same ones and give the same message for the
others. A group whose grid does not parse cannot be saved; the error names the column and shows a
grid that would do.
"""

from __future__ import annotations

import psycopg
import pytest

from handlers.backends.zfs.grid import EXAMPLE, grid_error
from tests.integration.conftest import GROUP
from tests.support.pg import Database

VALID = [
    EXAMPLE,
    "1x1h(keep=all) | 24x1h | 35x1d | 6x30d",
    "1x15m",
    " 3 x 5 m ( keep = 2 ) ",
    "\t1x1s|1x1s",
    "2x1w(keep=all)|1x1d",  # shorter after keep=all only: allowed
    "1x1h(keep=all) | 1x10m(keep=all) | 1x1m",
    "1x1d(keep=01)",
    "5214x1w",  # just under 100 years
    "999999999x1s",
]
INVALID = [
    "",
    "   ",
    "1x1h|",
    "|1x1h",
    "1x1h||1x1d",
    "1x1q",
    "1x1H",
    "1h",
    "x1h",
    "1x1",
    "1x1h keep=all",
    "1x1h(keep=)",
    "1x1h(keep=0)",
    "1x1h(keep=none)",
    "1x1h(keep=2a)",
    "0x1h",
    "1x0h",
    "-1x1h",
    "1.5x1h",
    "1x1d | 1x1h",
    "1x1h(keep=all) | 1x1d | 1x1h",
    "1x1hour",
    "1x1h(keep=all",
    "1\u00a0x1h",  # a no-break space is not a space here
    "\u0661x1h",  # an Arabic-Indic digit is not a digit
    "1234567890x1s",
    "5215x1w",  # over 100 years
    "1x1h\n",
    'a"b',
]


@pytest.mark.parametrize("text", VALID + INVALID)
def test_python_and_sql_parsers_agree(db: Database, text: str) -> None:
    in_sql = db.value("select zerfaux.retention_grid_error(%s)", (text,))
    assert in_sql == grid_error(text)
    assert (in_sql is None) == (text in VALID), in_sql


def test_null_is_no_grid(db: Database) -> None:
    assert db.value("select zerfaux.retention_grid_error(null)") is None
    assert grid_error(None) is None


@pytest.mark.parametrize("column", ["retention_grid", "source_retention_grid"])
def test_a_bad_grid_is_refused_with_the_column_named(seeded_db: Database, column: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        seeded_db.sql(f"update protection_groups set {column} = '24x1h | 1x1q' where id = %s", (GROUP,))
    message = str(refused.value)
    assert f"protection_groups.{column}:" in message
    assert 'interval 2 "1x1q" has unit "q"' in message
    assert EXAMPLE in message
    assert refused.value.diag.column_name == column
    assert seeded_db.value(f"select {column} from protection_groups where id = %s", (GROUP,)) is None


def test_a_good_grid_is_stored_and_a_bad_insert_refused(seeded_db: Database) -> None:
    seeded_db.sql("update protection_groups set retention_grid = %s, source_retention_grid = '1x1d(keep=all)'"
                  " where id = %s", (EXAMPLE, GROUP))
    assert seeded_db.value("select retention_grid from protection_groups where id = %s", (GROUP,)) == EXAMPLE
    with pytest.raises(psycopg.errors.CheckViolation, match="protection_groups.source_retention_grid: is empty"):
        seeded_db.sql("insert into protection_groups (name, source_retention_grid) values ('bad-grid', ' ')")
