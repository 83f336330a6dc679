"""Transient failures are retried for a time budget (ZERFAUX_RETRY_WINDOW_SECONDS) from the
first failure of the streak, not for a count, unless max_attempts is set on purpose; the row
says when the next attempt starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone

import pytest

from listener.config import Settings
from listener.store_pg import PostgresStore
from tests.integration.conftest import GROUP, PRIMARY
from tests.support.pg import Database


@pytest.fixture
async def store(world: Database) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(world.url, pool_size=2, retry_window_seconds=600)
    await s.open()
    yield s
    await s.close()


def due_now(db: Database) -> None:
    db.sql("update zerfaux.operations set run_after = now() where status = 'queued'")


def test_the_window_is_a_setting_with_a_default_of_an_hour() -> None:
    assert Settings.from_environ({}).retry_window_seconds == 3600
    assert Settings.from_environ({"ZERFAUX_RETRY_WINDOW_SECONDS": "90"}).retry_window_seconds == 90


async def test_a_job_is_retried_past_five_attempts_and_shows_its_next_attempt(world: Database, store: PostgresStore) -> None:
    job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    assert world.value("select max_attempts from zerfaux.operations") is None
    for attempt in range(1, 9):
        [op] = await store.claim("w", 1, 30)
        assert op.attempts == attempt and op.max_attempts is None
        assert world.value("select next_attempt_at from replication_jobs") is None  # running
        assert await store.fail(op.id, "w", "ssh: connect to host dr.example port 22: Connection refused", False, 120) == "retrying"
        row = world.one("select j.status, j.error, j.next_attempt_at, o.run_after, o.last_error, o.failing_since"
                        " from replication_jobs j join zerfaux.operations o on o.subject_id = j.id where j.id = %s", (job,))
        assert row["status"] == "pending" and row["next_attempt_at"] == row["run_after"]
        when = row["next_attempt_at"].astimezone(timezone.utc).strftime("%H:%M:%S")
        assert row["error"].startswith(f"attempt {attempt} failed, next attempt at {when} UTC (retrying for up to ")
        assert row["error"].endswith("more minutes): ssh: connect to host dr.example port 22: Connection refused")
        assert row["last_error"] == row["error"]
        due_now(world)
    # The streak began at the first failure: eight minutes ago, two left of the ten.
    world.sql("update zerfaux.operations set failing_since = now() - interval '8 minutes'")
    [op] = await store.claim("w", 1, 30)
    assert await store.fail(op.id, "w", "still refused", False, 120) == "retrying"
    assert "(retrying for up to 2 more minutes)" in world.value("select error from replication_jobs")
    # Past the window: the end, in both rows, naming the setting.
    world.sql("update zerfaux.operations set failing_since = now() - interval '11 minutes', run_after = now()")
    [op] = await store.claim("w", 1, 30)
    assert await store.fail(op.id, "w", "still refused", False, 120) == "failed"
    row = world.one("select j.status, j.error, j.next_attempt_at, o.status as op, o.failing_since"
                    " from replication_jobs j join zerfaux.operations o on o.subject_id = j.id")
    assert (row["status"], row["op"], row["next_attempt_at"], row["failing_since"]) == ("failed", "failed", None, None)
    assert row["error"].startswith("failed after 10 attempts over 11 minutes")
    assert "ZERFAUX_RETRY_WINDOW_SECONDS" in row["error"] and row["error"].endswith("still refused")


async def test_the_last_attempt_starts_at_the_end_of_the_window_not_after(world: Database, store: PostgresStore) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    [op] = await store.claim("w", 1, 30)
    await store.fail(op.id, "w", "down", False, 1)
    world.sql("update zerfaux.operations set failing_since = now() - interval '9 minutes 50 seconds', run_after = now()")
    [op] = await store.claim("w", 1, 30)
    assert await store.fail(op.id, "w", "down", False, 300) == "retrying"
    row = world.one("select run_after, failing_since from zerfaux.operations")
    assert abs((row["run_after"] - row["failing_since"]).total_seconds() - 600) < 1


async def test_an_explicit_max_attempts_still_caps_the_count(world: Database, store: PostgresStore) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    world.sql("update zerfaux.operations set max_attempts = 2")
    [op] = await store.claim("w", 1, 30)
    assert op.max_attempts == 2
    assert await store.fail(op.id, "w", "vCenter unreachable", False, 1) == "retrying"
    assert world.value("select last_sync_error from vcenters where id = %s", (PRIMARY,)).startswith("attempt 1 of 2 failed, next attempt at ")
    due_now(world)
    [op] = await store.claim("w", 1, 30)
    assert await store.fail(op.id, "w", "vCenter unreachable", False, 1) == "failed"
    assert world.value("select last_error from zerfaux.operations") == "failed after 2 attempts: vCenter unreachable"


async def test_success_clears_the_streak_and_the_next_attempt(world: Database, store: PostgresStore) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    [op] = await store.claim("w", 1, 30)
    await store.fail(op.id, "w", "down", False, 1)
    assert world.value("select next_attempt_at from replication_jobs") is not None
    due_now(world)
    [op] = await store.claim("w", 1, 30)
    assert (await store.complete_many("w", [(op.id, {"snapshot_name": "s1"})]))[op.id] == (True, None)
    row = world.one("select j.status, j.error, j.next_attempt_at, o.failing_since"
                    " from replication_jobs j join zerfaux.operations o on o.subject_id = j.id")
    assert row == {"status": "completed", "error": None, "next_attempt_at": None, "failing_since": None}


async def test_a_worker_that_keeps_dying_is_given_up_on_after_the_window(world: Database, store: PostgresStore) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    [op] = await store.claim("dead-1", 1, 30)
    world.sql("update zerfaux.operations set lease_expires_at = now() - interval '1 second'")
    [again] = await store.claim("dead-2", 1, 30)  # taken over: the dead attempt starts the streak
    assert again.attempts == 2
    assert world.value("select failing_since is not null from zerfaux.operations")
    world.sql("update zerfaux.operations set lease_expires_at = now() - interval '1 second',"
              " failing_since = now() - interval '11 minutes', started_at = now() - interval '1 minute'")
    assert await store.claim("other", 1, 30) == []
    row = world.one("select status, last_error from zerfaux.operations")
    assert row["status"] == "failed" and "stopped responding" in row["last_error"]
    assert "ZERFAUX_RETRY_WINDOW_SECONDS" in row["last_error"]


async def test_a_failure_after_a_long_healthy_attempt_starts_a_new_streak(world: Database, store: PostgresStore) -> None:
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    [op] = await store.claim("w", 1, 30)
    await store.fail(op.id, "w", "down", False, 1)
    due_now(world)
    [op] = await store.claim("w", 1, 30)
    # This attempt ran for longer than the window before it broke: a new outage, a new budget.
    world.sql("update zerfaux.operations set started_at = now() - interval '20 minutes',"
              " failing_since = now() - interval '21 minutes'")
    assert await store.fail(op.id, "w", "down again", False, 1) == "retrying"
    assert world.value("select now() - failing_since < interval '1 minute' from zerfaux.operations")
    assert isinstance(world.value("select failing_since from zerfaux.operations"), datetime)
