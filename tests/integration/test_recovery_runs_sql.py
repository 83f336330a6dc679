"""Recovery runs in the database (issue 13): the rules at insert, the kind recovery.run's
functions driven through the real engine functions (claim, progress, complete, fail, cancel),
and who may do what. Real Postgres, the seed's group ``gold``.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.integration.conftest import DR, GROUP, PRIMARY, TARGET, add_vm, protect
from tests.support.pg import Database

WORKER = "w-recovery-sql"
VIEWER = "30000000-0000-4000-9000-000000000001"
OPERATOR = "30000000-0000-4000-9000-000000000002"
ADMIN = "30000000-0000-4000-9000-000000000003"
ISSUE_14_KINDS = ["planned_migration", "failover", "commit", "rollback", "reprotect"]


def point(db: Database, minutes_ago: float = 5, group: str = GROUP, on_target: bool = True) -> str:
    return str(db.value(
        "insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, on_target)"
        " values (%s, %s, %s, now() - make_interval(secs => %s), %s) returning id",
        (group, f"zerfaux_{uuid.uuid4().hex[:8]}", str(uuid.uuid4().int), minutes_ago * 60, on_target)))


def run(db: Database, kind: str = "test", group: str = GROUP, **columns: Any) -> dict[str, Any]:
    cols = {"protection_group_id": group, "kind": kind, **columns}
    return db.one(f"insert into recovery_runs ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})"
                  " returning *", tuple(cols.values()))


def other_group(db: Database, name: str = "silver") -> str:
    return str(db.value("insert into protection_groups (name, source_vcenter_id, dr_vcenter_id,"
                        " replication_target_id, source_dataset) values (%s, %s, %s, %s, %s) returning id",
                        (name, PRIMARY, DR, TARGET, f"tank/{name}")))


def operations(db: Database) -> list[dict[str, Any]]:
    return db.sql("select * from zerfaux.operations where kind = 'recovery.run' order by created_at")


def claim(db: Database) -> dict[str, Any]:
    rows = [r for r in db.sql("select * from zerfaux.claim(%s, 10, 60)", (WORKER,)) if r["kind"] == "recovery.run"]
    assert len(rows) == 1, rows
    return rows[0]


def progress(db: Database, op: Any, body: dict[str, Any]) -> str:
    return str(db.value("select zerfaux.progress(%s, %s, %s::jsonb)", (op, WORKER, json.dumps(body))))


def complete(db: Database, op: Any, result: dict[str, Any]) -> None:
    [row] = db.sql("select * from zerfaux.complete_many(%s, %s::jsonb)",
                   (WORKER, json.dumps([{"id": str(op), "result": result}])))
    assert row["done"], row


def status(db: Database, run_id: Any) -> dict[str, Any]:
    return db.one("select * from recovery_runs where id = %s", (run_id,))


def as_person(db: Database, user: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """As PostgREST runs a signed-in user's request: role authenticated, the JWT's sub."""
    with psycopg.connect(db.url, row_factory=dict_row) as conn:
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)",
                     (json.dumps({"role": "authenticated", "sub": user}),))
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows


def roles(db: Database) -> None:
    db.sql("insert into zerfaux.operators (user_id, role, protection_group_id) values"
           " (%s, 'viewer', %s), (%s, 'operator', %s), (%s, 'admin', %s)",
           (VIEWER, GROUP, OPERATOR, GROUP, ADMIN, GROUP))


def active_test(db: Database) -> tuple[dict[str, Any], Any]:
    """A test run brought to 'active' through the engine; answers the run and its operation."""
    point(db)
    test = run(db)
    op = claim(db)["id"]
    progress(db, op, {"plan": [{"seq": 1, "name": "validate"}, {"seq": 2, "name": "activate"}]})
    complete(db, op, {"status": "active", "report": {"vms": 0}})
    assert status(db, test["id"])["status"] == "active"
    return test, op


# --- a test run is accepted and queued ---------------------------------------------------------

def test_a_test_takes_the_newest_point_on_the_target_and_is_queued(world: Database) -> None:
    point(world, 30)
    newest = point(world, 10)
    point(world, 1, on_target=False)  # newer, but gone from the target
    test = run(world)
    assert (test["status"], str(test["recovery_point_id"]), test["requested_by"]) == ("pending", newest, None)
    [op] = operations(world)
    assert (op["subject_id"], op["status"], op["concurrency_key"]) == (test["id"], "queued", None)


def test_a_named_point_is_kept_and_engine_columns_are_the_engines(world: Database) -> None:
    older = point(world, 30)
    point(world, 10)
    test = run(world, recovery_point_id=older, status="completed", rto_seconds=1, error="x")
    assert (str(test["recovery_point_id"]), test["status"], test["rto_seconds"], test["error"]) == (
        older, "pending", None, None)


def test_an_operator_of_the_group_starts_a_test_and_is_recorded(world: Database) -> None:
    roles(world)
    point(world)
    [row] = as_person(world, OPERATOR, "insert into recovery_runs (protection_group_id, kind) values (%s, 'test')"
                                       " returning id, requested_by", (GROUP,))
    assert str(row["requested_by"]) == OPERATOR
    assert [o["subject_id"] for o in operations(world)] == [row["id"]]
    # and the viewer reads the run and its operation
    assert len(as_person(world, VIEWER, "select id from recovery_runs")) == 1
    assert len(as_person(world, VIEWER, "select id from zerfaux.operations where kind = 'recovery.run'")) == 1


# --- refusals: each names its rule, and nothing is queued --------------------------------------

def refused(db: Database, error: type[Exception], match: str, insert: Any) -> None:
    before = (len(operations(db)), db.value("select count(*) from recovery_runs"))
    with pytest.raises(error, match=match):
        insert()
    assert (len(operations(db)), db.value("select count(*) from recovery_runs")) == before


def test_no_point_on_the_target_says_replicate_first(world: Database) -> None:
    point(world, on_target=False)
    refused(world, psycopg.errors.CheckViolation,
            r"recovery_runs_point_on_target: protection group gold .* no recovery point .*replicate first",
            lambda: run(world))


def test_a_point_of_another_group_or_gone_from_the_target_is_refused(world: Database) -> None:
    theirs = point(world, group=other_group(world))
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_point_on_target: .* belongs to another protection group",
            lambda: run(world, recovery_point_id=theirs))
    gone = point(world, on_target=False)
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_point_on_target: .* no longer on the replication target",
            lambda: run(world, recovery_point_id=gone))


@pytest.mark.parametrize("first_status", ["pending", "running", "active"])
def test_a_second_test_of_a_group_is_refused(world: Database, first_status: str) -> None:
    point(world)
    first = run(world)
    world.sql("update recovery_runs set status = %s where id = %s", (first_status, first["id"]))
    refused(world, psycopg.errors.UniqueViolation,
            f"recovery_runs_one_active_test_per_group: protection group gold .* already has a {first_status} "
            f"test run \\({first['id']}\\)", lambda: run(world))
    # another group is not held up
    silver = other_group(world)
    point(world, group=silver)
    run(world, group=silver)


def test_the_index_holds_without_the_trigger(world: Database) -> None:
    """What two inserts racing past the trigger meet."""
    point(world)
    run(world)
    with psycopg.connect(world.url) as conn:
        conn.execute("alter table recovery_runs disable trigger recovery_runs_rules")
        with pytest.raises(psycopg.errors.UniqueViolation, match="recovery_runs_one_active_test_per_group"):
            conn.execute("insert into recovery_runs (protection_group_id, kind, status) values (%s, 'test', 'pending')",
                         (GROUP,))
        conn.rollback()


def test_a_failed_test_does_not_hold_the_group(world: Database) -> None:
    point(world)
    first = run(world)
    world.sql("update recovery_runs set status = 'failed' where id = %s", (first["id"],))
    assert run(world)["status"] == "pending"


@pytest.mark.parametrize("test_status", ["pending", "running", "completed", "cancelled"])
def test_a_cleanup_of_a_test_that_is_not_active_is_refused(world: Database, test_status: str) -> None:
    point(world)
    test = run(world)
    world.sql("update recovery_runs set status = %s where id = %s", (test_status, test["id"]))
    refused(world, psycopg.errors.CheckViolation,
            f"recovery_runs_cleanup_of_an_active_test: run {test['id']} is a test run of this group in status "
            f"{test_status}", lambda: run(world, "cleanup", test_run_id=test["id"]))


def test_a_cleanup_of_another_groups_test_or_of_a_cleanup_or_of_nothing_is_refused(world: Database) -> None:
    silver = other_group(world)
    point(world, group=silver)
    theirs = run(world, group=silver)
    world.sql("update recovery_runs set status = 'active' where id = %s", (theirs["id"],))
    refused(world, psycopg.errors.CheckViolation,
            "recovery_runs_cleanup_of_an_active_test: .* a test run of another group",
            lambda: run(world, "cleanup", test_run_id=theirs["id"]))
    cleanup = run(world, "cleanup", group=silver, test_run_id=theirs["id"])
    world.sql("update recovery_runs set status = 'active' where id = %s", (cleanup["id"],))
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_cleanup_of_an_active_test: .* is a cleanup run",
            lambda: run(world, "cleanup", group=silver, test_run_id=cleanup["id"]))
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_cleanup_of_an_active_test: a cleanup run needs test_run_id",
            lambda: run(world, "cleanup"))
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_test_run_only_for_cleanup",
            lambda: run(world, test_run_id=theirs["id"]))


def test_one_cleanup_per_test_and_another_after_a_failed_one(world: Database) -> None:
    test, _ = active_test(world)
    first = run(world, "cleanup", test_run_id=test["id"])
    assert str(first["recovery_point_id"]) == str(test["recovery_point_id"])  # copied from the test
    refused(world, psycopg.errors.UniqueViolation,
            f"recovery_runs_one_cleanup_per_test: test run {test['id']} already has a pending cleanup run",
            lambda: run(world, "cleanup", test_run_id=test["id"]))
    world.sql("update recovery_runs set status = 'failed' where id = %s", (first["id"],))
    assert run(world, "cleanup", test_run_id=test["id"])["status"] == "pending"


def test_a_cleanup_of_a_failed_test_removes_its_leftovers(world: Database) -> None:
    point(world)
    test = run(world)
    world.sql("update recovery_runs set status = 'failed' where id = %s", (test["id"],))
    assert run(world, "cleanup", test_run_id=test["id"])["status"] == "pending"


def test_an_unmapped_network_is_refused_naming_it_and_its_vms(world: Database) -> None:
    point(world)
    for name, nets in (("app-01", ["VM Network", "Backend"]), ("db-01", ["Backend"])):
        vm = add_vm(world, name=name, moref=f"vm-{uuid.uuid4().hex[:6]}")
        world.sql("update vcenter_vms set networks = %s::jsonb where id = %s", (json.dumps(nets), vm))
        protect(world, vm)
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'VM Network', 'DR Network')", (GROUP,))
    refused(world, psycopg.errors.CheckViolation,
            r"recovery_runs_networks_mapped: protection group gold .* no network mapping: Backend \(VMs app-01, db-01\)\n",
            lambda: run(world))
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'Backend', 'DR Backend')", (GROUP,))
    assert run(world)["status"] == "pending"


@pytest.mark.parametrize("kind", ISSUE_14_KINDS)
def test_an_operator_may_not_start_the_kinds_of_the_failover_issue(world: Database, kind: str) -> None:
    """Their rules and endings are in test_failover_runs_sql.py; here: the role comes first."""
    point(world)
    roles(world)
    refused(world, psycopg.errors.InsufficientPrivilege, f"recovery_runs_roles: a {kind} run .* needs the admin role",
            lambda: as_person(world, OPERATOR, "insert into recovery_runs (protection_group_id, kind) values (%s, %s)",
                              (GROUP, kind)))


def test_a_viewer_and_an_operator_of_another_group_may_not_start_a_run(world: Database) -> None:
    roles(world)
    point(world)
    insert = "insert into recovery_runs (protection_group_id, kind) values (%s, 'test')"
    refused(world, psycopg.errors.InsufficientPrivilege,
            "recovery_runs_roles: a test run of protection group .* needs the operator or admin role",
            lambda: as_person(world, VIEWER, insert, (GROUP,)))
    silver = other_group(world)
    point(world, group=silver)
    refused(world, psycopg.errors.InsufficientPrivilege, "recovery_runs_roles",
            lambda: as_person(world, OPERATOR, insert, (silver,)))
    stranger = str(uuid.uuid4())
    refused(world, psycopg.errors.InsufficientPrivilege, "recovery_runs_roles",
            lambda: as_person(world, stranger, insert, (GROUP,)))
    assert as_person(world, stranger, "select id from recovery_runs") == []


def test_nobody_but_the_engine_writes_steps_or_the_engines_columns(world: Database) -> None:
    roles(world)
    test, _ = active_test(world)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_person(world, ADMIN, "insert into recovery_run_steps (run_id, seq, name) values (%s, 9, 'x')", (test["id"],))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_person(world, ADMIN, "update recovery_run_steps set status = 'done'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_person(world, ADMIN, "update recovery_runs set status = 'completed'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_person(world, ADMIN, "delete from recovery_runs")
    assert len(as_person(world, VIEWER, "select id from recovery_run_steps")) == 2


# --- the kind's functions, through the engine ----------------------------------------------------

def test_the_input_is_the_contracts(world: Database) -> None:
    p = point(world)
    vms = []
    for name, priority in (("web-01", 2), ("db-01", 1), ("app-01", 2)):
        pvm = protect(world, add_vm(world, name=name, moref=f"vm-{uuid.uuid4().hex[:6]}"))
        world.sql("update protected_vms set boot_priority = %s where id = %s", (priority, pvm))
        vms.append(pvm)
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'b', 'B'), (%s, 'a', 'A')", (GROUP, GROUP))
    test = run(world)
    payload = claim(world)["payload"]
    assert set(payload) == {"run", "group", "target", "dr_vcenter", "source_vcenter", "recovery_point",
                            "replica_dataset", "vms", "network_mappings", "steps", "test_run", "test_steps",
                            "acts_on_run", "acts_on_steps"}
    assert (payload["run"]["id"], payload["run"]["status"], payload["group"]["name"]) == (str(test["id"]), "running", "gold")
    assert payload["target"]["nfs_host"] is None
    assert payload["target"]["nfs_host_effective"] == payload["target"]["ssh_host"] == "zfs-dr-01.example.internal"
    assert (payload["dr_vcenter"]["id"], payload["source_vcenter"]["id"]) == (DR, PRIMARY)
    assert payload["recovery_point"]["id"] == p
    assert payload["replica_dataset"] == "tank/replicas/vmstore"
    assert [v["vm"]["name"] for v in payload["vms"]] == ["db-01", "app-01", "web-01"]
    assert [m["source_network"] for m in payload["network_mappings"]] == ["a", "b"]
    assert (payload["steps"], payload["test_run"], payload["test_steps"]) == ([], None, [])
    assert (payload["acts_on_run"], payload["acts_on_steps"]) == (None, [])


def test_nfs_host_is_checked_and_used_when_set(world: Database) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="replication_targets_nfs_host_length"):
        world.sql("update replication_targets set nfs_host = 'a b' where id = %s", (TARGET,))
    world.sql("update replication_targets set nfs_host = '10.0.0.7' where id = %s", (TARGET,))
    point(world)
    run(world)
    assert claim(world)["payload"]["target"]["nfs_host_effective"] == "10.0.0.7"


def steps(db: Database, run_id: Any) -> list[dict[str, Any]]:
    return db.sql("select * from recovery_run_steps where run_id = %s order by seq", (run_id,))


def test_progress_writes_the_plan_at_once_then_each_step(world: Database) -> None:
    point(world)
    test = run(world)
    pvm = protect(world, add_vm(world))
    op = claim(world)["id"]
    plan = [{"seq": 1, "name": "validate", "protected_vm_id": None},
            {"seq": 2, "name": "create_vm", "protected_vm_id": str(pvm)},
            {"seq": 3, "name": "activate", "protected_vm_id": None}]
    assert progress(world, op, {"plan": plan, "steps": [{"seq": 1, "status": "running"}]}) == "ok"
    got = steps(world, test["id"])
    assert [(s["seq"], s["name"], s["protected_vm_id"], s["status"]) for s in got] == [
        (1, "validate", None, "running"), (2, "create_vm", pvm, "pending"), (3, "activate", None, "pending")]
    assert got[0]["started_at"] is not None and got[0]["finished_at"] is None
    assert (got[0]["detail"]["attempt"], got[0]["detail"]["worker"]) == (1, WORKER)
    # the same report again (a call retried after its answer was lost) moves no time
    progress(world, op, {"steps": [{"seq": 1, "status": "running"}]})
    assert steps(world, test["id"])[0]["started_at"] == got[0]["started_at"]
    assert "previous_attempts" not in steps(world, test["id"])[0]["detail"]

    # the plan again (a resumed attempt) changes nothing; other progress is the operation's own
    progress(world, op, {"plan": [{"seq": 1, "name": "renamed"}], "bytes": 5})
    assert steps(world, test["id"])[0]["name"] == "validate"

    progress(world, op, {"steps": [{"seq": 1, "status": "done", "detail": {"a": 1}},
                                   {"seq": 2, "status": "running", "detail": {"moref": "vm-9"}}]})
    progress(world, op, {"steps": [{"seq": 2, "status": "failed", "error": "boom", "detail": {"b": 2}}]})
    first = steps(world, test["id"])[1]
    assert (first["status"], first["error"], first["detail"]) == ("failed", "boom", {"moref": "vm-9", "b": 2, "attempt": 1, "worker": WORKER})
    assert first["finished_at"] >= first["started_at"]

    # running again: a new start, the previous attempt kept, the error gone once done
    progress(world, op, {"steps": [{"seq": 2, "status": "running"}]})
    again = steps(world, test["id"])[1]
    assert again["started_at"] >= first["started_at"] and again["finished_at"] is None
    [previous] = again["detail"]["previous_attempts"]
    assert (previous["status"], previous["error"]) == ("failed", "boom")
    assert again["detail"]["moref"] == "vm-9"
    progress(world, op, {"steps": [{"seq": 2, "status": "done"}]})
    done = steps(world, test["id"])[1]
    assert (done["status"], done["error"]) == ("done", None)
    progress(world, op, {"steps": [{"seq": 2, "status": "done"}]})
    assert steps(world, test["id"])[1]["finished_at"] == done["finished_at"]

    # a worker that takes over (the first was killed: its lease ran out) starts the step anew
    world.sql("update zerfaux.operations set lease_expires_at = now() - interval '1 second' where id = %s", (op,))
    taken = [r for r in world.sql("select * from zerfaux.claim('w-other', 10, 60)") if r["id"] == op]
    assert taken and taken[0]["attempts"] == 2
    world.sql("select zerfaux.progress(%s, 'w-other', %s::jsonb)", (op, json.dumps({"steps": [{"seq": 2, "status": "running"}]})))
    resumed = steps(world, test["id"])[1]
    assert resumed["started_at"] > done["started_at"] and len(resumed["detail"]["previous_attempts"]) == 2
    assert resumed["detail"]["previous_attempts"][-1]["status"] == "done"
    assert (resumed["detail"]["attempt"], resumed["detail"]["worker"]) == (2, "w-other")
    op_worker = "w-other"

    with pytest.raises(psycopg.errors.InvalidParameterValue, match="step 7 is not in its plan"):
        world.sql("select zerfaux.progress(%s, %s, %s::jsonb)",
                  (op, op_worker, json.dumps({"steps": [{"seq": 7, "status": "done"}]})))


def test_complete_makes_a_test_active_with_its_rto_from_the_step_times(world: Database) -> None:
    taken = world.value("select created_at from recovery_points where id = %s", (point(world, 60),))
    test = run(world)
    op = claim(world)["id"]
    progress(world, op, {"plan": [{"seq": i, "name": n} for i, n in enumerate(
        ["validate", "power_on", "power_on", "wait_ready", "wait_ready", "activate"], start=1)]})
    t0 = taken + timedelta(hours=1)
    world.sql("update recovery_runs set started_at = %s where id = %s", (t0, test["id"]))
    for seq, seconds in ((2, 30), (3, 31), (4, 95), (5, 80), (6, 500)):
        world.sql("update recovery_run_steps set status = 'done', finished_at = %s where run_id = %s and seq = %s",
                  (t0 + timedelta(seconds=seconds), test["id"], seq))
    complete(world, op, {"status": "active", "report": {"vms": 2}})
    row = status(world, test["id"])
    assert (row["status"], row["completed_at"], float(row["rto_seconds"]), row["report"]) == (
        "active", None, 95.0, {"vms": 2})
    assert float(row["data_loss_seconds"]) == 3600.0  # the point was an hour old at the start


def test_without_wait_ready_the_rto_is_the_last_power_on(world: Database) -> None:
    point(world)
    test = run(world)
    op = claim(world)["id"]
    progress(world, op, {"plan": [{"seq": 1, "name": "power_on"}, {"seq": 2, "name": "activate"}]})
    world.sql("update recovery_run_steps set finished_at = (select started_at from recovery_runs where id = %s)"
              " + interval '42 seconds' where run_id = %s and seq = 1", (test["id"], test["id"]))
    complete(world, op, {"status": "active"})
    assert float(status(world, test["id"])["rto_seconds"]) == 42.0


def test_a_cleanup_completes_both_runs_and_marks_the_point_tested(world: Database) -> None:
    test, _ = active_test(world)
    cleanup = run(world, "cleanup", test_run_id=test["id"])
    [op] = [o for o in operations(world) if o["subject_id"] == cleanup["id"]]
    assert op["status"] == "queued"
    claimed = claim(world)
    payload = claimed["payload"]
    assert payload["test_run"]["id"] == str(test["id"])
    assert [s["name"] for s in payload["test_steps"]] == ["validate", "activate"]
    complete(world, claimed["id"], {"status": "completed", "report": {"removed": ["vm"]}})
    done, tested = status(world, cleanup["id"]), status(world, test["id"])
    assert (done["status"], tested["status"]) == ("completed", "completed")
    assert done["completed_at"] is not None and tested["completed_at"] is not None
    assert world.value("select tested_at from recovery_points where id = %s", (test["recovery_point_id"],)) is not None
    point(world)
    assert run(world)["status"] == "pending"  # the group takes a new test


def test_a_cleanup_of_a_failed_test_leaves_the_point_untested(world: Database) -> None:
    point(world)
    test = run(world)
    world.sql("select zerfaux.fail(%s, %s, 'no room on the DR pool', true, 1)", (claim(world)["id"], WORKER))
    assert (status(world, test["id"])["status"], status(world, test["id"])["error"]) == ("failed", "no room on the DR pool")
    run(world, "cleanup", test_run_id=test["id"])
    complete(world, claim(world)["id"], {"status": "completed"})
    assert status(world, test["id"])["status"] == "failed"
    assert world.value("select tested_at from recovery_points where id = %s", (test["recovery_point_id"],)) is None


def test_a_retried_failure_keeps_the_run_running(world: Database) -> None:
    point(world)
    test = run(world)
    op = claim(world)["id"]
    assert world.value("select zerfaux.fail(%s, %s, 'vCenter timed out', false, 1)", (op, WORKER)) == "retrying"
    row = status(world, test["id"])
    assert row["status"] == "running" and "vCenter timed out" in row["error"] and row["completed_at"] is None


# --- cancel ---------------------------------------------------------------------------------------

def test_cancelling_a_pending_run_ends_it_at_once(world: Database) -> None:
    roles(world)
    point(world)
    test = run(world)
    as_person(world, OPERATOR, "update recovery_runs set cancel_requested = true where id = %s", (test["id"],))
    row = status(world, test["id"])
    assert (row["status"], row["error"]) == ("cancelled", "cancelled before it started")
    assert [o["status"] for o in operations(world)] == ["cancelled"]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="cannot be taken back"):
        as_person(world, OPERATOR, "update recovery_runs set cancel_requested = false where id = %s", (test["id"],))


def test_cancelling_a_running_run_tells_its_worker_and_ends_it_cancelled(world: Database) -> None:
    point(world)
    test = run(world)
    op = claim(world)["id"]
    with psycopg.connect(world.url, autocommit=True) as listener:
        listener.execute("listen zerfaux_cancel")
        world.sql("update recovery_runs set cancel_requested = true where id = %s", (test["id"],))
        notes = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert notes == [str(test["id"])]
    assert status(world, test["id"])["status"] == "running"  # until its cleanup steps ran
    assert progress(world, op, {"steps": []}) == "cancel"
    assert world.value("select zerfaux.finish_cancelled(%s, %s, 'cancelled; test objects removed')", (op, WORKER))
    row = status(world, test["id"])
    assert (row["status"], row["error"]) == ("cancelled", "cancelled; test objects removed")
    assert row["completed_at"] is not None


def test_cancelling_an_active_test_says_insert_a_cleanup_run(world: Database) -> None:
    test, _ = active_test(world)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match=f"recovery_runs_cancel: recovery run {test['id']} \\(kind test\\) is active") as caught:
        world.sql("update recovery_runs set cancel_requested = true where id = %s", (test["id"],))
    assert "insert a cleanup run" in (caught.value.diag.message_hint or "")
    assert status(world, test["id"])["cancel_requested"] is False


def test_an_operator_cancels_only_in_its_group_and_a_viewer_not_at_all(world: Database) -> None:
    roles(world)
    silver = other_group(world)
    point(world, group=silver)
    theirs = run(world, group=silver)
    assert as_person(world, OPERATOR, "update recovery_runs set cancel_requested = true where id = %s returning id",
                     (theirs["id"],)) == []
    point(world)
    mine = run(world)
    assert as_person(world, VIEWER, "update recovery_runs set cancel_requested = true where id = %s returning id",
                     (mine["id"],)) == []
    assert status(world, theirs["id"])["status"] == status(world, mine["id"])["status"] == "pending"


# --- the report ------------------------------------------------------------------------------------

def test_run_report_gathers_steps_vm_times_rto_and_warnings(world: Database) -> None:
    p = point(world, 30)
    fast = protect(world, add_vm(world, name="db-01", moref="vm-db"))
    slow = protect(world, add_vm(world, name="app-01", moref="vm-app"))
    world.sql("update protected_vms set boot_priority = 1 where id = %s", (fast,))
    test = run(world)
    op = claim(world)["id"]
    plan = [("validate", None), ("power_on", fast), ("wait_ready", fast), ("power_on", slow), ("wait_ready", slow),
            ("activate", None)]
    progress(world, op, {"plan": [{"seq": i, "name": n, "protected_vm_id": str(v) if v else None}
                                  for i, (n, v) in enumerate(plan, start=1)]})
    progress(world, op, {"steps": [{"seq": 1, "status": "running"}]})
    progress(world, op, {"steps": [
        {"seq": 1, "status": "done"},
        {"seq": 2, "status": "done", "detail": {"boot_time": "2026-12-01T12:00:10Z"}},
        {"seq": 3, "status": "done", "detail": {"how": "tools", "ready_at": "2026-12-01T12:00:40Z",
                                                "boot_time": "2026-12-01T12:00:10Z", "waited_seconds": 30}},
        {"seq": 4, "status": "done"},
        {"seq": 5, "status": "warning", "error": "VMware Tools not running after 300 s",
         "detail": {"how": "timeout", "waited_seconds": 300}},
        {"seq": 6, "status": "done"}]})
    complete(world, op, {"status": "active"})
    report = world.value("select zerfaux.run_report(%s)", (test["id"],))
    assert (report["run"]["id"], report["run"]["status"], report["group"]["name"]) == (str(test["id"]), "active", "gold")
    assert report["recovery_point"]["id"] == p
    assert [s["name"] for s in report["steps"]] == [n for n, _ in plan]
    assert report["steps"][1]["vm_name"] == "db-01" and report["steps"][0]["duration_seconds"] is not None
    assert [(v["vm_name"], v["boot_priority"], v["ready_status"]) for v in report["vms"]] == [
        ("db-01", 1, "done"), ("app-01", 3, "warning")]
    assert (report["vms"][0]["boot_time"], report["vms"][0]["ready_at"]) == ("2026-12-01T12:00:10Z", "2026-12-01T12:00:40Z")
    assert report["vms"][1]["ready_at"] is None and report["vms"][1]["ready_how"] == "timeout"
    assert report["rto_seconds"] == float(status(world, test["id"])["rto_seconds"])
    assert report["data_loss_seconds"] is not None
    assert report["warnings"] == [{"seq": 5, "name": "wait_ready", "vm_name": "app-01", "status": "warning",
                                   "error": "VMware Tools not running after 300 s"}]
    assert report["cleanup_runs"] == [] and report["test_run"] is None
    assert world.value("select zerfaux.run_report(%s)", (str(uuid.uuid4()),)) is None


async def test_each_store_reads_the_same_report(world: Database, store_env: dict[str, str]) -> None:
    from listener.service import make_store
    from tests.support.engine import engine_settings

    test, _ = active_test(world)
    store = make_store(engine_settings(world.url, **store_env))
    await store.open()
    try:
        report = await store.run_report(test["id"])
        missing = await store.run_report(uuid.uuid4())
    finally:
        await store.close()
    assert report is not None and missing is None
    assert (report["run"]["id"], report["group"]["name"], [s["name"] for s in report["steps"]]) == (
        str(test["id"]), "gold", ["validate", "activate"])


# --- guards around the runs (20261201160400) -------------------------------------------------------

def test_a_group_with_an_active_test_cannot_be_deleted_until_it_is_cleaned_up(world: Database) -> None:
    test, _ = active_test(world)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match="protection_groups_delete_during_recovery") as refusal:
        world.sql("delete from protection_groups where id = %s", (GROUP,))
    assert "cleanup" in (refusal.value.diag.message_hint or "")
    assert world.value("select count(*) from recovery_runs where id = %s", (test["id"],)) == 1
    world.sql("update recovery_runs set status = 'completed' where id = %s", (test["id"],))
    world.sql("delete from protection_groups where id = %s", (GROUP,))
    assert world.value("select count(*) from recovery_runs") == 0


def test_nfs_clients_takes_names_addresses_and_networks_only(world: Database) -> None:
    world.sql("update replication_targets set nfs_clients = %s where id = %s",
              (["esx-01.dr.example", "10.1.2.0/24", "fd00::7"], TARGET))
    for bad in (["a b"], ["x;reboot"], [], ["ok", "$(id)"]):
        with pytest.raises(psycopg.errors.CheckViolation, match="replication_targets_nfs_clients_names"):
            world.sql("update replication_targets set nfs_clients = %s where id = %s", (bad, TARGET))


def test_a_cancel_between_two_attempts_reaches_the_next_attempt(world: Database) -> None:
    point(world)
    test = run(world)
    op = claim(world)["id"]
    assert world.value("select zerfaux.fail(%s, %s, 'vCenter timed out', false, 0)", (op, WORKER)) == "retrying"
    assert world.value("select status from zerfaux.operations where id = %s", (op,)) == "queued"
    world.sql("update recovery_runs set cancel_requested = true where id = %s", (test["id"],))
    assert status(world, test["id"])["status"] == "running"  # its next attempt removes what it made
    again = claim(world)
    assert again["id"] == op and again["cancel_requested"] is True
