"""Prometheus metrics of one listener process (served at GET /metrics).

The per-group RPO series (``zerfaux_rpo_*``) come from public.protection_status, read when
scraped and kept ``PROTECTION_TTL`` seconds, so several scrapers or a short interval cost one
query; every listener serves the same values (aggregate with ``max by (group)``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from listener.protection import STATUSES, GroupStatus
from listener.store import within

if TYPE_CHECKING:
    from listener.sources import Source
    from listener.store import QueueState, Store

log = logging.getLogger(__name__)

PROTECTION_TTL = 5.0  # seconds a protection_status read serves scrapes
PROTECTION_TIMEOUT = 5.0  # a read of protection_status is given up after this
SCRAPE_WAIT = 0.5  # a scrape waits no longer than this for a read; then it serves the last values


class ProtectionCollector:
    """The last protection_status read as gauges; no RPO series while the read fails (the
    values would be wrong), ``zerfaux_protection_status_up`` says which."""

    def __init__(self) -> None:
        self.groups: Sequence[GroupStatus] = ()
        self.up: bool | None = None  # None: never read (a listener not serving HTTP)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        if self.up is None:
            return
        yield GaugeMetricFamily("zerfaux_protection_status_up",
                                "1 when the last read of protection_status succeeded", value=1 if self.up else 0)
        if not self.up:
            return
        rpo = GaugeMetricFamily("zerfaux_rpo_seconds", "Seconds since the newest recovery point on the target",
                                labels=["group"])
        target = GaugeMetricFamily("zerfaux_rpo_target_seconds", "The group's RPO target (rpo_minutes)",
                                   labels=["group"])
        violated = GaugeMetricFamily("zerfaux_rpo_violated", "1 when the RPO is at or past its target",
                                     labels=["group"])
        status = GaugeMetricFamily("zerfaux_rpo_status", "1 for the group's rpo_status (ok, at_risk, "
                                   "violated, unknown)", labels=["group", "status"])
        paused = GaugeMetricFamily("zerfaux_group_paused", "1 when the group's schedule is paused",
                                   labels=["group"])
        for g in self.groups:
            if g.current_rpo_seconds is not None:
                rpo.add_metric([g.name], g.current_rpo_seconds)
            if g.target_seconds is not None:
                target.add_metric([g.name], g.target_seconds)
                violated.add_metric([g.name], 1 if g.rpo_status == "violated" else 0)
            for name in STATUSES:
                status.add_metric([g.name, name], 1 if g.rpo_status == name else 0)
            paused.add_metric([g.name], 1 if g.paused else 0)
        yield from (rpo, target, violated, status, paused)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.operations = Counter(
            "zerfaux_operations_total", "Operations finished, by kind and outcome",
            ["kind", "outcome"], registry=r,
        )
        self.duration = Histogram(
            "zerfaux_operation_duration_seconds", "Time an attempt ran, by kind", ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200), registry=r,
        )
        self.claim_latency = Histogram(
            "zerfaux_claim_latency_seconds", "From an operation's commit to its claim",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30), registry=r,
        )
        self.queue_depth = Gauge(
            "zerfaux_queue_depth", "Operations queued or running, seen at the last sweep",
            ["status"], registry=r,
        )
        self.oldest_queued = Gauge(
            "zerfaux_oldest_queued_seconds", "Age of the oldest queued operation", registry=r,
        )
        self.bytes_replicated = Counter(
            "zerfaux_bytes_replicated_total", "Bytes sent by completed replications", registry=r,
        )
        self.source_connected = Gauge(
            "zerfaux_source_connected", "1 when an event source is connected", ["source"], registry=r,
        )
        self.running = Gauge("zerfaux_running_operations", "Operations running here now", registry=r)
        self.webhook_requests = Counter(
            "zerfaux_webhook_requests_total", "Webhook requests answered, by HTTP status", ["status"],
            registry=r,
        )
        self.protection = ProtectionCollector()
        r.register(self.protection)
        self._protection_read_at = float("-inf")
        self._protection_read: asyncio.Future[None] | None = None

    async def observe_protection(self, store: Store, now: float | None = None) -> None:
        """Refresh the RPO series from the store unless the last read is under PROTECTION_TTL
        old; concurrent scrapes share one read. A scrape waits at most SCRAPE_WAIT for it and
        otherwise serves the last values: the read goes on (bounded by PROTECTION_TIMEOUT) and
        a failed one drops the series at the next scrape. A listener cut off from its database
        still answers /metrics at once."""
        clock = time.monotonic() if now is None else now
        if self._protection_read is None or self._protection_read.done():
            if clock - self._protection_read_at < PROTECTION_TTL:
                return
            self._protection_read_at = clock
            self._protection_read = asyncio.ensure_future(self._read_protection(store))
        try:
            await asyncio.wait_for(asyncio.shield(self._protection_read), SCRAPE_WAIT)
        except asyncio.TimeoutError:
            pass

    async def _read_protection(self, store: Store) -> None:
        try:
            groups = await within(PROTECTION_TIMEOUT, store.protection_overview(), "protection_status")
        except Exception as exc:  # a scrape answers its other metrics whatever the database says
            # once per outage at WARNING, not once per scrape
            log.log(logging.DEBUG if self.protection.up is False else logging.WARNING,
                    "metrics: could not read protection_status (%s); RPO series left out", exc)
            self.protection.up = False
        else:
            self.protection.groups, self.protection.up = groups, True

    def observe_sources(self, sources: Iterable[Source]) -> None:
        """Copy each source's ``connected`` flag (read at scrape time, so never stale)."""
        for source in sources:
            self.source_connected.labels(source.name).set(1 if source.connected else 0)

    def observe_queue(self, state: QueueState, now: float | None = None) -> None:
        """Depth, and how long the most overdue queued operation has waited past its run_after."""
        self.queue_depth.labels("queued").set(state.queued)
        self.queue_depth.labels("running").set(state.running)
        due = state.next_run_after.timestamp() if state.next_run_after is not None else None
        self.oldest_queued.set(max(0.0, (now or time.time()) - due) if due is not None else 0.0)
