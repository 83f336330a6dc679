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
