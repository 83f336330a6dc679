"""A listener holding only the project URL and the service-role key: PostgREST for every state
change, Realtime and webhooks for wake-ups. The sweep is set far out (30 s) so that converging
within seconds shows the hint arrived; where a hint is lost on purpose, the sweep (or the wake
after a reconnect) is what brings the work in."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from listener.config import Settings
from listener.service import Listener
from listener.sources.realtime import RealtimeSource
from tests.fakes.supabase import FakeSupabase
from tests.integration.conftest import GROUP, add_vm, protect
from tests.support.engine import engine_settings, eventually, running
from tests.support.pg import Database

SECRET = "hook-secret-for-tests"


@pytest.fixture
def fake(seeded_db: Database) -> Iterator[FakeSupabase]:
    with FakeSupabase(seeded_db.url) as supabase:
        yield supabase


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def supabase_only(db: Database, fake: FakeSupabase, monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    monkeypatch.setenv("ZERFAUX_HTTP_HOST", "127.0.0.1")
    return engine_settings(db.url, **{
        "DATABASE_URL": "", "SUPABASE_URL": fake.url, "SUPABASE_SERVICE_ROLE_KEY": fake.key,
        "ZERFAUX_SWEEP_SECONDS": "30", "ZERFAUX_STUB_VMS": "5",
        "ZERFAUX_HTTP_PORT": str(free_port()), "ZERFAUX_WEBHOOK_SECRET": SECRET, **env,
    })


def realtime_of(listener: Listener) -> RealtimeSource:
    return next(s for s in listener.sources if isinstance(s, RealtimeSource))


def succeeded(db: Database) -> int:
    return int(db.value("select count(*) from zerfaux.operations where status = 'succeeded'"))


def request_sync(db: Database) -> None:
    db.sql("update vcenters set sync_requested_at = now() where site = 'primary'")


async def test_stub_operations_converge_end_to_end(seeded_db: Database, fake: FakeSupabase,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = supabase_only(seeded_db, fake, monkeypatch)
    async with running(settings) as listener:
        assert listener.store.description.startswith(fake.url)
        assert not any(s.name == "notify" for s in listener.sources)
        await eventually(lambda: realtime_of(listener).connected)
        request_sync(seeded_db)
        vm = add_vm(seeded_db)
        protect(seeded_db, vm, needs_storage_vmotion=True, needs_dr_shell=True)
        seeded_db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        await eventually(lambda: succeeded(seeded_db) == 4, timeout=15)
        assert seeded_db.value("select count(*) from vcenter_vms where removed_at is null") >= 5
        assert seeded_db.value("select status from replication_jobs") == "completed"
        pvm = seeded_db.one("select needs_storage_vmotion, needs_dr_shell, dr_shell_vm_created from protected_vms")
        assert pvm == {"needs_storage_vmotion": False, "needs_dr_shell": False, "dr_shell_vm_created": True}
        assert fake.realtime.events_sent >= 4
        base = f"http://127.0.0.1:{settings.http_port}"
        async with httpx.AsyncClient() as client:
            ready = (await client.get(f"{base}/readyz")).json()
            assert ready["ready"] and ready["sources"] == {"realtime": True, "webhook": True, "sweep": True}
            metrics = (await client.get(f"{base}/metrics")).text
        assert 'zerfaux_operations_total{kind="vcenter.sync",outcome="succeeded"} 1.0' in metrics
        assert 'zerfaux_source_connected{source="realtime"} 1.0' in metrics


@pytest.mark.parametrize("fault", ["clean close", "abrupt close", "delayed subscribe"])
async def test_work_committed_while_realtime_is_away_converges(
    seeded_db: Database, fake: FakeSupabase, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    async with running(supabase_only(seeded_db, fake, monkeypatch)) as listener:
        source = realtime_of(listener)
        await eventually(lambda: source.connected)
        await asyncio.sleep(0.5)  # let start-up's own wake-ups (subscription, first sweep) pass
        joins = fake.realtime.joins
        if fault == "delayed subscribe":
            fake.realtime.subscribed_delay = 1.5
        fake.call(fake.realtime.close_clean if fault == "clean close" else fake.realtime.close_abrupt)
        if fault == "delayed subscribe":
            # Joined again but not yet subscribed: this insert has no live subscriber and is dropped.
            await eventually(lambda: fake.realtime.joins > joins)
            assert not source.connected
        sent = fake.realtime.events_sent
        request_sync(seeded_db)
        await eventually(lambda: succeeded(seeded_db) == 1, timeout=10)
        assert fake.realtime.events_sent == sent  # not carried by an event: by the wake on resubscribe
        assert source.reconnects >= 1 and source.connected


async def test_dropped_events_are_swept_up(seeded_db: Database, fake: FakeSupabase,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(supabase_only(seeded_db, fake, monkeypatch, ZERFAUX_SWEEP_SECONDS="1")) as listener:
        await eventually(lambda: realtime_of(listener).connected)
        await asyncio.sleep(0.5)
        fake.realtime.drop_events = 10**6
        request_sync(seeded_db)
        await eventually(lambda: succeeded(seeded_db) == 1, timeout=10)
        assert fake.realtime.events_sent == 0


async def test_a_webhook_wakes_a_listener_whose_realtime_hears_nothing(
    seeded_db: Database, fake: FakeSupabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = supabase_only(seeded_db, fake, monkeypatch)
    async with running(settings) as listener:
        await eventually(lambda: realtime_of(listener).connected)
        await asyncio.sleep(0.5)
        fake.realtime.drop_events = 10**6
        request_sync(seeded_db)
        await asyncio.sleep(0.5)
        assert succeeded(seeded_db) == 0  # nothing heard it
        op: Any = seeded_db.one("select id, kind from zerfaux.operations")
        body = {"type": "INSERT", "schema": "zerfaux", "table": "operations",
                "record": {"id": str(op["id"]), "kind": op["kind"]}, "old_record": None}
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"http://127.0.0.1:{settings.http_port}/webhooks/supabase", json=body,
                                       headers={"Authorization": f"Bearer {SECRET}"})
        assert answer.status_code == 202
        await eventually(lambda: succeeded(seeded_db) == 1, timeout=5)
