"""A planned migration or failover and the group's replication jobs already under way
(20261201180600_failover_replication_guard.sql): a migration waits for none, it is refused
naming the job; a failover asks them to stop in its own transaction. Real Postgres, the seed's
group ``gold``."""

from __future__ import annotations

import psycopg
import pytest

from tests.integration.conftest import GROUP
from tests.integration.test_failover_runs_sql import admin_insert, group, refused
from tests.integration.test_recovery_runs_sql import point, roles
from tests.support.pg import Database


def job(db: Database, status: str = "pending") -> str:
    jid = str(db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,)))
    if status != "pending":
        db.sql("update replication_jobs set status = %s where id = %s", (status, jid))
    return jid


@pytest.mark.parametrize("state", ["pending", "running"])
def test_a_planned_migration_is_refused_while_a_job_replicates(world: Database, state: str) -> None:
    roles(world)
    jid = job(world, state)
    err = refused(world, psycopg.errors.ObjectNotInPrerequisiteState, "recovery_runs_replication_in_flight",
                  lambda: admin_insert(world, "planned_migration"))
    assert jid in str(err) and "cancel_requested" in (err.diag.message_hint or "")
    assert world.value("select cancel_requested from replication_jobs where id = %s", (jid,)) is False
    assert group(world)["state"] == "protected"


def test_a_planned_migration_starts_once_the_job_ended(world: Database) -> None:
    roles(world)
    jid = job(world, "running")
    world.sql("update replication_jobs set status = 'completed' where id = %s", (jid,))
    admin_insert(world, "planned_migration")
    assert group(world)["state"] == "recovering"


@pytest.mark.parametrize("state", ["pending", "running"])
def test_a_failover_asks_the_job_under_way_to_stop(world: Database, state: str) -> None:
    roles(world)
    point(world)
    done = job(world, "completed")
    jid = job(world, state)
    admin_insert(world, "failover")
    rows = {r["id"]: r for r in world.sql("select id::text, status, cancel_requested from replication_jobs")}
    if state == "pending":
        assert rows[jid]["status"] == "cancelled"  # a pending job ends at once (replication_jobs_cancel)
    else:
        assert rows[jid]["cancel_requested"] is True and rows[jid]["status"] == "running"
    assert rows[done]["cancel_requested"] is False and rows[done]["status"] == "completed"
    assert group(world)["state"] == "recovering"


def test_a_refused_failover_cancels_nothing(world: Database) -> None:
    roles(world)  # no recovery point: the rules refuse it after the guard ran
    jid = job(world, "running")
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_point_on_target",
            lambda: admin_insert(world, "failover"))
    assert world.value("select cancel_requested from replication_jobs where id = %s", (jid,)) is False
