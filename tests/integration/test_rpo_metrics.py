"""The RPO series at /metrics, read from public.protection_status on real Postgres through each
store, and served over real HTTP."""

from __future__ import annotations

import asyncio
import re

import httpx
from prometheus_client import generate_latest

from listener.metrics import Metrics
from listener.service import make_store
from listener.store_pg import PostgresStore
from tests.integration.test_http import SECRET, Served
from tests.support.engine import engine_settings
from tests.support.pg import Database


def groups_behind(db: Database) -> None:
    """gold 20 min behind a 15-min RPO, silver 12 min (at risk), bronze 2 min, a paused one with
    no point yet, and one with no RPO."""
    db.sql("""
        with g as (
            insert into protection_groups (name, rpo_minutes, paused) values
                ('gold', 15, false), ('silver', 15, false), ('bronze', 15, false),
                ('paused "q"', 30, true), ('on-demand', null, false)
            returning id, name)
        insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, on_target)
        select g.id, 'zerfaux-' || v.n, g.name || v.n, now() - v.ago * interval '1 minute', v.on_target
          from g join (values ('gold', 1, 20, true), ('gold', 2, 5, false), ('silver', 1, 12, true),
                              ('bronze', 1, 2, true), ('on-demand', 1, 90, true)) v(name, n, ago, on_target)
            on v.name = g.name""")


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in the scrape"
    return float(match.group(1))


async def test_each_store_gives_the_same_rpo_series(db: Database, store_env: dict[str, str]) -> None:
    groups_behind(db)
    store = make_store(engine_settings(db.url, **store_env))
    metrics = Metrics()
    await store.open()
    try:
        await metrics.observe_protection(store)
    finally:
        await store.close()
    text = generate_latest(metrics.registry).decode()
    # gold's newest point on the target is 20 min old (the 5-min one is not on the target)
    assert 1200 <= value(text, 'zerfaux_rpo_seconds{group="gold"}') < 1260
    assert value(text, 'zerfaux_rpo_violated{group="gold"}') == 1
    assert value(text, 'zerfaux_rpo_status{group="silver",status="at_risk"}') == 1
    assert value(text, 'zerfaux_rpo_violated{group="silver"}') == 0
    assert value(text, 'zerfaux_rpo_status{group="bronze",status="ok"}') == 1
    assert value(text, 'zerfaux_rpo_target_seconds{group="bronze"}') == 900
    assert value(text, 'zerfaux_group_paused{group="paused \\"q\\""}') == 1
    assert value(text, 'zerfaux_rpo_status{group="paused \\"q\\"",status="unknown"}') == 1
    assert 'zerfaux_rpo_target_seconds{group="on-demand"}' not in text
    # the same statuses the view shows a person
    view = {r["name"]: r["rpo_status"] for r in db.sql("select name, rpo_status from protection_status")}
    served = dict(re.findall(r'^zerfaux_rpo_status\{group="(.*)",status="(\w+)"\} 1\.0$', text, re.MULTILINE))
    assert served == {name.replace('"', '\\"'): s for name, s in view.items()}


def test_metrics_over_http_follow_a_new_recovery_point(db: Database) -> None:
    groups_behind(db)
    store = PostgresStore(db.url, pool_size=2)
    with Served(SECRET, store) as served, httpx.Client(timeout=10) as http:
        asyncio.run_coroutine_threadsafe(store.open(), served._loop).result(15)
        try:
            text = http.get(f"{served.url}/metrics").text
            assert value(text, 'zerfaux_rpo_violated{group="gold"}') == 1
            assert value(text, "zerfaux_protection_status_up") == 1
            assert 'zerfaux_source_connected{source="webhook"} 1.0' in text  # the old series still there
            db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
                   " select id, 'zerfaux-new', 'new', now() from protection_groups where name = 'gold'")
            served.metrics._protection_read_at = float("-inf")  # past the cache, as a scrape 5 s later
            text = http.get(f"{served.url}/metrics").text
            assert value(text, 'zerfaux_rpo_violated{group="gold"}') == 0
            assert value(text, 'zerfaux_rpo_seconds{group="gold"}') < 60
        finally:
            asyncio.run_coroutine_threadsafe(store.close(), served._loop).result(15)
