"""Prometheus metrics of one listener process (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
