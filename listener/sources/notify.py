"""Postgres LISTEN/NOTIFY: the enqueue trigger's ``pg_notify`` wakes the dispatcher at once.

Needs a direct connection or the session pooler (port 5432); the transaction pooler cannot
carry LISTEN. After any drop it reconnects with capped backoff and wakes the dispatcher, since
notifications sent while it was away are gone.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg

from listener.backoff import Backoff
from listener.sources import Wake

log = logging.getLogger(__name__)

OPERATIONS_CHANNEL = "zerfaux_operations"
CANCEL_CHANNEL = "zerfaux_cancel"


class NotifySource:
    name = "notify"

    def __init__(self, conninfo: str, wake: Wake, poke: Wake, max_backoff: float = 30.0) -> None:
        self._conninfo = conninfo
        self._wake = wake
        self._poke = poke
        self._backoff = Backoff(0.5, max_backoff)
        self.connected = False

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
                    await conn.execute(f"listen {OPERATIONS_CHANNEL}")
                    await conn.execute(f"listen {CANCEL_CHANNEL}")
                    self.connected = True
                    if failures:
                        log.info("notify: reconnected after %d failure(s); sweeping", failures)
                    failures = 0
                    self._wake()  # cover whatever was sent while we were not listening
                    async for note in conn.notifies():
                        if note.channel == CANCEL_CHANNEL:
                            self._poke()
                        else:
                            self._wake()
            except asyncio.CancelledError:
                self.connected = False
                raise
            except (psycopg.Error, OSError) as exc:
                self.connected = False
                failures += 1
                delay = self._backoff(failures)
                log.warning("notify: connection lost (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
