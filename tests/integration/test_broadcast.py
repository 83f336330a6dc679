"""Broadcast from Database as the Realtime wake-up (issue 16, section 2), against real Postgres
with a test-only ``realtime`` schema (tests/fakes/realtime_schema.sql) and the Realtime fake.

The realtime schema is added after the migrations, as on a project where Realtime came later:
the triggers find ``realtime.send`` at call time and stay silent until
``zerfaux.install_broadcast_policies()`` has run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from listener.config import RealtimeWakeups
from listener.service import Listener
from listener.sources.realtime import TOPIC, RealtimeSource
from tests.fakes.supabase import FakeSupabase
from tests.integration.conftest import GROUP
from tests.integration.test_supabase_native import supabase_only
from tests.support.engine import eventually, running
from tests.support.hints import Hints
from tests.support.pg import Database

SCHEMA = Path(__file__).parents[1] / "fakes" / "realtime_schema.sql"


def add_realtime(db: Database, policies: bool = True) -> None:
    db.sql(SCHEMA.read_text())
    # The application's own policy lets every signed-in user use every topic: Zerfaux's
    # restrictive policies must still keep its topic closed.
    db.sql("create policy app_uses_every_topic on realtime.messages for all to authenticated "
           "using (true) with check (true)")
    if policies:
        assert db.value("select zerfaux.install_broadcast_policies()") is True


def messages(db: Database) -> list[dict[str, Any]]:
    return db.sql("select topic, event, payload, private, extension from realtime.messages order by inserted_at")


def request_sync(db: Database) -> None:
    db.sql("update vcenters set sync_requested_at = now() where site = 'primary'")


@pytest.fixture
def rt_db(seeded_db: Database) -> Database:
    add_realtime(seeded_db)
    return seeded_db


@pytest.fixture
def fake(rt_db: Database) -> Iterator[FakeSupabase]:
    with FakeSupabase(rt_db.url) as supabase:
        yield supabase


@asynccontextmanager
async def started(fake: FakeSupabase, key: str | None = None, wakeups: RealtimeWakeups = "broadcast",
                  ready: bool = True) -> AsyncIterator[tuple[RealtimeSource, Hints]]:
    hints = Hints()

    async def broadcast_ready() -> bool:
        return ready

    source = RealtimeSource(fake.url, key or fake.key, hints.wake, hints.poke, max_backoff=0.2,
                            subscribe_timeout=2.0, check_seconds=0.2, wakeups=wakeups,
                            broadcast_ready=broadcast_ready)
    task = asyncio.create_task(source.run())
    try:
        yield source, hints
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_on_bare_postgres_enqueueing_is_unchanged(seeded_db: Database) -> None:
    assert seeded_db.value("select zerfaux.broadcast_ready()") is False
    assert seeded_db.value("select zerfaux.install_broadcast_policies()") is False  # no realtime.messages
    request_sync(seeded_db)
    assert seeded_db.value("select count(*) from zerfaux.operations where status = 'queued'") == 1


def test_a_project_with_realtime_gets_the_policies_from_the_migration(empty_db: Database) -> None:
    from listener.migrate import migrate

    for role in ("anon", "authenticated", "service_role"):  # cluster-wide; Supabase has them first
        if not empty_db.sql("select 1 from pg_roles where rolname = %s", (role,)):
            empty_db.sql(f"create role {role} nologin noinherit" + (" bypassrls" if role == "service_role" else ""))
    empty_db.sql(SCHEMA.read_text())
    migrate(empty_db.url)
    assert empty_db.value("select zerfaux.broadcast_ready()") is True
    policies = empty_db.sql("select policyname, permissive, roles::text[] as roles, cmd from pg_policies"
                            " where schemaname = 'realtime' order by 1")
    assert policies == [
        {"policyname": "zerfaux_topic_not_readable_by_api_users", "permissive": "RESTRICTIVE",
         "roles": ["anon", "authenticated"], "cmd": "SELECT"},
        {"policyname": "zerfaux_topic_not_writable_by_api_users", "permissive": "RESTRICTIVE",
         "roles": ["anon", "authenticated"], "cmd": "INSERT"},
    ]


def test_realtime_added_later_sends_only_once_its_policies_exist(seeded_db: Database) -> None:
    add_realtime(seeded_db, policies=False)
    request_sync(seeded_db)
    assert messages(seeded_db) == [] and seeded_db.value("select zerfaux.broadcast_ready()") is False
    assert seeded_db.value("select zerfaux.install_broadcast_policies()") is True
    assert seeded_db.value("select zerfaux.install_broadcast_policies()") is True  # twice is fine
    seeded_db.sql("update zerfaux.operations set status = 'succeeded'")
    request_sync(seeded_db)
    op = seeded_db.one("select id::text, kind from zerfaux.operations where status = 'queued'")
    assert messages(seeded_db) == [{"topic": TOPIC, "event": "operation", "payload": {"id": op["id"], "kind": op["kind"]},
                                    "private": True, "extension": "broadcast"}]


def test_work_given_back_and_a_cancel_request_broadcast_ids_only(rt_db: Database) -> None:
    job = rt_db.value("insert into replication_jobs (protection_group_id) values (%s) returning id::text", (GROUP,))
    op = rt_db.value("select id::text from zerfaux.operations where kind = 'replication.run'")
    rt_db.sql("update zerfaux.operations set status = 'running', worker_id = 'w1', started_at = now(),"
              " lease_expires_at = now() + interval '1 minute' where id = %s", (op,))
    assert rt_db.value("select zerfaux.release('w1', array[%s]::uuid[])", (op,)) == 1
    rt_db.sql("update replication_jobs set cancel_requested = true where id = %s", (job,))
    rt_db.sql("update replication_jobs set bytes_transferred = 5 where id = %s", (job,))  # no broadcast
    assert [(m["event"], m["payload"]) for m in messages(rt_db)] == [
        ("operation", {"id": op, "kind": "replication.run"}),
        ("operation", {"id": op, "kind": "replication.run"}),
        ("cancel", {"id": job}),
    ]


def test_a_failing_realtime_send_never_aborts_the_enqueue(rt_db: Database) -> None:
    rt_db.sql("create or replace function realtime.send(payload jsonb, event text, topic text, private boolean"
              " default true) returns void language plpgsql as $$ begin raise exception 'realtime is down'; end $$")
    with psycopg.connect(rt_db.url, autocommit=True) as conn:
        warnings: list[str] = []
        conn.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
        conn.execute("update vcenters set sync_requested_at = now() where site = 'primary'")
    assert rt_db.value("select count(*) from zerfaux.operations where status = 'queued'") == 1
    assert any("realtime is down" in w for w in warnings)


def test_api_users_cannot_read_or_write_the_topic_even_with_a_permissive_app_policy(rt_db: Database) -> None:
    request_sync(rt_db)
    with psycopg.connect(rt_db.url) as conn:
        conn.execute("set role authenticated")
        assert conn.execute("select count(*) from realtime.messages where topic = %s", (TOPIC,)).fetchone() == (0,)
        conn.execute("insert into realtime.messages (topic, extension) values ('room:1', 'broadcast')")
        assert conn.execute("select count(*) from realtime.messages where topic = 'room:1'").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("insert into realtime.messages (topic, extension) values (%s, 'broadcast')", (TOPIC,))
    assert rt_db.value("select count(*) from realtime.messages where topic = %s", (TOPIC,)) == 1


async def join(fake: FakeSupabase, apikey: str, access_token: str | None) -> RealtimeSubscribeStates:
    client = AsyncRealtimeClient(f"{fake.url}/realtime/v1", apikey, auto_reconnect=False)
    client.access_token = access_token
    await client.connect()
    states: asyncio.Queue[RealtimeSubscribeStates] = asyncio.Queue()
    channel = client.channel(TOPIC, {"config": {"broadcast": {"ack": False, "self": False},
                                                "presence": {"key": "", "enabled": False}, "private": True}})
    await channel.subscribe(lambda status, error: states.put_nowait(status))
    try:
        return await asyncio.wait_for(states.get(), 5)
    finally:
        await client.close()


async def test_only_the_server_key_may_join_the_private_topic(fake: FakeSupabase) -> None:
    user = fake.keys.jwt("authenticated", sub="00000000-0000-0000-0000-000000000001")
    assert await join(fake, fake.keys.publishable_key, user) == RealtimeSubscribeStates.CHANNEL_ERROR
    assert await join(fake, fake.keys.publishable_key, None) == RealtimeSubscribeStates.CHANNEL_ERROR
    assert await join(fake, fake.keys.secret_key, None) == RealtimeSubscribeStates.SUBSCRIBED
    assert await join(fake, fake.key, fake.key) == RealtimeSubscribeStates.SUBSCRIBED


async def test_a_reconnect_replays_what_was_sent_while_away(rt_db: Database, fake: FakeSupabase) -> None:
    async with started(fake) as (source, hints):
        await eventually(lambda: source.connected and source.via == "broadcast")
        fake.realtime.refuse = True
        fake.call(fake.realtime.close_abrupt)
        await eventually(lambda: not source.connected)
        request_sync(rt_db)
        rt_db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        await asyncio.sleep(0.5)
        assert not source.heard  # nobody was there to hear them
        fake.realtime.refuse = False
        await eventually(lambda: source.connected and len(source.heard) == 2)
        ops = {r["id"] for r in rt_db.sql("select id::text from zerfaux.operations")}
        assert {h["id"] for h in source.heard} == ops and all(h["replayed"] for h in source.heard)
        replay = fake.realtime.join_payloads[-1]["config"]["broadcast"]["replay"]
        assert replay["limit"] == 25 and isinstance(replay["since"], int)
        assert "replay" not in fake.realtime.join_payloads[0]["config"]["broadcast"]
        request_sync(rt_db)  # a merged request: no new operation, no broadcast
        rt_db.sql("update zerfaux.operations set status = 'succeeded' where kind = 'vcenter.sync'")
        request_sync(rt_db)
        await eventually(lambda: len(source.heard) == 3 and not source.heard[-1]["replayed"])


async def test_no_row_data_travels_in_a_broadcast(rt_db: Database, fake: FakeSupabase) -> None:
    async with started(fake) as (source, hints):
        await eventually(lambda: source.connected)
        job = rt_db.value("insert into replication_jobs (protection_group_id) values (%s) returning id::text", (GROUP,))
        rt_db.sql("update replication_jobs set status = 'running' where id = %s", (job,))
        rt_db.sql("update replication_jobs set cancel_requested = true where id = %s", (job,))
        await eventually(lambda: len(fake.realtime.broadcast_frames) == 2 and hints.pokes == 1)
    row = rt_db.one("select id::text from zerfaux.operations")
    frames = fake.realtime.broadcast_frames
    assert [f["payload"]["payload"] for f in frames] == [{"id": row["id"], "kind": "replication.run"}, {"id": job}]
    assert all(f["topic"] == f"realtime:{TOPIC}" for f in frames)
    # Nothing of the rows: not the job's group, status or flags; and no Postgres Changes either.
    assert str(GROUP) not in str(frames) and "running" not in str(frames) and "cancel_requested" not in str(frames)
    assert fake.realtime.events_sent == 0


async def test_auto_uses_postgres_changes_when_the_database_does_not_broadcast(rt_db: Database,
                                                                               fake: FakeSupabase) -> None:
    async with started(fake, wakeups="auto", ready=False) as (source, hints):
        await eventually(lambda: source.connected)
        assert source.via == "changes"
        request_sync(rt_db)
        await eventually(lambda: hints.wakes == 2)
        assert fake.realtime.events_sent == 1 and not source.heard


async def test_auto_falls_back_to_postgres_changes_when_the_private_join_is_refused(fake: FakeSupabase) -> None:
    # A legacy anon JWT: its role may not read the topic, the join is refused.
    async with started(fake, key=fake.keys.anon_jwt, wakeups="auto") as (source, hints):
        await eventually(lambda: source.connected, timeout=10)
        assert source.via == "changes" and source.reconnects >= 1


async def test_the_listener_claims_through_a_broadcast_hint_alone(rt_db: Database, fake: FakeSupabase,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # No DATABASE_URL (so no NOTIFY), a sweep 30 s away: the broadcast is what brings the work in.
    settings = supabase_only(rt_db, fake, monkeypatch, ZERFAUX_SECRET_KEY="", SUPABASE_SERVICE_ROLE_KEY="",
                             SUPABASE_SECRET_KEY=fake.keys.secret_key)
    async with running(settings) as listener:
        realtime = realtime_of(listener)
        await eventually(lambda: realtime.connected and realtime.via == "broadcast")
        rt_db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        await eventually(lambda: rt_db.value("select status from replication_jobs") == "completed", timeout=15)
        assert [h["kind"] for h in realtime.heard] == ["replication.run"]
        assert fake.realtime.events_sent == 0
        assert all(auth is None for key, auth in fake.faults.credentials)  # sb_ key never a bearer
        assert all("access_token" not in p for p in fake.realtime.join_payloads)


def realtime_of(listener: Listener) -> RealtimeSource:
    return next(s for s in listener.sources if isinstance(s, RealtimeSource))


CHECKED = ("install_broadcast_policies", "broadcast", "operations_broadcast", "cancel_broadcast")
PLPGSQL_CHECK = """
select p.proname, r.level, r.message
  from pg_proc p
 cross join lateral plpgsql_check_function_tb(
       p.oid, coalesce((select t.tgrelid from pg_trigger t where t.tgfoid = p.oid limit 1), 0),
       fatal_errors => false, other_warnings => true, performance_warnings => true,
       extra_warnings => true, security_warnings => true) r
 where p.pronamespace = 'zerfaux'::regnamespace and p.proname = any(%s)
"""


@pytest.mark.parametrize("with_realtime", [False, True])
def test_the_broadcast_functions_pass_plpgsql_check(seeded_db: Database, with_realtime: bool) -> None:
    from tests.support.require import missing

    if not seeded_db.sql("select 1 from pg_available_extensions where name = 'plpgsql_check'"):
        missing("plpgsql_check", "install postgresql-15-plpgsql-check (scripts/bootstrap.sh)")
    seeded_db.sql("create extension if not exists plpgsql_check")
    if with_realtime:
        add_realtime(seeded_db)
    assert seeded_db.value("select count(*) from pg_proc where proname = any(%s)"
                           " and pronamespace = 'zerfaux'::regnamespace", (list(CHECKED),)) == len(CHECKED)
    assert seeded_db.sql(PLPGSQL_CHECK, (list(CHECKED),)) == []
