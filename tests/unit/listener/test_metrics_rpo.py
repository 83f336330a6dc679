"""The per-group RPO series: values, label escaping, the scrape-time cache, a failing read.

The store here is a stand-in holding rows in memory (the real stores are exercised in
tests/integration/test_rpo_metrics.py); what is tested is the collector's own logic."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import uuid4

from prometheus_client import generate_latest

from listener.metrics import PROTECTION_TTL, Metrics
from listener.protection import GroupStatus
from listener.store import StoreUnavailable


def status(name: str, rpo: int | None, current: float | None, rpo_status: str, paused: bool = False) -> GroupStatus:
    return GroupStatus(uuid4(), name, rpo, datetime.now(UTC) if current is not None else None, current,
                       rpo_status, None, None, None, paused)


class Rows:
    def __init__(self, groups: list[GroupStatus]) -> None:
        self.groups = groups
        self.reads = 0
        self.down = False

    async def protection_overview(self) -> list[GroupStatus]:
        self.reads += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise StoreUnavailable("db.example does not answer")
        return self.groups


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_each_group_gets_its_rpo_target_violation_and_status() -> None:
    metrics = Metrics()
    store = Rows([status("gold", 15, 1000.5, "violated"), status("silver", 60, 120.0, "ok", paused=True),
                  status("new", 30, None, "unknown"), status("on-demand", None, 50.0, "unknown")])
    asyncio.run(metrics.observe_protection(store))  # type: ignore[arg-type]
    text = scrape(metrics)
    for line in ('zerfaux_rpo_seconds{group="gold"} 1000.5', 'zerfaux_rpo_target_seconds{group="gold"} 900.0',
                 'zerfaux_rpo_violated{group="gold"} 1.0', 'zerfaux_rpo_status{group="gold",status="violated"} 1.0',
                 'zerfaux_rpo_status{group="gold",status="ok"} 0.0', 'zerfaux_rpo_violated{group="silver"} 0.0',
                 'zerfaux_group_paused{group="silver"} 1.0', 'zerfaux_group_paused{group="gold"} 0.0',
                 'zerfaux_rpo_target_seconds{group="new"} 1800.0', 'zerfaux_rpo_status{group="new",status="unknown"} 1.0',
                 'zerfaux_rpo_seconds{group="on-demand"} 50.0', "zerfaux_protection_status_up 1.0"):
        assert line in text.splitlines(), line
    assert 'zerfaux_rpo_seconds{group="new"}' not in text  # no recovery point: no RPO to show
    assert 'zerfaux_rpo_target_seconds{group="on-demand"}' not in text
    assert 'zerfaux_rpo_violated{group="on-demand"}' not in text


def test_label_values_are_escaped_as_the_exposition_format_asks() -> None:
    metrics = Metrics()
    asyncio.run(metrics.observe_protection(Rows([status('db "main"\\prod\nx', 15, 60.0, "ok")])))  # type: ignore[arg-type]
    assert 'zerfaux_rpo_seconds{group="db \\"main\\"\\\\prod\\nx"} 60.0' in scrape(metrics).splitlines()


def test_scrapes_within_the_ttl_share_one_read() -> None:
    metrics = Metrics()
    store = Rows([status("gold", 15, 60.0, "ok")])

    async def scrapes() -> None:
        await asyncio.gather(*(metrics.observe_protection(store, now=100.0) for _ in range(5)))  # type: ignore[arg-type]
        await metrics.observe_protection(store, now=100.0 + PROTECTION_TTL - 0.1)  # type: ignore[arg-type]
        assert store.reads == 1
        store.groups = [status("gold", 15, 600.0, "at_risk")]
        await metrics.observe_protection(store, now=100.0 + PROTECTION_TTL)  # type: ignore[arg-type]
        assert store.reads == 2

    asyncio.run(scrapes())
    assert 'zerfaux_rpo_seconds{group="gold"} 600.0' in scrape(metrics)


def test_a_failed_read_drops_the_rpo_series_and_says_so() -> None:
    metrics = Metrics()
    store = Rows([status("gold", 15, 60.0, "ok")])

    async def scrapes() -> None:
        await metrics.observe_protection(store, now=0.0)  # type: ignore[arg-type]
        store.down = True
        await metrics.observe_protection(store, now=10.0)  # type: ignore[arg-type]

    asyncio.run(scrapes())
    text = scrape(metrics)
    assert "zerfaux_protection_status_up 0.0" in text and "zerfaux_rpo_seconds" not in text
    assert "zerfaux_queue_depth" in text  # the other metrics are still served
    store.down = False
    asyncio.run(metrics.observe_protection(store, now=20.0))  # type: ignore[arg-type]
    assert 'zerfaux_rpo_seconds{group="gold"} 60.0' in scrape(metrics)


def test_a_listener_that_never_read_serves_no_rpo_series() -> None:
    text = scrape(Metrics())
    assert "zerfaux_protection_status_up" not in text and "zerfaux_rpo" not in text
