"""``zerfaux report run <id>``: one recovery run as a person hands it to an auditor, or as JSON.

The document comes from zerfaux.run_report (its migration lists the fields), so whatever reads
the function sees the same numbers. Times are shown in UTC, to the second.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from listener.config import Settings
from listener.status import seconds_text


def _time(value: Any) -> str:
    if not value:
        return "-"
    try:
        stamp = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return f"{stamp.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _utc(value: Any) -> str:
    return "-" if not value else f"{_time(value)} UTC"


def _seconds(value: Any) -> str:
    return "-" if value is None else seconds_text(float(value))


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _point_line(point: Mapping[str, Any] | None) -> str:
    if not point:
        return "none"
    tested = f", last tested {_utc(point.get('tested_at'))}" if point.get("tested_at") else ""
    return (f"{point.get('snapshot_name')} (GUID {point.get('guid')}), taken {_utc(point.get('created_at'))}, "
            f"on the target since {_utc(point.get('replicated_at'))}{tested}")


# The kinds of issue 14: their text adds the group's state, what a run acts on, the source side,
# a detail column and the handler's report; a test's and a cleanup's text is as it was.
FAILOVER_KINDS = ("planned_migration", "failover", "commit", "rollback", "reprotect")
BRINGS_UP = ("planned_migration", "failover")
_BOOKKEEPING = {"attempt", "worker", "previous_attempts"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "-" if value is None else str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _summary(detail: Mapping[str, Any] | None, limit: int = 72) -> str:
    """A step's detail in one cell: its scalar keys (and a list of scalars, joined), in order."""
    parts = []
    for key, value in (detail or {}).items():
        if key in _BOOKKEEPING:
            continue
        if _is_scalar(value):
            parts.append(f"{key}={_scalar(value)}")
        elif isinstance(value, list) and all(_is_scalar(v) for v in value):
            parts.append(f"{key}=[{', '.join(_scalar(v) for v in value)}]")
    text = ", ".join(parts) or "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _report_lines(doc: Any) -> list[str]:
    """The handler's report: its top-level scalars, and one level into what it holds."""
    if not isinstance(doc, Mapping) or not doc:
        return ["  none"]
    lines = []
    for key in sorted(doc):
        value = doc[key]
        if _is_scalar(value):
            lines.append(f"  {key}: {_scalar(value)}")
        elif isinstance(value, Mapping):
            inner = [f"{k}={_scalar(v)}" for k, v in value.items() if _is_scalar(v)]
            rest = len(value) - len(inner)
            lines.append(f"  {key}: " + (", ".join(inner) or "{}") + (f" (+{rest} more in --json)" if rest else ""))
        elif isinstance(value, list):
            if all(_is_scalar(v) for v in value):
                lines.append(f"  {key}: " + (", ".join(_scalar(v) for v in value) or "none"))
            else:
                lines.append(f"  {key}: {len(value)} item(s) (see --json)")
    return lines


def run_text(report: Mapping[str, Any]) -> list[str]:
    run = report["run"]
    group = report.get("group") or {}
    kind = run["kind"]
    ours = kind in FAILOVER_KINDS
    lines = [f"Recovery run {run['id']}: {kind} of protection group {group.get('name', '?')}",
             "",
             f"  Status:          {run['status']}" + (" (cancel requested)" if run.get("cancel_requested") else ""),
             f"  Requested:       {_utc(run.get('created_at'))}" + (
                 f" by {run['requested_by']}" if run.get("requested_by") else (
                     " by the commit policy" if ours and (run.get("options") or {}).get("auto") else "")),
             f"  Started:         {_utc(run.get('started_at'))}",
             f"  Completed:       {_utc(run.get('completed_at'))}"]
    if ours:
        lines.append(f"  Group now:       {group.get('state', '?')}, direction {group.get('direction', '?')}"
                     + (f" (was {run['group_state_before']} at the request)" if run.get("group_state_before") else ""))
        acts = report.get("acts_on_run")
        if acts:
            lines.append(f"  Acts on:         {acts['kind']} run {acts['id']} ({acts['status']})")
    if not ours or kind in BRINGS_UP or report.get("recovery_point"):
        lines.append(f"  Recovery point:  {_point_line(report.get('recovery_point'))}")
    if not ours or kind in BRINGS_UP:
        lines += [f"  RTO:             {_seconds(report.get('rto_seconds'))} (from the start to the last VM ready)",
                  f"  Data loss:       {_seconds(report.get('data_loss_seconds'))} "
                  + ("(none: the final snapshot was made with the source VMs off)" if kind == "planned_migration"
                     else "(from the recovery point to the start)")]
    if ours:
        final = report.get("final_snapshot")
        if final:
            lines.append(f"  Final snapshot:  {final.get('snapshot_name') or '?'} (GUID {final.get('guid') or '?'})"
                         + (f", taken {_utc(final.get('created_at'))}" if final.get("created_at") else ""))
        if report.get("datastore"):
            lines.append(f"  Datastore:       {report['datastore']}")
        for by in report.get("acted_on_by") or []:
            lines.append(f"  Acted on by:     {by['kind']} run {by['id']} ({by['status']}"
                         + (f", completed {_utc(by.get('completed_at'))})" if by.get("completed_at") else ")"))
    test = report.get("test_run")
    if test:
        lines.append(f"  Test run:        {test['id']} ({test['status']}, RTO {_seconds(test.get('rto_seconds'))})")
    for cleanup in report.get("cleanup_runs") or []:
        lines.append(f"  Cleanup run:     {cleanup['id']} ({cleanup['status']}, "
                     f"completed {_utc(cleanup.get('completed_at'))})")
    if run.get("error"):
        lines.append(f"  Error:           {run['error']}")

    lines += ["", "Steps"]
    steps = report.get("steps") or []
    if steps and ours:
        rows = [("SEQ", "STEP", "VM", "STARTED (UTC)", "FINISHED (UTC)", "DURATION", "STATUS", "DETAIL")]
        rows += [(str(s["seq"]), s["name"], s.get("vm_name") or "-", _time(s.get("started_at")),
                  _time(s.get("finished_at")), _seconds(s.get("duration_seconds")), s["status"],
                  _summary(s.get("detail"))) for s in steps]
        lines += _table(rows)
    elif steps:
        rows = [("SEQ", "STEP", "VM", "STARTED (UTC)", "FINISHED (UTC)", "DURATION", "STATUS")]
        rows += [(str(s["seq"]), s["name"], s.get("vm_name") or "-", _time(s.get("started_at")),
                  _time(s.get("finished_at")), _seconds(s.get("duration_seconds")), s["status"]) for s in steps]
        lines += _table(rows)
    else:
        lines.append("  no steps recorded yet")

    vms = report.get("vms") or []
    if ours and any(v.get("source_step") or v.get("source_state") for v in vms):
        lines += ["", "Source site (each VM at site A, before its copy at site B powered on)"]
        rows = [("VM", "STEP", "STATUS", "STOPPED (UTC)", "HOW", "FENCED", "STATE AT POWER-ON", "SINCE (UTC)")]
        rows += [(v.get("vm_name") or str(v.get("protected_vm_id")), v.get("source_step") or "-",
                  v.get("source_status") or "-", _time(v.get("source_stopped_at")), v.get("source_how") or "-",
                  _scalar(v.get("fenced")), v.get("source_state") or "-", _time(v.get("source_changed_at")))
                 for v in vms]
        lines += _table(rows)

    if any(v.get("ready_status") or v.get("boot_time") for v in vms):
        lines += ["", "Virtual machines (boot order)"]
        rows = [("VM", "PRIORITY", "BOOTED (UTC)", "READY (UTC)", "WAITED", "HOW")]
        rows += [(v.get("vm_name") or str(v.get("protected_vm_id")), str(v.get("boot_priority") or "-"),
                  _time(v.get("boot_time") or v.get("powered_on_at")),
                  _time(v.get("ready_at")) if v.get("ready_at") else (
                      "not ready (timed out)" if v.get("ready_status") == "warning" else "-"),
                  _seconds(v.get("waited_seconds")), v.get("ready_how") or "-") for v in vms]
        lines += _table(rows)

    if ours:
        lines += ["", "Report (the handler's summary; all of it with --json)"] + _report_lines(run.get("report"))

    warnings = report.get("warnings") or []
    lines += ["", f"Warnings ({len(warnings)})"]
    if not warnings:
        lines.append("  none")
    for w in warnings:
        about = f" ({w['vm_name']})" if w.get("vm_name") else ""
        lines.append(f"  step {w['seq']} {w['name']}{about}, {w['status']}: {w.get('error') or 'no message'}")
    return lines


async def _report(settings: Settings, run_id: UUID) -> dict[str, Any] | None:
    from listener.service import make_store

    store = make_store(settings)
    await store.open()
    try:
        return await store.run_report(run_id)
    finally:
        await store.close()


def print_run_report(settings: Settings, run_id: UUID, as_json: bool) -> int:
    report = asyncio.run(_report(settings, run_id))
    if report is None:
        print(f"zerfaux: no recovery run {run_id} (select id from recovery_runs order by created_at desc "
              "lists them)", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in run_text(report):
            print(line)
    return 0
