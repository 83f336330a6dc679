"""Postgres LISTEN/NOTIFY: the enqueue trigger's ``pg_notify`` wakes the dispatcher at once.

Needs a direct connection or the session pooler (port 5432); the transaction pooler cannot
carry LISTEN. After any drop it reconnects with capped backoff and wakes the dispatcher, since
notifications sent while it was away are gone.

A LISTEN connection only reads, so a peer that vanished without a reset (a NAT or firewall that
forgot the flow, a half-open socket) raises nothing and would keep ``connected`` (and /readyz)
green forever. Two guards: TCP keepalives and a user timeout on the socket (libpq's
``keepalives*`` and ``tcp_user_timeout``, unless the connection string sets its own), and a round
trip (``select 1``) every ``ping_seconds`` that must answer within ``ping_timeout``; a dead
connection is noticed within their sum (15 s by default) and replaced.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from listener.backoff import Backoff
from listener.sources import Wake

log = logging.getLogger(__name__)

OPERATIONS_CHANNEL = "zerfaux_operations"
CANCEL_CHANNEL = "zerfaux_cancel"

# Idle 10 s, then a probe every 5 s, 3 unanswered: the kernel drops a silent peer within 25 s; and
# data unacknowledged for 15 s (our ping into a dead peer) fails the socket.
KEEPALIVE = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
             "keepalives_count": "3", "tcp_user_timeout": "15000", "connect_timeout": "10"}


def with_keepalives(conninfo: str) -> str:
    """``conninfo`` plus the keepalive settings it does not choose itself."""
    given = conninfo_to_dict(conninfo)
    return make_conninfo(conninfo, **{k: v for k, v in KEEPALIVE.items() if k not in given})


class NotifySource:
    name = "notify"

    def __init__(self, conninfo: str, wake: Wake, poke: Wake, max_backoff: float = 30.0,
                 ping_seconds: float = 10.0, ping_timeout: float = 5.0) -> None:
        self._conninfo = with_keepalives(conninfo)
        self._ping_seconds = ping_seconds
        self._ping_timeout = ping_timeout
        self._wake = wake
        self._poke = poke
        self._backoff = Backoff(0.5, max_backoff)
        self.connected = False
        self._failures = 0  # connection attempts failed since the last good session

    async def run(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                try:
                    await self._listen(conn)
                finally:
                    self.connected = False
                    # Not `async with`: its exit rolls back, a round trip that never ends on a
                    # half-open connection. Closing only drops the socket.
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:  # TimeoutError (a ping unanswered) is an OSError
                self._failures += 1
                delay = self._backoff(self._failures)
                log.warning("notify: connection lost (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _listen(self, conn: psycopg.AsyncConnection[object]) -> None:
        await self._round_trip(conn, f"listen {OPERATIONS_CHANNEL}; listen {CANCEL_CHANNEL}")
        self.connected = True
        if self._failures:
            log.info("notify: reconnected after %d failure(s); sweeping", self._failures)
        self._failures = 0
        self._wake()  # cover whatever was sent while we were not listening
        while True:
            # Notifications that arrive between two batches wait in psycopg's backlog.
            async for note in conn.notifies(timeout=self._ping_seconds):
                if note.channel == CANCEL_CHANNEL:
                    self._poke()
                else:
                    self._wake()
            await self._round_trip(conn, "select 1")

    async def _round_trip(self, conn: psycopg.AsyncConnection[object], query: str) -> None:
        """``query`` answered within ``ping_timeout``, or the connection closed and TimeoutError.

        Not ``wait_for``: cancelling a running query makes psycopg ask the server to cancel it
        (a new connection, up to 10 s more against a peer that does not answer). Closing first
        leaves nothing to cancel."""
        call = asyncio.ensure_future(conn.execute(query))
        done, _ = await asyncio.wait({call}, timeout=self._ping_timeout)
        if call in done:
            call.result()
            return
        await conn.close()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        raise TimeoutError(f"no answer to {query!r} within {self._ping_timeout:g}s")
