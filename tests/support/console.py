"""The DR console under real uvicorn on loopback, on a real database, and the JWTs to sign in
with: shared by the HTTP tests, the browser tests and bench/console.py."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import jwt
import psycopg

from listener.console import Console, build_console
from listener.http import build_server, create_app, run_server
from listener.metrics import Metrics
from listener.store_pg import PostgresStore
from tests.support.pg import Database

SECRET = "console-test-secret-" + "x" * 24  # HS256, at least 32 characters like Supabase's


def make_jwt(sub: str, *, secret: str = SECRET, lifetime: float = 3600, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": sub, "aud": "authenticated", "role": "authenticated", "iat": now, "exp": now + int(lifetime),
            "email": f"{sub[:8]}@example.test", **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def grant(db: Database, role: str, group: str | None = None, user: str | None = None) -> str:
    """A person with ``role`` in ``group`` (every group when None); returns the user id."""
    user = user or str(uuid.uuid4())
    db.sql("insert into zerfaux.operators (user_id, role, protection_group_id) values (%s, %s, %s)",
           (user, role, group))
    return user


class CountingConnection(psycopg.AsyncConnection[Any]):
    """Counts every statement the console sends (one per execute), to check a page's cost."""

    statements = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        CountingConnection.statements += 1
        return await super().execute(*args, **kwargs)


class ConsoleServer:
    """The listener's HTTP app with the console, in a thread with its own loop."""

    def __init__(self, db: Database, *, secret: str | None = SECRET, jwks_url: str | None = None,
                 counting: bool = False, poll_seconds: float = 5.0) -> None:
        self.console: Console = build_console(db.url, secret, jwks_url)
        if counting and self.console.db is not None:
            from listener.console.queries import ConsoleDB

            self.console.db = ConsoleDB(db.url, connection_class=CountingConnection)
            assert self.console.feed is not None
            self.console.feed._db = self.console.db
        if self.console.feed is not None:
            self.console.feed.poll_seconds = poll_seconds
        self.store = PostgresStore(db.url, pool_size=2)
        app = create_app(secret=None, webhook=None, store=self.store, sources=[], metrics=Metrics(),
                         console=self.console)
        self._server = build_server(app, "127.0.0.1", 0)
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ConsoleServer:
        self._thread.start()
        self.call(self._start())
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def call(self, coro: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self.console.start_feed()
        self._task = asyncio.ensure_future(run_server(self._server))
        while not self._server.started:
            await asyncio.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._task is not None
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self.console.stop()
            await self.store.close()
        self.call(stop(), 20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
