"""Failover runs in the database (issue 14): planned_migration, failover, commit, rollback and
reprotect. Every rule at insert, refused with its name, with nothing queued and the group's state
as it was; every ending's transitions, through the engine's own functions (claim, progress,
complete, fail, finish_cancelled) as a listener calls them; the commit policy and the schedule
(a fake now); replication_jobs_group_state; who may write what. Real Postgres, the seed's group
``gold`` (fixtures and helpers of test_recovery_runs_sql.py).
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.migrate import migrate, seed, sql_root
from tests.integration.conftest import GROUP, add_vm, protect
from tests.integration.test_recovery_runs_sql import (
    ADMIN, OPERATOR, VIEWER, WORKER, as_person, claim, complete, operations, other_group, point, progress, roles,
    run, status)
from tests.support.pg import Database

KINDS = ["planned_migration", "failover", "commit", "rollback", "reprotect"]
STATES = ["protected", "recovering", "awaiting_commit", "failed_over"]


# --- helpers -----------------------------------------------------------------------------------

def group(db: Database, gid: str = GROUP) -> dict[str, Any]:
    return db.one("select state, direction, state_changed_at, commit_policy from protection_groups where id = %s",
                  (gid,))


def set_state(db: Database, state: str, gid: str = GROUP) -> None:
    """As the engine leaves a group (the owner writes it; no person can)."""
    db.sql("update protection_groups set state = %s, state_changed_at = now() where id = %s", (state, gid))


def refused(db: Database, error: type[Exception], match: str, insert: Any, gid: str = GROUP) -> psycopg.Error:
    """The insert is refused naming its rule; no run, no operation, the group's state untouched."""
    before = (len(operations(db)), db.value("select count(*) from recovery_runs"), group(db, gid))
    with pytest.raises(error, match=match) as caught:
        insert()
    assert (len(operations(db)), db.value("select count(*) from recovery_runs"), group(db, gid)) == before
    return caught.value


def admin_insert(db: Database, kind: str, gid: str = GROUP, **cols: Any) -> list[dict[str, Any]]:
    names = ["protection_group_id", "kind", *cols]
    values = [gid, kind, *(json.dumps(v) if isinstance(v, dict) else v for v in cols.values())]
    return as_person(db, ADMIN, f"insert into recovery_runs ({', '.join(names)})"
                                f" values ({', '.join(['%s'] * len(names))}) returning *", tuple(values))


def plan(db: Database, op: Any, names: list[str]) -> None:
    progress(db, op, {"plan": [{"seq": i, "name": n} for i, n in enumerate(names, start=1)]})


def set_steps(db: Database, op: Any, statuses: dict[int, str]) -> None:
    progress(db, op, {"steps": [{"seq": s, "status": st} for s, st in statuses.items()]})


FAILOVER_PLAN = ["validate", "fence_source", "pre_failover_snapshot", "load_key", "make_writable", "export",
                 "present_datastore", "attach_disks", "set_networks", "power_on", "wait_ready", "finish"]
MIGRATION_PLAN = ["validate", "replicate", "shutdown_source", "replicate_final", "pre_failover_snapshot", "load_key",
                  "make_writable", "export", "present_datastore", "attach_disks", "set_networks", "power_on",
                  "wait_ready", "finish"]


def awaiting_commit(db: Database, **cols: Any) -> dict[str, Any]:
    """A failover brought up through the engine: the run and the group await commit."""
    if not db.value("select count(*) from recovery_points where protection_group_id = %s and on_target", (GROUP,)):
        point(db)
    fo = run(db, "failover", **cols)
    op = claim(db)["id"]
    plan(db, op, FAILOVER_PLAN)
    complete(db, op, {"status": "awaiting_commit", "report": {"fenced": True}})
    assert status(db, fo["id"])["status"] == "awaiting_commit"
    return status(db, fo["id"])


def migrated(db: Database, guid: str | None = None) -> dict[str, Any]:
    """A planned migration completed through the engine: the group is failed over."""
    pm = run(db, "planned_migration")
    op = claim(db)["id"]
    plan(db, op, MIGRATION_PLAN)
    complete(db, op, {"report": {"final_point": {"snapshot_name": f"zerfaux_final_{uuid.uuid4().hex[:6]}",
                                                 "guid": guid or str(uuid.uuid4().int),
                                                 "created_at": "2026-12-01T12:00:00Z"}}})
    assert group(db)["state"] == "failed_over"
    return status(db, pm["id"])


def ended(db: Database, kind: str, result: dict[str, Any] | None = None, **cols: Any) -> dict[str, Any]:
    row = run(db, kind, **cols)
    op = claim(db)
    complete(db, op["id"], result or {"report": {}})
    return status(db, row["id"])


# --- the migration and the columns ---------------------------------------------------------------

def test_groups_in_state_normal_become_protected(empty_db: Database, tmp_path: Path) -> None:
    for path in Path(str(sql_root() / "migrations")).glob("*.sql"):
        if path.name < "20261201180000":
            shutil.copy(path, tmp_path / path.name)
    migrate(empty_db.url, tmp_path)
    seed(empty_db.url)
    assert empty_db.value("select state from protection_groups where id = %s", (GROUP,)) == "normal"
    migrate(empty_db.url)
    assert group(empty_db)["state"] == "protected"
    assert empty_db.value("select count(*) from protection_groups where state <> 'protected'") == 0
    new = empty_db.one("insert into protection_groups (name) values ('fresh') returning state, direction,"
                       " commit_policy, commit_timeout_minutes")
    assert new == {"state": "protected", "direction": "forward", "commit_policy": "manual",
                   "commit_timeout_minutes": None}


@pytest.mark.parametrize(("column", "value", "constraint"), [
    ("state", "normal", "protection_groups_state_check"),
    ("direction", "sideways", "protection_groups_direction_check"),
    ("commit_policy", "auto", "protection_groups_commit_policy_check"),
    ("commit_timeout_minutes", 0, "protection_groups_commit_timeout_minutes_between_1_and_10080"),
    ("commit_timeout_minutes", 10081, "protection_groups_commit_timeout_minutes_between_1_and_10080")])
def test_the_group_columns_take_only_their_values(world: Database, column: str, value: Any, constraint: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        world.sql(f"update protection_groups set {column} = %s where id = %s", (value, GROUP))


def test_shutdown_timeout_defaults_to_300_and_is_bounded(world: Database) -> None:
    pvm = protect(world, add_vm(world))
    assert world.value("select shutdown_timeout_seconds from protected_vms where id = %s", (pvm,)) == 300
    for bad in (-1, 86401):
        with pytest.raises(psycopg.errors.CheckViolation, match="protected_vms_shutdown_timeout_seconds_between_0_and_86400"):
            world.sql("update protected_vms set shutdown_timeout_seconds = %s where id = %s", (bad, pvm))


# --- accepted at insert ----------------------------------------------------------------------------

def test_a_failover_turns_the_group_recovering_and_is_queued(world: Database) -> None:
    point(world, 30)
    newest = point(world, 10)
    point(world, 1, on_target=False)
    before = world.value("select now()")
    fo = run(world, "failover", options=json.dumps({"skip_source": True, "force_power_off": False,
                                                     "fence_timeout_seconds": 30}))
    assert (fo["status"], str(fo["recovery_point_id"]), fo["group_state_before"], fo["acts_on_run_id"]) == (
        "pending", newest, "protected", None)
    g = group(world)
    assert g["state"] == "recovering" and g["state_changed_at"] >= before
    [op] = operations(world)
    assert (op["subject_id"], op["status"]) == (fo["id"], "queued")


def test_a_failover_to_a_named_older_point_keeps_it(world: Database) -> None:
    older = point(world, 60)
    point(world, 5)
    assert str(run(world, "failover", recovery_point_id=older)["recovery_point_id"]) == older


def test_a_planned_migration_takes_no_point_and_an_admin_may_ask_for_it(world: Database) -> None:
    roles(world)
    [pm] = admin_insert(world, "planned_migration", options={"force_power_off": False})
    assert (pm["recovery_point_id"], str(pm["requested_by"]), pm["group_state_before"]) == (None, ADMIN, "protected")
    assert group(world)["state"] == "recovering"


def test_in_reverse_a_failover_takes_the_newest_point_on_the_source(world: Database) -> None:
    world.sql("update protection_groups set direction = 'reverse' where id = %s", (GROUP,))
    point(world, 1)  # newest, but on the target (the sender in reverse) only
    world.sql("update recovery_points set on_source = false")
    on_source = point(world, 10)
    world.sql("update recovery_points set on_target = false where id = %s", (on_source,))
    assert str(run(world, "failover")["recovery_point_id"]) == on_source


# --- refusals: each names its rule; nothing queued; the group's state as it was -----------------------

@pytest.mark.parametrize("kind", ["planned_migration", "failover"])
@pytest.mark.parametrize("state", ["recovering", "awaiting_commit", "failed_over"])
def test_a_migration_or_failover_starts_only_from_protected(world: Database, kind: str, state: str) -> None:
    point(world)
    set_state(world, state)
    err = refused(world, psycopg.errors.ObjectNotInPrerequisiteState,
                  f"recovery_runs_state: protection group gold .* is {state}: a {kind} starts only from state protected",
                  lambda: run(world, kind))
    assert err.diag.message_hint and {"recovering": "rollback", "awaiting_commit": "commit",
                                      "failed_over": "reprotect"}[state] in err.diag.message_hint


@pytest.mark.parametrize(("kind", "state", "hint"), [
    ("commit", "protected", "insert a failover run first"),
    ("commit", "recovering", "rollback"),
    ("commit", "failed_over", "reprotect"),
    ("rollback", "protected", "nothing to roll back"),
    ("rollback", "failed_over", "reprotect"),
    ("rollback", "recovering", "has not failed"),  # recovering with no failed run to undo
    ("reprotect", "protected", "protected already"),
    ("reprotect", "awaiting_commit", "commit the failover first"),
    ("reprotect", "recovering", "rollback")])
def test_commit_rollback_and_reprotect_are_refused_from_the_wrong_state(world: Database, kind: str, state: str,
                                                                         hint: str) -> None:
    point(world)
    set_state(world, state)
    err = refused(world, psycopg.errors.ObjectNotInPrerequisiteState,
                  f"recovery_runs_state: protection group gold .* is {state}: a {kind}", lambda: run(world, kind))
    assert hint in (err.diag.message_hint or "")


def test_a_rollback_while_its_failover_still_runs_is_one_run_per_group(world: Database) -> None:
    point(world)
    fo = run(world, "failover")
    claim(world)
    err = refused(world, psycopg.errors.UniqueViolation,
                  f"recovery_runs_one_run_per_group: protection group gold .* already has a running failover run "
                  f"\\({fo['id']}\\)", lambda: run(world, "rollback"))
    assert "cannot be cancelled" in (err.diag.message_hint or "")


@pytest.mark.parametrize("kind", ["test", *KINDS])
def test_one_run_per_group_while_a_failover_is_pending(world: Database, kind: str) -> None:
    point(world)
    fo = run(world, "failover")
    refused(world, psycopg.errors.UniqueViolation,
            f"recovery_runs_one_run_per_group: protection group gold .* already has a pending failover run \\({fo['id']}\\)",
            lambda: run(world, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_one_run_per_group_while_a_test_is_active_or_running(world: Database, kind: str) -> None:
    point(world)
    test = run(world)
    for state in ("running", "active"):
        world.sql("update recovery_runs set status = %s where id = %s", (state, test["id"]))
        err = refused(world, psycopg.errors.UniqueViolation,
                      f"recovery_runs_one_run_per_group: .* already has a {state} test run", lambda: run(world, kind))
    assert "cleanup" in (err.diag.message_hint or "")


def test_a_commit_while_another_commit_is_pending_is_refused(world: Database) -> None:
    awaiting_commit(world)
    first = run(world, "commit")
    refused(world, psycopg.errors.UniqueViolation,
            f"recovery_runs_one_run_per_group: .* already has a pending commit run \\({first['id']}\\)",
            lambda: run(world, "rollback"))


@pytest.mark.parametrize("state", ["recovering", "awaiting_commit", "failed_over"])
def test_a_test_is_refused_unless_the_group_is_protected(world: Database, state: str) -> None:
    point(world)
    set_state(world, state)
    refused(world, psycopg.errors.ObjectNotInPrerequisiteState,
            f"recovery_runs_one_run_per_group: protection group gold .* is {state}, not protected",
            lambda: run(world))


def test_a_cleanup_is_always_allowed(world: Database) -> None:
    point(world)
    test = run(world)
    world.sql("update recovery_runs set status = 'active' where id = %s", (test["id"],))
    set_state(world, "failed_over")  # however the group came there
    assert run(world, "cleanup", test_run_id=test["id"])["status"] == "pending"


def test_the_index_holds_without_the_trigger(world: Database) -> None:
    point(world)
    run(world, "failover")
    with psycopg.connect(world.url) as conn:
        conn.execute("alter table recovery_runs disable trigger recovery_runs_rules")
        for kind in ("failover", "test", "commit"):
            with pytest.raises(psycopg.errors.UniqueViolation, match="recovery_runs_one_run_per_group"):
                conn.execute("insert into recovery_runs (protection_group_id, kind, status) values (%s, %s, 'pending')",
                             (GROUP, kind))
            conn.rollback()
            conn.execute("alter table recovery_runs disable trigger recovery_runs_rules")


def test_a_failover_with_no_point_on_the_target_says_replicate_first(world: Database) -> None:
    point(world, on_target=False)
    refused(world, psycopg.errors.CheckViolation,
            "recovery_runs_point_on_target: protection group gold .* no recovery point on its replication target: "
            "replicate first", lambda: run(world, "failover"))


def test_a_failover_to_a_point_of_another_group_or_gone_is_refused(world: Database) -> None:
    point(world)
    theirs = point(world, group=other_group(world))
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_point_on_target: .* belongs to another protection group",
            lambda: run(world, "failover", recovery_point_id=theirs))
    gone = point(world, on_target=False)
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_point_on_target: .* no longer on the replication target",
            lambda: run(world, "failover", recovery_point_id=gone))


def test_a_planned_migration_or_reprotect_naming_a_point_is_refused(world: Database) -> None:
    p = point(world)
    refused(world, psycopg.errors.CheckViolation,
            "recovery_runs_point_on_target: a planned_migration run takes no recovery_point_id: its point is the final",
            lambda: run(world, "planned_migration", recovery_point_id=p))
    set_state(world, "failed_over")
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_point_on_target: a reprotect run takes no recovery_point_id",
            lambda: run(world, "reprotect", recovery_point_id=p))


@pytest.mark.parametrize("kind", ["planned_migration", "failover"])
def test_a_migration_or_failover_with_an_unmapped_network_is_refused(world: Database, kind: str) -> None:
    point(world)
    vm = add_vm(world, name="app-01", moref=f"vm-{uuid.uuid4().hex[:6]}")
    world.sql("update vcenter_vms set networks = '[\"VM Network\", \"Backend\"]' where id = %s", (vm,))
    protect(world, vm)
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'VM Network', 'DR Network')", (GROUP,))
    refused(world, psycopg.errors.CheckViolation,
            r"recovery_runs_networks_mapped: protection group gold .* no network mapping: Backend \(VMs app-01\)",
            lambda: run(world, kind))
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'Backend', 'DR Backend')", (GROUP,))
    assert run(world, kind)["status"] == "pending"


@pytest.mark.parametrize(("kind", "state", "options", "match"), [
    ("failover", "protected", {"skip_sorce": True}, "a failover run knows no option skip_sorce"),
    ("failover", "protected", {"auto": True}, "a failover run knows no option auto"),
    ("failover", "protected", {"skip_source": "yes"}, "option skip_source must be true or false"),
    ("failover", "protected", {"force_power_off": 1}, "option force_power_off must be true or false"),
    ("failover", "protected", {"fence_timeout_seconds": "60"}, "option fence_timeout_seconds must be a number"),
    ("failover", "protected", {"fence_timeout_seconds": -1}, "option fence_timeout_seconds must be a number"),
    ("failover", "protected", {"fence_timeout_seconds": 90000}, "option fence_timeout_seconds must be a number"),
    ("planned_migration", "protected", {"skip_source": True}, "a planned_migration run knows no option skip_source"),
    ("reprotect", "failed_over", {"discard_source_changes": "true"}, "option discard_source_changes must be true or false"),
    ("reprotect", "failed_over", {"force_power_off": True}, "a reprotect run knows no option force_power_off"),
    ("commit", "awaiting_commit", {"discard_source_changes": True}, "a commit run knows no option discard_source_changes"),
    ("rollback", "awaiting_commit", {"auto": "yes"}, "option auto must be true or false")])
def test_unknown_options_and_wrong_types_are_refused_naming_the_key(world: Database, kind: str, state: str,
                                                                    options: dict[str, Any], match: str) -> None:
    point(world)
    set_state(world, state)
    refused(world, psycopg.errors.CheckViolation, f"recovery_runs_options: {match}",
            lambda: run(world, kind, options=json.dumps(options)))


def test_a_failover_takes_no_test_run_id(world: Database) -> None:
    point(world)
    test = run(world)
    world.sql("update recovery_runs set status = 'failed' where id = %s", (test["id"],))
    refused(world, psycopg.errors.CheckViolation, "recovery_runs_test_run_only_for_cleanup: a failover run takes no",
            lambda: run(world, "failover", test_run_id=test["id"]))


@pytest.mark.parametrize("kind", KINDS)
def test_a_viewer_an_operator_and_a_stranger_may_not_ask_for_these_kinds(world: Database, kind: str) -> None:
    roles(world)
    point(world)
    set_state(world, {"commit": "awaiting_commit", "rollback": "awaiting_commit", "reprotect": "failed_over"}
              .get(kind, "protected"))
    insert = "insert into recovery_runs (protection_group_id, kind) values (%s, %s)"
    for user in (VIEWER, OPERATOR, str(uuid.uuid4())):
        refused(world, psycopg.errors.InsufficientPrivilege, f"recovery_runs_roles: a {kind} run .* needs the admin role",
                lambda: as_person(world, user, insert, (GROUP, kind)))


def test_nobody_but_the_engine_writes_where_a_group_stands(world: Database) -> None:
    roles(world)
    global_admin = str(uuid.uuid4())
    world.sql("insert into zerfaux.operators (user_id, role) values (%s, 'admin')", (global_admin,))
    for user in (OPERATOR, ADMIN, global_admin):
        for column, value in (("state", "failed_over"), ("direction", "reverse"), ("state_changed_at", "now()")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                as_person(world, user, f"update protection_groups set {column} = {value!r} where id = %s"
                          .replace("'now()'", "now()"), (GROUP,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_person(world, user, "update recovery_runs set acts_on_run_id = null, group_state_before = 'protected'")
    assert group(world)["state"] == "protected" and group(world)["direction"] == "forward"
    # what a person does set: an operator a VM's shutdown timeout; the policy is configuration
    pvm = protect(world, add_vm(world))
    as_person(world, OPERATOR, "update protected_vms set shutdown_timeout_seconds = 60 where id = %s", (pvm,))
    assert world.value("select shutdown_timeout_seconds from protected_vms where id = %s", (pvm,)) == 60
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only a global admin changes protection group gold"):
        as_person(world, OPERATOR, "update protection_groups set commit_policy = 'commit' where id = %s", (GROUP,))
    as_person(world, global_admin, "update protection_groups set commit_policy = 'commit', commit_timeout_minutes = 15"
                                   " where id = %s", (GROUP,))
    assert (group(world)["commit_policy"], group(world)["state"]) == ("commit", "protected")
    world.sql("update protection_groups set commit_policy = 'manual', commit_timeout_minutes = null where id = %s", (GROUP,))
    assert as_person(world, VIEWER, "select state, direction, commit_policy, commit_timeout_minutes,"
                                    " state_changed_at from protection_groups") == [
        {"state": "protected", "direction": "forward", "commit_policy": "manual", "commit_timeout_minutes": None,
         "state_changed_at": None}]


# --- replication_jobs_group_state ------------------------------------------------------------------

@pytest.mark.parametrize("state", ["recovering", "awaiting_commit", "failed_over"])
def test_no_replication_job_while_the_group_is_not_protected(world: Database, state: str) -> None:
    roles(world)
    set_state(world, state)
    jobs_before = world.value("select count(*) from replication_jobs")
    ops_before = world.value("select count(*) from zerfaux.operations where kind = 'replication.run'")
    for attempt in (lambda: world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,)),
                    lambda: as_person(world, OPERATOR, "insert into replication_jobs (protection_group_id)"
                                                       " values (%s)", (GROUP,))):
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                           match=f"replication_jobs_group_state: protection group gold .* is {state}"):
            attempt()
    assert world.value("select count(*) from replication_jobs") == jobs_before
    assert world.value("select count(*) from zerfaux.operations where kind = 'replication.run'") == ops_before
    set_state(world, "protected")
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))


# --- the endings, through the engine ----------------------------------------------------------------

def test_a_planned_migration_completes_with_its_final_snapshot_as_a_point(world: Database) -> None:
    point(world)
    pm = run(world, "planned_migration")
    op = claim(world)["id"]
    assert status(world, pm["id"])["data_loss_seconds"] == 0
    plan(world, op, MIGRATION_PLAN)
    t0 = status(world, pm["id"])["started_at"]
    for name, seconds in (("power_on", 40), ("wait_ready", 75)):
        world.sql("update recovery_run_steps set status = 'done', finished_at = %s where run_id = %s and name = %s",
                  (t0 + timedelta(seconds=seconds), pm["id"], name))
    changed = group(world)["state_changed_at"]
    final = {"snapshot_name": "zerfaux_final_1", "guid": "123456789012345678901", "created_at": "2026-12-01T12:00:00Z"}
    complete(world, op, {"report": {"final_point": final, "vms": 1}})
    row = status(world, pm["id"])
    assert (row["status"], row["completed_at"] is not None, row["data_loss_seconds"], float(row["rto_seconds"])) == (
        "completed", True, 0, 75.0)
    p = world.one("select * from recovery_points where id = %s", (row["recovery_point_id"],))
    assert (p["snapshot_name"], p["guid"], p["on_source"], p["on_target"], p["removed_at"]) == (
        "zerfaux_final_1", final["guid"], True, True, None)
    assert p["created_at"].isoformat() == "2026-12-01T12:00:00+00:00"
    g = group(world)
    assert (g["state"], g["direction"]) == ("failed_over", "forward") and g["state_changed_at"] > changed


def test_a_final_snapshot_already_recorded_by_guid_is_the_same_point(world: Database) -> None:
    p = point(world)
    guid = world.value("select guid from recovery_points where id = %s", (p,))
    assert str(migrated(world, guid=guid)["recovery_point_id"]) == p
    assert world.value("select count(*) from recovery_points where protection_group_id = %s", (GROUP,)) == 1


def test_a_failover_awaits_commit_with_its_data_loss(world: Database) -> None:
    taken = world.value("select created_at from recovery_points where id = %s", (point(world, 20),))
    fo = run(world, "failover")
    op = claim(world)["id"]
    plan(world, op, FAILOVER_PLAN)
    complete(world, op, {"report": {"fenced": False}})
    row = status(world, fo["id"])
    assert (row["status"], row["completed_at"]) == ("awaiting_commit", None)
    assert abs(float(row["data_loss_seconds"]) - (row["started_at"] - taken).total_seconds()) < 0.01
    assert group(world)["state"] == "awaiting_commit"


def test_a_commit_makes_the_failover_final(world: Database) -> None:
    fo = awaiting_commit(world)
    commit = run(world, "commit")
    assert (commit["acts_on_run_id"], commit["recovery_point_id"], commit["group_state_before"]) == (
        fo["id"], fo["recovery_point_id"], "awaiting_commit")
    claimed = claim(world)
    payload = claimed["payload"]
    assert payload["acts_on_run"]["id"] == str(fo["id"])
    assert [s["name"] for s in payload["acts_on_steps"]] == FAILOVER_PLAN
    assert group(world)["state"] == "awaiting_commit"  # until it ends
    complete(world, claimed["id"], {"report": {"replaced": False}})
    assert status(world, commit["id"])["status"] == "completed"
    done = status(world, fo["id"])
    assert (done["status"], done["completed_at"] is not None, done["report"]["committed_by"]) == (
        "completed", True, str(commit["id"]))
    assert group(world)["state"] == "failed_over"


def test_a_rollback_of_a_failover_awaiting_commit_protects_the_group_again(world: Database) -> None:
    fo = awaiting_commit(world)
    rb = ended(world, "rollback", {"report": {"discarded_bytes": 4096}})
    assert (rb["status"], rb["acts_on_run_id"], rb["report"]) == ("completed", fo["id"], {"discarded_bytes": 4096})
    undone = status(world, fo["id"])
    assert (undone["status"], undone["report"]["rolled_back_by"], undone["report"]["fenced"]) == (
        "completed", str(rb["id"]), True)
    g = group(world)
    assert (g["state"], g["direction"]) == ("protected", "forward")
    world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))  # replication resumes


def test_a_failover_that_failed_before_site_b_gives_the_group_back(world: Database) -> None:
    point(world)
    fo = run(world, "failover")
    op = claim(world)["id"]
    plan(world, op, FAILOVER_PLAN)
    set_steps(world, op, {1: "done", 2: "warning", 3: "pending"})
    assert world.value("select zerfaux.fail(%s, %s, 'vCenter timed out', false, 0)", (op, WORKER)) == "retrying"
    assert group(world)["state"] == "recovering"  # a retry keeps it
    op = claim(world)["id"]
    world.sql("select zerfaux.fail(%s, %s, 'the DR vCenter refused the login', true, 1)", (op, WORKER))
    assert status(world, fo["id"])["status"] == "failed"
    assert group(world)["state"] == "protected"
    assert run(world, "failover")["status"] == "pending"  # and may be tried again


@pytest.mark.parametrize("kind", ["planned_migration", "failover"])
def test_a_run_that_failed_half_way_stays_recovering_and_a_rollback_undoes_it(world: Database, kind: str) -> None:
    point(world)
    first = run(world, kind)
    op = claim(world)["id"]
    names = MIGRATION_PLAN if kind == "planned_migration" else FAILOVER_PLAN
    plan(world, op, names)
    seq = names.index("make_writable") + 1
    set_steps(world, op, {i: "done" for i in range(1, seq)} | {seq: "failed"})
    world.sql("select zerfaux.fail(%s, %s, 'zfs set readonly=off failed', true, 1)", (op, WORKER))
    assert (status(world, first["id"])["status"], group(world)["state"]) == ("failed", "recovering")
    refused(world, psycopg.errors.ObjectNotInPrerequisiteState, "recovery_runs_state: .* is recovering",
            lambda: run(world, "failover"))
    refused(world, psycopg.errors.ObjectNotInPrerequisiteState, "recovery_runs_state: .* is recovering",
            lambda: run(world, "commit"))
    rb = run(world, "rollback")
    assert (rb["acts_on_run_id"], rb["group_state_before"]) == (first["id"], "recovering")
    assert group(world)["state"] == "recovering"
    op = claim(world)
    assert op["payload"]["acts_on_run"]["id"] == str(first["id"])
    complete(world, op["id"], {"report": {"discarded_bytes": 0}})
    failed = status(world, first["id"])
    assert (failed["status"], failed["report"]["rolled_back_by"]) == ("failed", str(rb["id"]))  # stays failed
    assert group(world)["state"] == "protected"


@pytest.mark.parametrize("kind", ["commit", "rollback"])
def test_a_failed_commit_or_rollback_leaves_the_group_awaiting_commit(world: Database, kind: str) -> None:
    fo = awaiting_commit(world)
    row = run(world, kind)
    world.sql("select zerfaux.fail(%s, %s, 'boom', true, 1)", (claim(world)["id"], WORKER))
    assert (status(world, row["id"])["status"], status(world, fo["id"])["status"], group(world)["state"]) == (
        "failed", "awaiting_commit", "awaiting_commit")
    assert run(world, kind)["status"] == "pending"  # asked for again


def test_a_failed_reprotect_leaves_the_group_failed_over(world: Database) -> None:
    migrated(world)
    rp = run(world, "reprotect")
    world.sql("select zerfaux.fail(%s, %s, 'no common snapshot', true, 1)", (claim(world)["id"], WORKER))
    assert status(world, rp["id"])["status"] == "failed"
    assert (group(world)["state"], group(world)["direction"]) == ("failed_over", "forward")


def test_reprotect_then_failback_then_reprotect_is_home_again(world: Database) -> None:
    pm = migrated(world)
    rp = run(world, "reprotect", options=json.dumps({"discard_source_changes": False}))
    assert (rp["acts_on_run_id"], rp["recovery_point_id"]) == (pm["id"], None)
    op = claim(world)
    assert op["payload"]["acts_on_run"]["id"] == str(pm["id"]) and op["payload"]["group"]["direction"] == "forward"
    complete(world, op["id"], {"report": {"kept": None}})
    assert (group(world)["state"], group(world)["direction"]) == ("protected", "reverse")
    back = migrated(world)  # the failback: a planned migration in reverse
    assert (back["group_state_before"], group(world)["direction"]) == ("protected", "reverse")
    again = ended(world, "reprotect")
    assert again["acts_on_run_id"] == back["id"]
    assert (group(world)["state"], group(world)["direction"]) == ("protected", "forward")


def test_a_reprotect_after_a_committed_failover_acts_on_the_failover(world: Database) -> None:
    fo = awaiting_commit(world)
    ended(world, "commit")
    assert ended(world, "reprotect")["acts_on_run_id"] == fo["id"]


# --- cancel ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["planned_migration", "failover"])
def test_cancelling_a_pending_migration_or_failover_gives_the_group_back(world: Database, kind: str) -> None:
    roles(world)
    point(world)
    row = run(world, kind)
    assert group(world)["state"] == "recovering"
    as_person(world, ADMIN, "update recovery_runs set cancel_requested = true where id = %s", (row["id"],))
    assert (status(world, row["id"])["status"], group(world)["state"]) == ("cancelled", "protected")
    assert [o["status"] for o in operations(world)] == ["cancelled"]


def test_an_operator_may_not_cancel_a_failover(world: Database) -> None:
    roles(world)
    point(world)
    row = run(world, "failover")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="recovery_runs_roles: cancelling a failover run"):
        as_person(world, OPERATOR, "update recovery_runs set cancel_requested = true where id = %s", (row["id"],))
    assert (status(world, row["id"])["status"], group(world)["state"]) == ("pending", "recovering")


@pytest.mark.parametrize("kind", KINDS)
def test_a_running_run_of_these_kinds_cannot_be_cancelled(world: Database, kind: str) -> None:
    point(world)
    if kind in ("commit", "rollback"):
        awaiting_commit(world)
    elif kind == "reprotect":
        migrated(world)
    row = run(world, kind)
    claim(world)
    state = group(world)["state"]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match=f"recovery_runs_cancel: recovery run {row['id']} \\(kind {kind}\\) is running") as caught:
        world.sql("update recovery_runs set cancel_requested = true where id = %s", (row["id"],))
    assert "rollback" in (caught.value.diag.message_hint or "")
    assert (status(world, row["id"])["cancel_requested"], group(world)["state"]) == (False, state)
    assert world.value("select cancel_requested from zerfaux.operations where subject_id = %s", (row["id"],)) is False


def test_cancelling_a_failover_awaiting_commit_says_commit_or_rollback(world: Database) -> None:
    fo = awaiting_commit(world)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is awaiting_commit") as caught:
        world.sql("update recovery_runs set cancel_requested = true where id = %s", (fo["id"],))
    assert "rollback run" in (caught.value.diag.message_hint or "")


def test_a_failover_ended_cancelled_by_the_engine_before_site_b_gives_the_group_back(world: Database) -> None:
    """The cancelled function, as finish_cancelled calls it (a cancel that reached a claim)."""
    point(world)
    fo = run(world, "failover")
    op = claim(world)["id"]
    plan(world, op, FAILOVER_PLAN)
    set_steps(world, op, {1: "done"})
    assert world.value("select zerfaux.finish_cancelled(%s, %s, 'cancelled before site B')", (op, WORKER))
    assert (status(world, fo["id"])["status"], group(world)["state"]) == ("cancelled", "protected")


# --- the commit policy and the schedule ------------------------------------------------------------

def schedule(db: Database, minutes: float = 0) -> dict[str, Any]:
    return db.one("select * from zerfaux.schedule_due(now() + make_interval(secs => %s))", (minutes * 60,))


@pytest.mark.parametrize(("policy", "timeout", "early", "late"), [
    ("commit", 30, 29, 31), ("rollback", 5, 4, 6), ("commit", None, 59, 61)])
def test_the_commit_policy_inserts_its_run_after_the_timeout(world: Database, policy: str, timeout: int | None,
                                                             early: float, late: float) -> None:
    world.sql("update protection_groups set commit_policy = %s, commit_timeout_minutes = %s where id = %s",
              (policy, timeout, GROUP))
    fo = awaiting_commit(world)
    deadline = group(world)["state_changed_at"] + timedelta(minutes=timeout or 60)
    assert schedule(world, early)["next_due_at"] == deadline
    assert world.value("select count(*) from recovery_runs where kind = %s", (policy,)) == 0
    schedule(world, late)
    auto = world.one("select * from recovery_runs where kind = %s", (policy,))
    assert (auto["options"], auto["requested_by"], auto["acts_on_run_id"], auto["status"]) == (
        {"auto": True}, None, fo["id"], "pending")
    assert [o["subject_id"] for o in operations(world)][-1] == auto["id"]
    schedule(world, late + 1)
    assert world.value("select count(*) from recovery_runs where kind = %s", (policy,)) == 1


def test_a_manual_policy_waits_for_a_person(world: Database) -> None:
    awaiting_commit(world)
    schedule(world, 60 * 24 * 30)
    assert world.value("select count(*) from recovery_runs where kind in ('commit', 'rollback')") == 0


def test_a_run_a_person_asked_for_is_not_doubled_by_the_policy(world: Database) -> None:
    world.sql("update protection_groups set commit_policy = 'commit', commit_timeout_minutes = 1 where id = %s", (GROUP,))
    awaiting_commit(world)
    mine = run(world, "rollback")
    schedule(world, 5)  # no error, no second run
    assert [r["id"] for r in world.sql("select id from recovery_runs where kind in ('commit', 'rollback')")] == [mine["id"]]


def test_the_schedule_skips_a_group_not_protected_and_takes_it_back_after(world: Database) -> None:
    world.sql("update protection_groups set paused = false where id = %s", (GROUP,))
    point(world)
    run(world, "failover")
    assert schedule(world, 60)["inserted"] == 0
    assert world.value("select next_replication_at from protection_groups where id = %s", (GROUP,)) is None
    set_state(world, "protected")
    assert schedule(world, 60)["inserted"] == 1


def test_a_reverse_group_is_scheduled_from_the_points_on_its_source(world: Database) -> None:
    """Reverse: the source (primary) receives; its newest point is the base of the due time."""
    world.sql("update protection_groups set paused = false, rpo_minutes = 20, direction = 'reverse' where id = %s",
              (GROUP,))
    old_on_target = point(world, 60)
    world.sql("update recovery_points set on_source = false where id = %s", (old_on_target,))
    fresh = point(world, 1)
    world.sql("update recovery_points set on_target = false, on_source = true where id = %s", (fresh,))
    assert schedule(world)["inserted"] == 0  # forward it would be due: its target's newest is an hour old
    due = world.value("select next_replication_at from protection_groups where id = %s", (GROUP,))
    created = world.value("select created_at from recovery_points where id = %s", (fresh,))
    assert created + timedelta(minutes=10) <= due <= created + timedelta(minutes=11)
    assert schedule(world, 12)["inserted"] == 1
    assert world.value("select origin from replication_jobs where protection_group_id = %s and status = 'pending'",
                       (GROUP,)) == "schedule"


# --- the delete guard ----------------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["recovering", "awaiting_commit", "failed_over"])
def test_a_group_away_from_protected_cannot_be_deleted(world: Database, state: str) -> None:
    set_state(world, state)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match=f"protection_groups_delete_during_recovery: protection group gold is {state}"):
        world.sql("delete from protection_groups where id = %s", (GROUP,))
    assert world.value("select count(*) from protection_groups where id = %s", (GROUP,)) == 1
    set_state(world, "protected")
    world.sql("delete from protection_groups where id = %s", (GROUP,))


def test_a_group_with_a_failover_awaiting_commit_says_commit_or_rollback(world: Database) -> None:
    awaiting_commit(world)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match="protection_groups_delete_during_recovery: .* \\(failover, awaiting_commit\\)") as caught:
        world.sql("delete from protection_groups where id = %s", (GROUP,))
    assert "commit or roll back" in (caught.value.diag.message_hint or "")


# --- the report ----------------------------------------------------------------------------------

def test_run_report_of_a_migration_and_of_what_acted_on_it(world: Database) -> None:
    db_vm = protect(world, add_vm(world, name="db-01", moref="vm-db"))
    pm = run(world, "planned_migration")
    op = claim(world)["id"]
    names = [("validate", None), ("shutdown_source", db_vm), ("replicate_final", None), ("present_datastore", None),
             ("power_on", db_vm), ("finish", None)]
    progress(world, op, {"plan": [{"seq": i, "name": n, "protected_vm_id": str(v) if v else None}
                                  for i, (n, v) in enumerate(names, start=1)]})
    progress(world, op, {"steps": [
        {"seq": 1, "status": "done"},
        {"seq": 2, "status": "done", "detail": {"how": "guest"}},
        {"seq": 3, "status": "done", "detail": {"snapshot_name": "zerfaux_final_x", "guid": "777"}},
        {"seq": 4, "status": "done", "detail": {"datastore": "dr-replica-01"}},
        {"seq": 5, "status": "done", "detail": {"boot_time": "2026-12-01T12:00:10Z", "source_state": "poweredOff",
                                                "source_changed_at": "2026-12-01T11:59:00Z"}},
        {"seq": 6, "status": "done"}]})
    complete(world, op, {"report": {"final_point": {"snapshot_name": "zerfaux_final_x", "guid": "777",
                                                    "created_at": "2026-12-01T11:59:30Z"}, "vms": 1}})
    rp = ended(world, "reprotect")
    doc = world.value("select zerfaux.run_report(%s)", (pm["id"],))
    assert doc["group"] == {"id": GROUP, "name": "gold", "state": "protected", "direction": "reverse"}
    assert (doc["datastore"], doc["final_snapshot"]["guid"], doc["report"]["vms"]) == ("dr-replica-01", "777", 1)
    assert doc["recovery_point"]["guid"] == "777" and doc["data_loss_seconds"] == 0
    [vm] = doc["vms"]
    assert (vm["vm_name"], vm["source_step"], vm["source_status"], vm["source_how"], vm["source_state"]) == (
        "db-01", "shutdown_source", "done", "guest", "poweredOff")
    assert vm["source_stopped_at"] is not None and vm["boot_time"] == "2026-12-01T12:00:10Z"
    assert [(b["id"], b["kind"], b["status"]) for b in doc["acted_on_by"]] == [(str(rp["id"]), "reprotect", "completed")]
    theirs = world.value("select zerfaux.run_report(%s)", (rp["id"],))
    assert (theirs["acts_on_run"]["id"], theirs["acts_on_run"]["kind"], theirs["final_snapshot"]) == (
        str(pm["id"]), "planned_migration", None)


@pytest.mark.parametrize("kind", KINDS)
def test_these_kinds_wait_for_a_running_cleanup_but_a_test_does_not(world: Database, kind: str) -> None:
    point(world)
    test = run(world)
    world.sql("update recovery_runs set status = 'failed' where id = %s", (test["id"],))
    cleanup = run(world, "cleanup", test_run_id=test["id"])
    set_state(world, {"commit": "awaiting_commit", "rollback": "awaiting_commit", "reprotect": "failed_over"}
              .get(kind, "protected"))
    refused(world, psycopg.errors.UniqueViolation,
            f"recovery_runs_one_run_per_group: .* already has a pending cleanup run \\({cleanup['id']}\\)",
            lambda: run(world, kind))
    set_state(world, "protected")
    assert run(world)["status"] == "pending"  # a new test beside the earlier test's cleanup, as before
