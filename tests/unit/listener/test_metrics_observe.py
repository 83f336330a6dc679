"""Metrics read from sources and from the queue state."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import generate_latest

from listener.metrics import Metrics
from listener.store import QueueState


class Source:
    def __init__(self, name: str, connected: bool) -> None:
        self.name = name
        self.connected = connected

    async def run(self) -> None: ...


def test_source_connected_follows_each_source() -> None:
    metrics = Metrics()
    realtime = Source("realtime", True)
    metrics.observe_sources([realtime, Source("sweep", True)])
    realtime.connected = False
    metrics.observe_sources([realtime])
    text = generate_latest(metrics.registry).decode()
    assert 'zerfaux_source_connected{source="realtime"} 0.0' in text
    assert 'zerfaux_source_connected{source="sweep"} 1.0' in text


def test_oldest_queued_is_how_long_the_most_overdue_has_waited() -> None:
    metrics = Metrics()
    due = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    metrics.observe_queue(QueueState(queued=3, runnable=2, running=1, expired=0, next_run_after=due),
                          now=due.timestamp() + 42.5)
    assert metrics.oldest_queued._value.get() == 42.5
    metrics.observe_queue(QueueState(3, 0, 1, 0, due), now=due.timestamp() - 10)  # a retry not yet due
    assert metrics.oldest_queued._value.get() == 0.0
    metrics.observe_queue(QueueState(0, 0, 0, 0, None))
    assert metrics.oldest_queued._value.get() == 0.0
    assert metrics.queue_depth.labels("queued")._value.get() == 0
