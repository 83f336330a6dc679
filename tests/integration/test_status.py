"""`zerfaux status` reads the same through either store."""

from __future__ import annotations

from listener.service import make_store
from tests.integration.conftest import GROUP
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database


async def test_status_report_through_each_store(world: Database, store_env: dict[str, str]) -> None:
    world.sql("update vcenters set sync_requested_at = now()")
    await drain(engine_settings(world.url, ZERFAUX_WORKER_ID="w-status"))
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    store = make_store(engine_settings(world.url, **store_env))
    await store.open()
    try:
        report = await store.status_report(recent=5)
    finally:
        await store.close()
    assert {"kind": "vcenter.sync", "status": "succeeded", "n": 2} in report["by_kind"]
    assert {"kind": "replication.run", "status": "queued", "n": 1} in report["by_kind"]
    assert report["recent"][0]["kind"] == "replication.run" and len(report["recent"]) == 3
    assert report["oldest_queued_seconds"] >= 0
    assert report["workers"] == []  # the worker left cleanly (released its row)
