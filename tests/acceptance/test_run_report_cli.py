"""`zerfaux report run <id>` through the real CLI in a subprocess, on a run the engine functions
brought to 'active' with recorded step times."""

from __future__ import annotations

import json
import re
import uuid

from tests.acceptance.test_cli import finish
from tests.integration.conftest import GROUP, add_vm, protect
from tests.support.engine import spawn
from tests.support.pg import Database

WORKER = "w-report-cli"


def active_test_with_two_vms(db: Database) -> str:
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
           " values (%s, 'zerfaux_20261201T1130', '4242', timestamptz '2026-12-01 11:30+00')", (GROUP,))
    db_vm = protect(db, add_vm(db, name="db-01", moref="vm-db"))
    app_vm = protect(db, add_vm(db, name="app-01", moref="vm-app"))
    db.sql("update protected_vms set boot_priority = 1 where id = %s", (db_vm,))
    run_id = str(db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'test') returning id",
                          (GROUP,)))
    [op] = [r["id"] for r in db.sql("select * from zerfaux.claim(%s, 10, 60)", (WORKER,)) if r["kind"] == "recovery.run"]
    plan = [("validate", None), ("power_on", db_vm), ("wait_ready", db_vm), ("power_on", app_vm),
            ("wait_ready", app_vm), ("activate", None)]
    db.sql("select zerfaux.progress(%s, %s, %s::jsonb)", (op, WORKER, json.dumps({"plan": [
        {"seq": i, "name": n, "protected_vm_id": str(v) if v else None} for i, (n, v) in enumerate(plan, start=1)]})))
    db.sql("select zerfaux.progress(%s, %s, %s::jsonb)", (op, WORKER, json.dumps({"steps": [
        {"seq": 3, "status": "done", "detail": {"how": "tools", "boot_time": "2026-12-01T12:00:10Z",
                                                "ready_at": "2026-12-01T12:00:40Z", "waited_seconds": 30}},
        {"seq": 5, "status": "warning", "error": "VMware Tools not running after 300 s",
         "detail": {"how": "timeout", "boot_time": "2026-12-01T12:00:45Z", "waited_seconds": 300}}]})))
    # Fixed times, so the text can be checked: the run started at 12:00:00.
    db.sql("update recovery_runs set started_at = timestamptz '2026-12-01 12:00+00' where id = %s", (run_id,))
    for seq, start, end in ((1, 0, 5), (2, 5, 10), (3, 10, 40), (4, 41, 45), (5, 45, 345), (6, 345, 346)):
        db.sql("update recovery_run_steps set started_at = timestamptz '2026-12-01 12:00+00' + make_interval(secs => %s),"
               " finished_at = timestamptz '2026-12-01 12:00+00' + make_interval(secs => %s),"
               " status = case when status = 'pending' then 'done' else status end"
               " where run_id = %s and seq = %s", (start, end, run_id, seq))
    db.sql("select * from zerfaux.complete_many(%s, %s::jsonb)",
           (WORKER, json.dumps([{"id": str(op), "result": {"status": "active"}}])))
    return run_id


def test_report_run_prints_what_an_auditor_reads_and_json(seeded_db: Database) -> None:
    run_id = active_test_with_two_vms(seeded_db)
    code, out = finish(spawn(seeded_db.url, "report", "run", run_id), sig=None, timeout=60)
    assert code == 0, out
    assert f"Recovery run {run_id}: test of protection group gold" in out
    assert re.search(r"Status:\s+active\n", out)
    assert re.search(r"Recovery point:\s+zerfaux_20261201T1130 \(GUID 4242\), taken 2026-12-01 11:30:00 UTC", out)
    assert re.search(r"RTO:\s+5\.8m \(from the start to the last VM ready\)", out), out  # 345 s
    assert re.search(r"Data loss:\s+30\.0m \(from the recovery point to the start\)", out), out
    assert re.search(r"Completed:\s+-\n", out), out
    assert re.search(r"^\s+SEQ\s+STEP\s+VM\s+STARTED \(UTC\)\s+FINISHED \(UTC\)\s+DURATION\s+STATUS$", out, re.M)
    assert re.search(r"^\s+3\s+wait_ready\s+db-01\s+2026-12-01 12:00:10\s+2026-12-01 12:00:40\s+30\.0s\s+done$", out, re.M)
    assert re.search(r"^\s+5\s+wait_ready\s+app-01\s+2026-12-01 12:00:45\s+2026-12-01 12:05:45\s+5\.0m\s+warning$",
                     out, re.M), out
    assert re.search(r"^\s+db-01\s+1\s+2026-12-01 12:00:10\s+2026-12-01 12:00:40\s+30\.0s\s+tools$", out, re.M), out
    assert re.search(r"^\s+app-01\s+3\s+2026-12-01 12:00:45\s+not ready \(timed out\)\s+5\.0m\s+timeout$", out, re.M), out
    assert "Warnings (1)\n  step 5 wait_ready (app-01), warning: VMware Tools not running after 300 s" in out

    code, out = finish(spawn(seeded_db.url, "report", "run", run_id, "--json"), sig=None, timeout=60)
    assert code == 0, out
    report = json.loads(out[out.index("{"):])
    assert report["run"]["id"] == run_id and report["rto_seconds"] == 345
    assert [w["seq"] for w in report["warnings"]] == [5]


def test_report_run_of_no_such_run_fails_clearly(seeded_db: Database) -> None:
    missing = str(uuid.uuid4())
    code, out = finish(spawn(seeded_db.url, "report", "run", missing), sig=None, timeout=60)
    assert code == 1 and f"zerfaux: no recovery run {missing}" in out
    code, out = finish(spawn(seeded_db.url, "report", "run", "last-tuesday"), sig=None, timeout=60)
    assert code == 2 and "the run id must be a recovery_runs.id (a UUID), not 'last-tuesday'" in out
