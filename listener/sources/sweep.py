"""The periodic sweep: the safety net under every other source, and the schedule's clock.

Every pass it runs the schedule (``zerfaux.schedule_due()``: one job for each protection group
that is due) and records RPO transitions (``zerfaux.record_rpo_transitions()``: a group falls
behind even when nothing runs), wakes the dispatcher (which claims due retries and expired
leases like any other work), records the queue's depth, and prunes finished operations older
than ``ZERFAUX_OPERATIONS_RETENTION_DAYS`` so the queue stays small.

Passes are ``ZERFAUX_SWEEP_SECONDS`` apart, or sooner when the schedule says a group is due
before then, so an interval shorter than the sweep's is kept too (docs/rpo.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

from listener.metrics import Metrics
from listener.sources import Wake
from listener.store import Store

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 600.0
# The shortest wait between passes, however soon the next group is due: the schedule's own
# offsets spread groups over seconds, so waking more often buys nothing.
MIN_PAUSE_SECONDS = 0.5


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
        self._next_due: datetime | None = None
        self.connected = True

    async def schedule_once(self) -> None:
        """Run the schedule and record RPO transitions; a failure is logged, the pass goes on."""
        try:
            schedule = await self._store.schedule_due()
            self._next_due = schedule.next_due_at
            if schedule.inserted:
                log.info("sweep: scheduled %d replication job(s)", schedule.inserted)
            recorded = await self._store.record_rpo_transitions()
            if recorded:
                log.info("sweep: %d protection group(s) changed RPO status", recorded)
        except Exception as exc:
            self._next_due = None
            log.warning("sweep: could not run the schedule (%s)", exc)

    async def sweep_once(self) -> None:
        await self.schedule_once()
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

    def pause(self) -> float:
        """Seconds to the next pass: the sweep interval, or less when a group is due sooner."""
        if self._next_due is None:
            return self._interval
        until = (self._next_due - datetime.now(timezone.utc)).total_seconds()
        return max(min(self._interval, MIN_PAUSE_SECONDS), min(self._interval, until))

    async def run(self) -> None:
        while True:
            await self.sweep_once()
            await asyncio.sleep(self.pause())
