"""The text of `zerfaux report run`, from zerfaux.run_report's document."""

from __future__ import annotations

from typing import Any

from listener.run_report import run_text

RUN = "11111111-2222-4333-8444-555555555555"


def report(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run": {"id": RUN, "kind": "cleanup", "status": "running", "cancel_requested": False,
                "created_at": "2026-12-01T10:00:00+00:00", "started_at": "2026-12-01T10:00:02.5+00:00",
                "completed_at": None, "requested_by": None, "error": None},
        "group": {"id": "g", "name": "gold"}, "recovery_point": None,
        "test_run": {"id": "t-1", "status": "active", "rto_seconds": 95.5},
        "cleanup_runs": [], "steps": [], "vms": [], "rto_seconds": None, "data_loss_seconds": None, "warnings": [],
    }
    return base | changes


def test_a_run_with_nothing_recorded_yet_says_so() -> None:
    text = "\n".join(run_text(report()))
    assert text.startswith(f"Recovery run {RUN}: cleanup of protection group gold\n")
    assert "  Started:         2026-12-01 10:00:02 UTC\n  Completed:       -\n" in text
    assert "  Recovery point:  none\n" in text and "  RTO:             - (" in text
    assert "  Test run:        t-1 (active, RTO 95.5s)" in text
    assert "Steps\n  no steps recorded yet" in text
    assert "Virtual machines" not in text  # a cleanup boots nothing
    assert text.endswith("Warnings (0)\n  none")


def test_a_failed_step_and_the_error_are_shown() -> None:
    steps = [{"seq": 1, "name": "destroy_vm", "vm_name": "app-01", "status": "failed", "started_at": None,
              "finished_at": "2026-12-01T10:01:00Z", "duration_seconds": None}]
    text = "\n".join(run_text(report(
        steps=steps, run=report()["run"] | {"status": "failed", "error": "vCenter refused", "cancel_requested": True},
        warnings=[{"seq": 1, "name": "destroy_vm", "vm_name": "app-01", "status": "failed", "error": None}])))
    assert "  Status:          failed (cancel requested)" in text and "  Error:           vCenter refused" in text
    assert "  1    destroy_vm  app-01  -              2026-12-01 10:01:00  -         failed" in text
    assert "step 1 destroy_vm (app-01), failed: no message" in text


def test_a_planned_migration_shows_the_source_side_the_final_snapshot_and_the_report() -> None:
    run = report()["run"] | {"kind": "planned_migration", "status": "completed", "group_state_before": "protected",
                             "report": {"vms": 2, "final_point": {"snapshot_name": "zerfaux_final", "guid": "99"},
                                        "powered_on": ["db-01", "app-01"], "moves": [{"vm": "db-01"}]}}
    steps = [{"seq": 3, "name": "shutdown_source", "vm_name": "db-01", "status": "done",
              "started_at": "2026-12-01T10:00:00Z", "finished_at": "2026-12-01T10:00:30Z", "duration_seconds": 30,
              "detail": {"how": "guest", "attempt": 1, "worker": "w", "previous_attempts": []}}]
    vms = [{"protected_vm_id": "p1", "vm_name": "db-01", "boot_priority": 1, "source_step": "shutdown_source",
            "source_status": "done", "source_stopped_at": "2026-12-01T10:00:30Z", "source_how": "guest",
            "fenced": None, "source_state": "poweredOff", "source_changed_at": "2026-12-01T10:00:29Z",
            "boot_time": "2026-12-01T10:02:00Z", "ready_status": "done", "ready_at": "2026-12-01T10:02:30Z"}]
    text = "\n".join(run_text(report(
        run=run, test_run=None, steps=steps, vms=vms, group={"name": "gold", "state": "failed_over",
                                                             "direction": "forward"},
        final_snapshot={"snapshot_name": "zerfaux_final", "guid": "99", "created_at": "2026-12-01T10:01:00Z"},
        datastore="dr-replica-01", acted_on_by=[{"id": "r-2", "kind": "reprotect", "status": "pending"}],
        data_loss_seconds=0)))
    assert "  Group now:       failed_over, direction forward (was protected at the request)" in text
    assert "  Final snapshot:  zerfaux_final (GUID 99), taken 2026-12-01 10:01:00 UTC" in text
    assert "  Datastore:       dr-replica-01" in text and "  Acted on by:     reprotect run r-2 (pending)" in text
    assert "Data loss:       0.0s (none: the final snapshot was made with the source VMs off)" in text
    assert "DETAIL" in text and "how=guest" in text and "attempt=" not in text
    assert "  db-01  shutdown_source  done    2026-12-01 10:00:30  guest  -       poweredOff" in text
    assert "  final_point: snapshot_name=zerfaux_final, guid=99" in text
    assert "  powered_on: db-01, app-01" in text and "  moves: 1 item(s) (see --json)" in text and "  vms: 2" in text


def test_a_rollback_shows_what_it_acts_on_and_no_rto() -> None:
    run = report()["run"] | {"kind": "rollback", "status": "completed", "options": {"auto": True},
                             "report": {"discarded_bytes": 4096}}
    text = "\n".join(run_text(report(run=run, test_run=None, group={"name": "gold", "state": "protected",
                                                                     "direction": "forward"},
                                     acts_on_run={"id": "f-1", "kind": "failover", "status": "completed"})))
    assert "  Requested:       2026-12-01 10:00:00 UTC by the commit policy" in text
    assert "  Acts on:         failover run f-1 (completed)" in text
    assert "RTO" not in text and "Data loss" not in text and "Recovery point" not in text
    assert "Report (the handler's summary; all of it with --json)\n  discarded_bytes: 4096" in text
