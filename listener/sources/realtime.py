"""Supabase Realtime: an INSERT into zerfaux.operations wakes the dispatcher within a moment.

For a listener with only the project URL and the service-role key (no LISTEN/NOTIFY). Realtime
``postgres_changes`` is best effort and replays nothing after a disconnect, and the realtime
client rejoins only after an abnormal close (a clean server close ends its loop silently), so
this source supervises it: one client per connection, its own reconnects turned off; after any
close, clean or abnormal, a channel error, or a subscription that never confirms, it discards
the client, waits a capped backoff, connects and subscribes again, and wakes the dispatcher to
cover whatever changed while it was away. It counts as connected only once the server's
"Subscribed to PostgreSQL" arrives (the join reply alone does not mean changes flow).

The callbacks run in the client's socket read loop: they only schedule the wake-up.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from realtime import AsyncRealtimeClient, RealtimePostgresChangesListenEvent, RealtimeSubscribeStates

from listener.backoff import Backoff
from listener.sources import Wake

log = logging.getLogger(__name__)

SUBSCRIBED = "Subscribed to PostgreSQL"
CHANNEL = "zerfaux-listener"
_APIKEY = re.compile(r"(apikey=)[^&\s]+")


class _RedactApikey(logging.Filter):
    """Realtime takes the key in the URL's query; websockets logs the request line at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "apikey=" in message:
            record.msg, record.args = _APIKEY.sub(r"\1***", message), None
        return True


logging.getLogger("websockets.client").addFilter(_RedactApikey())


class RealtimeSource:
    name = "realtime"

    def __init__(self, supabase_url: str, key: str, wake: Wake, poke: Wake,
                 max_backoff: float = 30.0, subscribe_timeout: float = 15.0,
                 check_seconds: float = 5.0) -> None:
        self._url = f"{supabase_url.rstrip('/')}/realtime/v1"
        self._key = key
        self._wake = wake
        self._poke = poke
        self._backoff = Backoff(0.5, max_backoff)
        self._subscribe_timeout = subscribe_timeout
        self._check_seconds = check_seconds
        self.connected = False
        self.reconnects = 0  # sessions after the first, for tests and logs

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0  # it was up; come back quickly
                reason = "connection closed"
            except asyncio.CancelledError:
                self.connected = False
                raise
            except Exception as exc:  # whatever the client raises, the answer is to reconnect
                failures += 1
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.connected = False
            delay = self._backoff(failures)
            log.warning("realtime: %s; reconnecting in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            self.reconnects += 1

    async def _session(self) -> None:
        """One connection: subscribe, wait for "Subscribed", then until anything goes wrong."""
        loop = asyncio.get_running_loop()
        subscribed = asyncio.Event()
        ended = asyncio.Event()
        failure: list[str] = []

        def on_system(payload: Any) -> None:
            if getattr(payload, "message", None) == SUBSCRIBED:
                loop.call_soon(subscribed.set)

        def on_state(status: RealtimeSubscribeStates, error: Exception | None) -> None:
            if status != RealtimeSubscribeStates.SUBSCRIBED:
                failure.append(f"channel {status.value}" + (f" ({error})" if error else ""))
                loop.call_soon(ended.set)

        client = AsyncRealtimeClient(self._url, self._key, auto_reconnect=False, max_retries=1)
        try:
            await client.connect()
            channel = client.channel(CHANNEL)
            channel.on_postgres_changes(RealtimePostgresChangesListenEvent.Insert, self._on_operation, table="operations", schema="zerfaux")
            # Only rows whose new value asks for cancellation: progress updates do not come here.
            channel.on_postgres_changes(RealtimePostgresChangesListenEvent.Update, self._on_cancel, table="replication_jobs", schema="public",
                                        filter="cancel_requested=eq.true")
            # Work given back (graceful shutdown) or due again is an UPDATE to 'queued', not an
            # INSERT: without this, another listener would only see it at its next sweep.
            channel.on_postgres_changes(RealtimePostgresChangesListenEvent.Update, self._on_operation, table="operations", schema="zerfaux",
                                        filter="status=eq.queued")
            channel.on_system(on_system)
            await channel.subscribe(on_state)
            confirmed = asyncio.create_task(subscribed.wait())
            stopped = asyncio.create_task(ended.wait())
            try:
                await asyncio.wait({confirmed, stopped}, timeout=self._subscribe_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                confirmed.cancel()
                stopped.cancel()
            if not subscribed.is_set():
                raise ConnectionError(failure[0] if failure else
                                      f"no {SUBSCRIBED!r} within {self._subscribe_timeout:g}s")
            self.connected = True
            log.info("realtime: subscribed to zerfaux.operations%s",
                     f" (reconnect {self.reconnects})" if self.reconnects else "")
            self._wake()  # whatever was inserted while we were not subscribed
            while not ended.is_set() and client.is_connected:
                try:
                    await asyncio.wait_for(ended.wait(), timeout=self._check_seconds)
                except asyncio.TimeoutError:
                    pass
            if failure:
                raise ConnectionError(failure[0])
        finally:
            self.connected = False
            await _discard(client)

    def _on_operation(self, payload: Any) -> None:
        asyncio.get_running_loop().call_soon(self._wake)

    def _on_cancel(self, payload: Any) -> None:
        asyncio.get_running_loop().call_soon(self._poke)


async def _discard(client: AsyncRealtimeClient) -> None:
    """Close a client for good: its channels must not rejoin on their own timers."""
    for channel in list(client.channels.values()):
        channel.rejoin_timer.reset()
        channel.join_push.destroy()
    try:
        await client.close()
    except Exception as exc:  # the socket may already be gone; nothing to keep
        log.debug("realtime: closing the old client: %s", exc)
