"""One mode per database (issue 11 §5), through both stores and against real Postgres."""

from __future__ import annotations

import concurrent.futures

import psycopg
import pytest

from listener.mode import ModeMismatch
from listener.service import build_listener, serve
from tests.integration.conftest import GROUP
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database


async def test_the_first_listener_records_its_mode_and_one_of_the_other_mode_refuses(
    world: Database, store_env: dict[str, str]
) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    world.sql("update vcenters set sync_requested_at = now() where name = 'vc-primary'")
    assert world.value("select zerfaux.database_mode()") is None
    await drain(engine_settings(world.url, **store_env))
    assert world.value("select zerfaux.database_mode()") == "stub"
    # What the stubs wrote says so, whatever the kind stores as its result.
    results = {r["kind"]: r["result"] for r in world.sql("select kind, result from zerfaux.operations")}
    assert {kind: result["mode"] for kind, result in results.items()} == {
        "replication.run": "stub", "vcenter.sync": "stub"}
    assert results["vcenter.sync"]["vms"] == 50  # the summary is still there

    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    listener = build_listener(engine_settings(world.url, ZERFAUX_USE_STUBS="false", **store_env))
    with pytest.raises(ModeMismatch) as refused:
        await serve(listener, until_idle=True)
    message = str(refused.value)
    assert "stub database" in message and "ZERFAUX_USE_STUBS" in message and "zerfaux mode real" in message
    # It touched nothing: the job is still pending, no claim was made.
    assert world.value("select status from replication_jobs order by created_at desc limit 1") == "pending"
    assert world.value("select count(*) from zerfaux.operations where status <> 'succeeded'") == 1
    assert world.value("select count(*) from zerfaux.operations where worker_id = %s",
                       (listener.settings.worker_id,)) == 0


async def test_a_stub_listener_refuses_a_real_database(db: Database, store_env: dict[str, str]) -> None:
    db.sql("select zerfaux.set_mode('real')")
    listener = build_listener(engine_settings(db.url, **store_env))
    with pytest.raises(ModeMismatch, match="real database.*ZERFAUX_USE_STUBS=false.*zerfaux mode stub"):
        await serve(listener, until_idle=True)
    assert db.value("select zerfaux.database_mode()") == "real"


def test_listeners_starting_at_once_agree_on_one_mode(db: Database) -> None:
    """claim_mode from 16 connections released together, half asking stub and half real: every
    answer is the one mode recorded."""
    connections = [psycopg.connect(db.url, autocommit=True) for _ in range(16)]
    try:
        for conn in connections:  # connected and warm before the race starts
            conn.execute("select 1")

        def claim(i: int) -> str:
            row = connections[i].execute("select zerfaux.claim_mode(%s)", ("stub" if i % 2 else "real",)).fetchone()
            assert row is not None
            return str(row[0])

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(claim, range(16)))
    finally:
        for conn in connections:
            conn.close()
    recorded = db.value("select zerfaux.database_mode()")
    assert recorded in ("stub", "real")
    assert answers == [recorded] * 16
    assert db.value("select count(*) from zerfaux.settings where name = 'mode'") == 1


def test_set_mode_answers_what_it_replaced_and_refuses_other_words(db: Database) -> None:
    assert db.value("select zerfaux.set_mode('real')") is None
    assert db.value("select zerfaux.set_mode('stub')") == "real"
    assert db.value("select zerfaux.claim_mode('real')") == "stub"
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="mode must be 'stub' or 'real'"):
        db.sql("select zerfaux.set_mode('prod')")


async def test_both_stores_read_claim_and_set_the_mode(db: Database, store_env: dict[str, str]) -> None:
    from listener.service import make_store

    store = make_store(engine_settings(db.url, **store_env))
    await store.open()
    try:
        assert await store.database_mode() is None
        assert await store.claim_mode("stub") == "stub"
        assert await store.claim_mode("real") == "stub"  # recorded once, by the first
        assert await store.set_mode("real") == "stub"  # on purpose: answers what it replaced
        assert await store.database_mode() == "real"
    finally:
        await store.close()
    assert db.one("select value, set_by from zerfaux.settings where name = 'mode'") == {
        "value": "real", "set_by": "zerfaux mode"}


async def test_a_running_listener_stops_when_the_mode_is_changed_under_it(world: Database) -> None:
    import asyncio

    # The running stub job outlasts the shutdown grace, so it is released, not finished.
    listener = build_listener(engine_settings(world.url, ZERFAUX_STUB_SECONDS="30", ZERFAUX_SHUTDOWN_GRACE_SECONDS="1"))
    engine = asyncio.create_task(serve(listener))
    try:
        for _ in range(100):
            if world.value("select zerfaux.database_mode()") == "stub":
                break
            await asyncio.sleep(0.1)
        world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        for _ in range(100):  # a stub job is running when the mode changes
            if world.value("select status from replication_jobs") == "running":
                break
            await asyncio.sleep(0.1)
        world.sql("select zerfaux.set_mode('real')")
        with pytest.raises(ModeMismatch, match="changed to 'real'.*ZERFAUX_USE_STUBS=false"):
            await asyncio.wait_for(engine, 60)
    finally:
        listener.dispatcher.stop()
        if not engine.done():
            await asyncio.wait_for(engine, 30)
    # The stub result was not written into a real database: the job went back to the queue.
    assert world.value("select status from zerfaux.operations where kind = 'replication.run'") == "queued"
    assert world.value("select status from replication_jobs") != "completed"
