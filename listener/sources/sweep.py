"""The periodic sweep: the safety net under every other source.

Every ``ZERFAUX_SWEEP_SECONDS`` it wakes the dispatcher (which claims due retries and expired
leases like any other work), records the queue's depth, and prunes finished operations older
than ``ZERFAUX_OPERATIONS_RETENTION_DAYS`` so the queue stays small.
"""

from __future__ import annotations

import asyncio
import logging
import time

from listener.metrics import Metrics
from listener.sources import Wake
from listener.store import Store

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 600.0


class SweepSource:
    name = "sweep"

    def __init__(self, store: Store, wake: Wake, interval: float, retention_days: float,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._wake = wake
        self._interval = interval
        self._retention_days = retention_days
        self._metrics = metrics
        self._last_prune = 0.0
        self.connected = True

    async def sweep_once(self) -> None:
        self._wake()
        try:
            state = await self._store.queue_state()
            if self._metrics is not None:
                self._metrics.observe_queue(state)
            if time.monotonic() - self._last_prune >= PRUNE_EVERY_SECONDS:
                pruned = await self._store.prune(self._retention_days)
                self._last_prune = time.monotonic()
                if pruned:
                    log.info("sweep: pruned %d finished operation(s) older than %g days",
                             pruned, self._retention_days)
            self.connected = True
        except Exception as exc:
            self.connected = False
            log.warning("sweep: could not read the queue (%s)", exc)

    async def run(self) -> None:
        while True:
            await self.sweep_once()
            await asyncio.sleep(self._interval)
