"""Real Postgres for the tests: migrations applied once into a template, cloned per test.

The server is ``ZERFAUX_TEST_DATABASE_URL`` (or ``DATABASE_URL``), else 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.rows import dict_row

from listener.migrate import migrate
from tests.support.require import missing

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get("ZERFAUX_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_URL


def url_for(database: str, base: str | None = None) -> str:
    parts = urlsplit(base or admin_url())
    return urlunsplit(parts._replace(path="/" + database))


@dataclass
class Database:
    name: str
    url: str

    def sql(self, query: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def one(self, query: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None) -> dict[str, Any]:
        rows = self.sql(query, params)
        assert rows, f"no row from: {query}"
        return rows[0]

    def value(self, query: str, params: Mapping[str, Any] | tuple[Any, ...] | None = None) -> Any:
        return next(iter(self.one(query, params).values()))


def _admin(sql: str) -> None:
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def create_database(template: str | None = None) -> Database:
    name = f"zf_test_{uuid.uuid4().hex[:12]}"
    _admin(f'create database "{name}"' + (f' template "{template}"' if template else ""))
    return Database(name, url_for(name))


def drop_database(name: str) -> None:
    _admin(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def pg_server() -> str:
    try:
        with psycopg.connect(admin_url(), connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        missing("Postgres", f"{admin_url()}: {exc}")
    return admin_url()


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    template = create_database()
    migrate(template.url)
    yield template.name
    drop_database(template.name)


@pytest.fixture
def db(pg_template: str) -> Iterator[Database]:
    database = create_database(pg_template)
    yield database
    drop_database(database.name)


@pytest.fixture
def empty_db(pg_server: str) -> Iterator[Database]:
    database = create_database()
    yield database
    drop_database(database.name)


@pytest.fixture
def seeded_db(db: Database) -> Database:
    from listener.migrate import seed

    seed(db.url)
    return db
