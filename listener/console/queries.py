"""The console's database access: the only module of the console that runs SQL.

Every page and every action is one transaction as the signed-in user: ``set local role
authenticated``, the user's verified JWT claims in ``request.jwt.claims`` (what ``auth.uid()``
reads, on Supabase and on a bare Postgres alike), then the named queries of console.sql. When
the transaction ends the role and the claims end with it, so a pooled connection never carries
one person's identity into another's request.

The live feed's refresh is the one query that runs as the listener itself (all groups, once per
tick for every client); the feed filters its rows per client (feed.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from listener import sqlfile
from listener.config import redact_url
from listener.console.auth import Identity

log = logging.getLogger(__name__)

QUERIES = sqlfile.load(Path(__file__).with_name("console.sql"))
STATEMENT_TIMEOUT = "10s"
# A request's whole time with the database: waiting for a connection (and its check, which has
# no timeout of its own: a half-open connection would hang it for ever), the statements, the
# commit. Past it the request is answered "unavailable" and the connection is dropped (psycopg
# then spends up to 10 s more trying to cancel the statement on a hung network).
DEADLINE_SECONDS = 12.0


class Refused(Exception):
    """The database refused (any SQLSTATE error): ``message`` is its own words."""

    def __init__(self, message: str, sqlstate: str | None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint


class Unavailable(Exception):
    """The database does not answer; nothing was done."""


class Session:
    """The queries of one transaction as one user."""

    def __init__(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        self._conn = conn

    async def rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        cur = await self._conn.execute(QUERIES[name], params or {})
        return cast(list[dict[str, Any]], await cur.fetchall()) if cur.description else []

    async def one(self, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        rows = await self.rows(name, params)
        return rows[0] if rows else None


class ConsoleDB:
    def __init__(self, conninfo: str, *, pool_size: int = 4,
                 connection_class: type[psycopg.AsyncConnection[Any]] = psycopg.AsyncConnection) -> None:
        self.description = redact_url(conninfo)
        self.deadline = DEADLINE_SECONDS
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo, min_size=1, max_size=pool_size, open=False, connection_class=connection_class,
            kwargs={"autocommit": True, "row_factory": dict_row}, timeout=10.0,
            check=AsyncConnectionPool.check_connection,
        )
        self._opened = False
        self._detected = False
        self.has_runs = False  # recovery_runs exists (issue 13's migration applied)

    async def open(self) -> None:
        """Start the pool (once) without waiting for the database: a database that is down when
        the console is first used must not break the pool for good (a pool whose first open
        timed out cannot be opened again); the pool keeps reconnecting in the background and
        each request waits at most its own deadline."""
        if not self._opened:
            self._opened = True
            await self._pool.open(wait=False)
        if not self._detected:
            await self.detect()

    async def detect(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(QUERIES["has_runs"])
            row = await cur.fetchone()
            self.has_runs = bool(row and row["present"])
        self._detected = True

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    @asynccontextmanager
    async def as_user(self, identity: Identity) -> AsyncIterator[Session]:
        """A transaction as ``identity``; a database error becomes Refused (its message), a lost
        or hung database Unavailable. Anything raised inside rolls the whole transaction back."""
        try:
            async with asyncio.timeout(self.deadline):
                await self.open()
                async with self._pool.connection() as conn:
                    async with conn.transaction():
                        await conn.execute("set local role authenticated")
                        await conn.execute(QUERIES["as_user"], {"claims": json.dumps(dict(identity.claims)),
                                                                "timeout": STATEMENT_TIMEOUT})
                        yield Session(conn)
        except (psycopg.OperationalError, PoolTimeout, TimeoutError) as exc:
            log.warning("console: database unreachable: %s", exc or "no answer in time")
            raise Unavailable(f"the database ({self.description}) does not answer") from exc
        except psycopg.Error as exc:
            diag = exc.diag
            message = diag.message_primary or str(exc).strip().splitlines()[0]
            raise Refused(message, exc.sqlstate, diag.message_hint) from exc

    async def as_listener(self, name: str) -> list[dict[str, Any]]:
        """A read as the listener's own role: only for the feed's shared refresh."""
        try:
            async with asyncio.timeout(self.deadline):
                await self.open()
                async with self._pool.connection() as conn:
                    cur = await conn.execute(QUERIES[name])
                    return cast(list[dict[str, Any]], await cur.fetchall())
        except (psycopg.OperationalError, PoolTimeout, TimeoutError) as exc:
            raise Unavailable(f"the database ({self.description}) does not answer") from exc
