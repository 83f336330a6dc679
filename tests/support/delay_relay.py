"""A TCP relay that adds latency without limiting throughput: the test's stand-in for ``netem delay``.

This kernel has no ``netem`` (FACTS.md), so the WAN of tests/support/netns.py gets its round trip
from here. Every chunk read from one side is written to the other ``delay`` seconds after it
arrived; reading goes on meanwhile, so the relay is a pipeline (a delay line), not a
stop-and-wait: a 200 Mbit/s link with 20 ms each way stays a 200 Mbit/s link, with 40 ms more
round trip. A bounded queue per direction (``queue_bytes``) applies back pressure, like a socket
buffer. A half-close travels with the same delay; a reset or an error closes both sides.

asyncio on a thread of its own; the relay listens on the address it is given (the namespace
link's host end) and connects to one address (the namespace's sshd).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

READ_BYTES = 256 * 1024


class DelayRelay:
    def __init__(self, listen_host: str, target: tuple[str, int], delay: float = 0.020,
                 queue_bytes: int = 16 * 1024 * 1024) -> None:
        self.delay, self._target, self._queue_bytes = delay, target, queue_bytes
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, args=(listen_host, ready), name="delay-relay", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError(f"the delay relay could not listen on {listen_host}")
        self.host = listen_host
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _run(self, host: str, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, host, 0)

        try:
            self._loop.run_until_complete(start())
        finally:
            ready.set()
        self._loop.run_forever()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.wait_for(asyncio.open_connection(*self._target), 15)
        except (OSError, asyncio.TimeoutError):
            c_writer.close()
            return
        for w in (c_writer, s_writer):
            self._writers.add(w)
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._direction(c_reader, s_writer), self._direction(s_reader, c_writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the relay closes: end quietly (asyncio's server callback reads this task's outcome)
        finally:
            for w in (c_writer, s_writer):
                self._writers.discard(w)
                w.close()

    async def _direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self._queue_bytes // READ_BYTES))

        async def read() -> None:
            while True:
                await room.acquire()
                try:
                    data = await reader.read(READ_BYTES)
                except OSError:
                    data = b""
                await queue.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                pause = due - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                room.release()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()


@contextmanager
def delay_relay(listen_host: str, target: tuple[str, int], delay: float = 0.020) -> Iterator[DelayRelay]:
    relay = DelayRelay(listen_host, target, delay)
    try:
        yield relay
    finally:
        relay.close()
