"""Supabase Realtime: new work wakes the dispatcher within a moment.

For a listener with only the project URL and the server key (no LISTEN/NOTIFY). Two ways to
hear of work, chosen per session (``wakeups``, ZERFAUX_REALTIME_WAKEUPS):

- ``broadcast``: Broadcast from Database (supabase/migrations/20261201158000_broadcast.sql). The
  database sends ``{id, kind}`` of each new or requeued operation, and ``{id}`` of a replication
  job asked to cancel, on the private topic ``zerfaux:operations``; the listener joins it with
  the server key (a private channel, authorized by RLS, which service_role bypasses). After a
  reconnect the join asks for ``replay {since, limit: 25}`` from shortly before the connection
  was lost (a margin of seconds, for the skew between this clock and the database's), so what
  was sent meanwhile arrives again; a message heard twice is only a second hint.
- ``changes``: Postgres Changes on the tables (INSERT of an operation, an UPDATE to 'queued', a
  replication job asking for cancellation).
- ``auto`` (the default): broadcast when the database says it sends (``broadcast_ready``, asked
  at every session), else changes; a private join the server refuses falls back to changes
  until the listener restarts.

Every event is a hint: the claim decides, and nothing of a payload is trusted. Realtime is best
effort and the realtime client rejoins only after an abnormal close (a clean server close ends
its loop silently), so this source supervises it: one client per connection, its own reconnects
turned off; after any close, clean or abnormal, a channel error, or a subscription that never
confirms, it discards the client, waits a capped backoff, connects and subscribes again, and
wakes the dispatcher to cover whatever changed while it was away (more than the 25 messages a
replay brings back). It counts as connected only once the subscription is live: for Postgres
Changes the server's "Subscribed to PostgreSQL" (the join reply alone does not mean changes
flow), for a broadcast channel the join's reply.

The callbacks run in the client's socket read loop: they only schedule the wake-up.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from realtime import (AsyncRealtimeChannel, AsyncRealtimeClient, RealtimePostgresChangesListenEvent,
                      RealtimeSubscribeStates)
from realtime.types import (RealtimeChannelBroadcastConfig, RealtimeChannelConfig, RealtimeChannelOptions,
                            RealtimeChannelPresenceConfig, ReplayOption)

from listener.apikeys import is_api_key
from listener.backoff import Backoff
from listener.config import RealtimeWakeups as Wakeups
from listener.sources import Wake

log = logging.getLogger(__name__)

SUBSCRIBED = "Subscribed to PostgreSQL"
CHANNEL = "zerfaux-listener"
TOPIC = "zerfaux:operations"  # zerfaux.broadcast_topic()
REPLAY_LIMIT = 25  # Realtime's maximum
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
                 check_seconds: float = 5.0, wakeups: Wakeups = "auto",
                 broadcast_ready: Callable[[], Awaitable[bool]] | None = None,
                 replay_margin_seconds: float = 5.0) -> None:
        self._url = f"{supabase_url.rstrip('/')}/realtime/v1"
        self._key = key
        self._wakeups = wakeups
        self._broadcast_ready = broadcast_ready
        self._broadcast_refused = False
        self._margin_ms = int(replay_margin_seconds * 1000)
        self._lost_at_ms: int | None = None  # when the last live session ended
        self.via: str | None = None  # "broadcast" or "changes" while connected
        self.heard: deque[dict[str, Any]] = deque(maxlen=200)  # the last broadcast hints (tests, logs)
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
        refused: list[str] = []

        def on_system(payload: Any) -> None:
            if getattr(payload, "message", None) == SUBSCRIBED:
                loop.call_soon(subscribed.set)

        def on_state(status: RealtimeSubscribeStates, error: Exception | None) -> None:
            if status == RealtimeSubscribeStates.SUBSCRIBED:
                if via == "broadcast":
                    loop.call_soon(subscribed.set)  # a broadcast channel is live once joined
                return
            if via == "broadcast" and status == RealtimeSubscribeStates.CHANNEL_ERROR and not subscribed.is_set():
                refused.append(str(error) if error else status.value)
            failure.append(f"channel {status.value}" + (f" ({error})" if error else ""))
            loop.call_soon(ended.set)

        via = await self._choose()
        client = AsyncRealtimeClient(self._url, self._key, auto_reconnect=False, max_retries=1)
        if is_api_key(self._key):
            # An sb_ key goes only in the socket's ?apikey=; it is not a JWT, so never the join's
            # access_token (the gateway mints the JWT of the key's role).
            client.access_token = None
        try:
            await client.connect()
            if via == "broadcast":
                broadcast = RealtimeChannelBroadcastConfig(ack=False, self=False)
                if self._lost_at_ms is not None:  # a reconnect: what was sent while away, again
                    broadcast["replay"] = ReplayOption(since=self._lost_at_ms - self._margin_ms, limit=REPLAY_LIMIT)
                channel = client.channel(TOPIC, RealtimeChannelOptions(config=RealtimeChannelConfig(
                    broadcast=broadcast, presence=RealtimeChannelPresenceConfig(key="", enabled=False), private=True)))
                channel.on_broadcast("operation", self._on_broadcast)
                channel.on_broadcast("cancel", self._on_broadcast)
            else:
                channel = client.channel(CHANNEL)
                self._on_changes(channel)
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
                if refused and self._wakeups == "auto":
                    self._broadcast_refused = True
                    log.warning("realtime: the private channel %s was refused (%s); Postgres Changes from now on",
                                TOPIC, refused[0])
                raise ConnectionError(failure[0] if failure else
                                      f"no {SUBSCRIBED!r} within {self._subscribe_timeout:g}s")
            self.connected = True
            self.via = via
            log.info("realtime: subscribed to zerfaux.operations through %s%s", via,
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
            if self.connected:
                self._lost_at_ms = int(time.time() * 1000)
            self.connected = False
            self.via = None
            await _discard(client)

    async def _choose(self) -> Wakeups:
        if self._wakeups != "auto":
            return self._wakeups
        if self._broadcast_refused or self._broadcast_ready is None:
            return "changes"
        try:
            ready = await asyncio.wait_for(self._broadcast_ready(), self._subscribe_timeout)
        except Exception as exc:  # decide for this session only; the next one asks again
            log.debug("realtime: could not ask whether the database broadcasts: %s", exc)
            return "changes"
        return "broadcast" if ready else "changes"

    def _on_changes(self, channel: AsyncRealtimeChannel) -> None:
        channel.on_postgres_changes(RealtimePostgresChangesListenEvent.Insert, self._on_operation, table="operations", schema="zerfaux")
        # Only rows whose new value asks for cancellation: progress updates do not come here.
        channel.on_postgres_changes(RealtimePostgresChangesListenEvent.Update, self._on_cancel, table="replication_jobs", schema="public",
                                    filter="cancel_requested=eq.true")
        # Work given back (graceful shutdown) or due again is an UPDATE to 'queued', not an
        # INSERT: without this, another listener would only see it at its next sweep.
        channel.on_postgres_changes(RealtimePostgresChangesListenEvent.Update, self._on_operation, table="operations", schema="zerfaux",
                                    filter="status=eq.queued")

    def _on_broadcast(self, message: Any) -> None:
        message = message if isinstance(message, dict) else {}
        body = message.get("payload") if isinstance(message.get("payload"), dict) else {}
        meta = message.get("meta") if isinstance(message.get("meta"), dict) else {}
        event = message.get("event")
        self.heard.append({"event": event, "id": body.get("id"), "kind": body.get("kind"),
                           "replayed": bool(meta.get("replayed"))})
        asyncio.get_running_loop().call_soon(self._poke if event == "cancel" else self._wake)

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
