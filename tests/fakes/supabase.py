"""One fake Supabase project URL on loopback: PostgREST and Realtime behind a gateway.

On a real project one URL serves ``/rest/v1`` and ``/realtime/v1`` (its API gateway routes them).
Here a byte-level gateway does the same: it reads a connection's request line, picks the fake by
path and then only copies bytes, so a Realtime close, clean or abrupt, reaches the listener as it
left the fake. Everything runs in a thread with its own event loop, so a test that blocks its own
loop (a synchronous query, a subprocess) never stalls the fakes.

    with FakeSupabase(db.url) as fake:
        env = {"SUPABASE_URL": fake.url, "SUPABASE_SERVICE_ROLE_KEY": fake.key}
        fake.keys.secret_key                    # the project's other keys (tests/fakes/keys.py)
        fake.call(fake.realtime.close_clean)    # control the fakes on their own loop
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import uvicorn

from tests.fakes.keys import ProjectKeys
from tests.fakes.postgrest_server import Faults, create_app
from tests.fakes.realtime_server import RealtimeFake

T = TypeVar("T")
HOST = "127.0.0.1"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()  # a reset stays a reset: no clean close invented here


class Gateway:
    def __init__(self, routes: Callable[[str], int]) -> None:
        self._routes = routes
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()  # the pipes see the reset and end on their own
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._open.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            line = await reader.readline()
            parts = line.split()
            if len(parts) < 2:
                return
            up_reader, up_writer = await asyncio.open_connection(HOST, self._routes(parts[1].decode("latin-1")))
            self._open.add(up_writer)
            up_writer.write(line)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, OSError):
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            for side in (writer, up_writer):
                if side is not None:
                    self._open.discard(side)
                    side.close()


class FakeSupabase:
    def __init__(self, database_url: str, keys: ProjectKeys | None = None) -> None:
        self.keys = keys or ProjectKeys()
        self.key = self.keys.service_role_jwt  # the legacy service_role key, as most projects still have
        self.faults = Faults()
        self.realtime = RealtimeFake(database_url, self.keys, HOST)
        self._app = create_app(database_url, self.keys, faults=self.faults)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-supabase", daemon=True)
        self._rest: uvicorn.Server | None = None
        self._rest_task: asyncio.Task[None] | None = None
        self._gateway: Gateway | None = None
        self.url = ""

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        """Run a coroutine on the fakes' loop from the test's thread."""
        async def wrapped() -> T:
            return await coro
        future: Future[T] = asyncio.run_coroutine_threadsafe(wrapped(), self._loop)
        return future.result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Call a plain function on the fakes' loop (their state belongs to it)."""
        async def wrapped() -> Any:
            return fn()
        return self.run(wrapped())

    def __enter__(self) -> FakeSupabase:
        self._thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        rest_port = sock.getsockname()[1]
        self._rest = uvicorn.Server(uvicorn.Config(self._app, log_level="warning", lifespan="on"))
        self._rest_task = asyncio.create_task(self._rest.serve(sockets=[sock]))
        while not self._rest.started:
            if self._rest_task.done():
                self._rest_task.result()
            await asyncio.sleep(0.01)
        await self.realtime.start()

        def route(path: str) -> int:
            return self.realtime.port if path.startswith("/realtime/") else rest_port

        self._gateway = Gateway(route)
        await self._gateway.start()
        self.url = f"http://{HOST}:{self._gateway.port}"

    async def _stop(self) -> None:
        if self._gateway is not None:
            await self._gateway.stop()
        await self.realtime.stop()
        if self._rest is not None and self._rest_task is not None:
            self._rest.should_exit = True
            await asyncio.wait_for(self._rest_task, 10)
