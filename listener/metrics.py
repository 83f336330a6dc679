"""Prometheus metrics of one listener process (served at GET /metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from listener.sources import Source
    from listener.store import QueueState


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
