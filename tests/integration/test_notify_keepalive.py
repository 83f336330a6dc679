"""A LISTEN connection whose peer goes silent (half-open: no reset, no error) is noticed.

Only the NOTIFY source's connection runs through a relay the test cuts; the store's pool goes
straight to Postgres, so /readyz turning red can only come from the source noticing its dead
connection (the round trip every ``ping_seconds``), with the source's default settings.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx

from listener.service import build_listener, serve
from listener.sources.notify import NotifySource
from tests.support.engine import engine_settings
from tests.support.pg import Database
from tests.support.tcp_proxy import tcp_proxy

BOUND = 30.0  # seconds from the cut to /readyz saying so (issue 11 §7)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def readiness(client: httpx.AsyncClient, url: str) -> dict[str, object]:
    response = await client.get(url, timeout=10)
    body = response.json()
    assert isinstance(body, dict)
    return body


async def until(client: httpx.AsyncClient, url: str, ready: bool, timeout: float) -> float:
    """Seconds until /readyz answers ``ready``; fail past ``timeout``."""
    start = time.monotonic()
    body: dict[str, object] = {}
    while time.monotonic() - start < timeout:
        try:
            body = await readiness(client, url)
        except httpx.ConnectError as exc:  # the HTTP server is still starting
            body = {"error": str(exc)}
            await asyncio.sleep(0.2)
            continue
        if body["ready"] is ready:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"/readyz not ready={ready} within {timeout}s: {body}")


async def test_a_half_open_listen_connection_turns_readyz_red_within_the_bound_and_recovers(db: Database) -> None:
    port = free_port()
    settings = engine_settings(db.url, ZERFAUX_HTTP_PORT=str(port), ZERFAUX_HTTP_HOST="127.0.0.1")
    url = f"http://127.0.0.1:{port}/readyz"
    host, pg_port = db.url.split("@", 1)[1].split("/", 1)[0].split(":")
    with tcp_proxy(host, int(pg_port)) as proxy:
        listener = build_listener(settings)
        [index] = [i for i, s in enumerate(listener.sources) if isinstance(s, NotifySource)]
        wakes: list[float] = []

        def wake() -> None:
            wakes.append(time.monotonic())
            listener.dispatcher.wake()

        notify = NotifySource(proxy.url_for(db.url), wake, listener.dispatcher.poke)
        listener.sources[index] = notify
        engine = asyncio.create_task(serve(listener))
        try:
            async with httpx.AsyncClient() as client:
                await until(client, url, True, timeout=30)
                proxy.cut()  # sockets stay open; nothing comes back
                took = await until(client, url, False, timeout=BOUND)
                body = await readiness(client, url)
                assert body["reasons"] == ["source notify: not connected"], body  # the store still answers
                print(f"half-open LISTEN noticed after {took:.1f}s (bound {BOUND:g}s)")

                proxy.restore()
                await until(client, url, True, timeout=60)
                # And it listens again, on a new connection through the relay: a NOTIFY wakes.
                assert proxy.connections >= 2
                before = len(wakes)
                db.sql("select pg_notify('zerfaux_operations', 'test')")
                deadline = time.monotonic() + 10
                while len(wakes) == before and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert len(wakes) > before, "no wake-up after the reconnect"
        finally:
            listener.dispatcher.stop()
            await asyncio.wait_for(engine, 30)
