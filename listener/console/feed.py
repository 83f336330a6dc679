"""The console's live feed: one refresh for every watcher, woken by the database's own hints.

A LISTEN connection takes the hints the database already sends: ``zerfaux_operations`` (new work,
the dispatcher's wake-up) and ``zerfaux_console`` (progress, statuses, recovery points, runs:
migration 20261201170000). A hint only marks the feed dirty; a refresh runs ONE query over every
group (as the listener), at most every ``debounce`` seconds, and at least every ``poll_seconds``
while anyone watches, so a missed hint (a dropped LISTEN connection, a database without the
triggers) costs at most one poll interval. The refresh is shared: a hundred open pages cost the
database what one does.

Each watcher is sent only the groups it could read (as itself, under RLS) when it connected, and
only what changed since the last refresh. Its stream ends when its token expires, or after
``max_stream_seconds``; the browser's EventSource reconnects, which checks the token and the
groups again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from listener.backoff import Backoff
from listener.console.queries import ConsoleDB, Unavailable
from listener.sources.notify import OPERATIONS_CHANNEL, with_keepalives

log = logging.getLogger(__name__)

CONSOLE_CHANNEL = "zerfaux_console"


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """What a page shows live for one group, as JSON. ``rpo_seconds`` grows by itself between
    refreshes (the page's script counts it up), so it is left out of the comparison."""
    job = None
    if row.get("job_id") is not None:
        done, total = row.get("bytes_transferred") or 0, row.get("bytes_estimated")
        seconds = row.get("job_seconds")
        job = {"id": str(row["job_id"]), "status": row["job_status"], "transferred": int(done),
               "estimated": int(total) if total is not None else None,
               "rate": int(done / seconds) if seconds and seconds > 0 and done else None}
    run = None
    if row.get("run_id") is not None:
        run = {"id": str(row["run_id"]), "status": row["run_status"], "kind": row["run_kind"],
               "steps": row.get("run_steps")}
    return {"id": str(row["id"]), "status": row["rpo_status"], "paused": bool(row["paused"]),
            "last_job_status": row.get("last_job_status"), "last_error": row.get("last_error"),
            "job": job, "run": run, "rpo_seconds": row.get("current_rpo_seconds")}


def _same(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    if a is None:
        return False
    return {k: v for k, v in a.items() if k != "rpo_seconds"} == {k: v for k, v in b.items() if k != "rpo_seconds"}


@dataclass(eq=False)
class Watcher:
    visible: frozenset[str]
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, changes: Iterable[dict[str, Any]]) -> None:
        for change in changes:
            if change["id"] in self.visible:
                self.pending[change["id"]] = change  # coalesced: a slow reader gets the newest only
        if self.pending:
            self.ready.set()

    async def take(self, timeout: float) -> list[dict[str, Any]]:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)
        self.ready.clear()
        out, self.pending = list(self.pending.values()), {}
        return out


class Feed:
    def __init__(self, conninfo: str, db: ConsoleDB, *, poll_seconds: float = 5.0, debounce: float = 0.2,
                 max_stream_seconds: float = 600.0, demand_seconds: float = 30.0) -> None:
        self._conninfo = with_keepalives(conninfo)
        self._db = db
        self.poll_seconds = poll_seconds
        self.debounce = debounce
        self.max_stream_seconds = max_stream_seconds
        self._demand_seconds = demand_seconds
        self._watchers: set[Watcher] = set()
        self._dirty = asyncio.Event()
        self._demand = asyncio.Event()
        self._last_demand = 0.0
        self._refreshed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.state: dict[str, dict[str, Any]] = {}
        self.refreshes = 0  # how many shared refresh queries ran (tests, bench)
        self.listening = False

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._listen(), name="console-feed-listen"),
                           asyncio.create_task(self._refresh_loop(), name="console-feed-refresh")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def hint(self) -> None:
        self._dirty.set()

    def watch(self, visible: Iterable[str]) -> Watcher:
        watcher = Watcher(frozenset(visible))
        self._watchers.add(watcher)
        watcher.offer(self.state.values())  # what is known now; the next refresh sends changes
        self._wanted()
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    async def snapshot(self, visible: Iterable[str], timeout: float = 5.0) -> list[dict[str, Any]]:
        """The shared state of ``visible`` groups, for a page that polls instead of streaming."""
        self._wanted()
        if not self.refreshes:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._refreshed.wait(), timeout)
        wanted = set(visible)
        return [v for k, v in self.state.items() if k in wanted]

    def _wanted(self) -> None:
        self._last_demand = time.monotonic()
        self._demand.set()
        if not self.refreshes:
            self._dirty.set()

    def _idle(self) -> bool:
        return not self._watchers and time.monotonic() - self._last_demand > self._demand_seconds

    async def _refresh_loop(self) -> None:
        while True:
            if self._idle():
                self._demand.clear()
                await self._demand.wait()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.poll_seconds)
            await asyncio.sleep(self.debounce)  # a burst of hints is one refresh
            self._dirty.clear()
            try:
                await self.refresh()
            except Unavailable as exc:
                log.warning("console feed: %s; retrying in %.0fs", exc, self.poll_seconds)
            except psycopg.Error as exc:
                log.warning("console feed: refresh failed: %s", exc)

    async def refresh(self) -> list[dict[str, Any]]:
        rows = await self._db.as_listener("feed_state_runs" if self._db.has_runs else "feed_state")
        self.refreshes += 1
        fresh = {str(r["id"]): summarize(r) for r in rows}
        changed = [v for k, v in fresh.items() if not _same(self.state.get(k), v)]
        self.state = fresh
        self._refreshed.set()
        for watcher in list(self._watchers):
            watcher.offer(changed)
        return changed

    async def _listen(self) -> None:
        backoff, failures = Backoff(0.5, 30.0), 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                try:
                    await conn.execute(f"listen {CONSOLE_CHANNEL}; listen {OPERATIONS_CHANNEL}")
                    self.listening, failures = True, 0
                    self._dirty.set()  # whatever changed while we were not listening
                    while True:
                        async for _ in conn.notifies(timeout=10.0):
                            self._dirty.set()
                        await asyncio.wait_for(conn.execute("select 1"), 5.0)
                finally:
                    self.listening = False
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                failures += 1
                delay = backoff(failures)
                log.warning("console feed: LISTEN connection lost (%s); polling every %.0fs, reconnecting in %.1fs",
                            exc, self.poll_seconds, delay)
                await asyncio.sleep(delay)
