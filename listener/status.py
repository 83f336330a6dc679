"""``zerfaux status``: how far behind each group is, what the queue holds, who is working,
what happened lately."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from listener.config import Settings
from listener.protection import GroupStatus

GROUPS_SHOWN = 50  # the worst first; the rest are counted (all of them: public.protection_status)
NAME_WIDTH = 32
ERROR_WIDTH = 60
_SEVERITY = {"violated": 0, "at_risk": 1, "unknown": 2, "ok": 3}
_LABEL = {"violated": "VIOLATED", "at_risk": "AT RISK", "unknown": "unknown", "ok": "ok"}


def seconds_text(seconds: float | None) -> str:
    """A duration a person reads at a glance: 45.0s, 12.5m, 3.2h, 2.5d."""
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _clock(stamp: str | None) -> str:
    return datetime.fromisoformat(stamp).strftime("%H:%M:%S") if stamp else "-"


def minutes_text(minutes: int | None) -> str:
    if minutes is None:
        return "none"
    if minutes < 120:
        return f"{minutes}m"
    hours, rest = divmod(minutes, 60)
    return f"{hours}h{rest}m" if rest else f"{hours}h"


def _next(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    seconds = (at - now).total_seconds()
    return "due" if seconds <= 0 else f"in {seconds_text(seconds)}"


def shorten(text: str | None, width: int) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def _worst_first(g: GroupStatus) -> tuple[int, float, str]:
    behind = (g.current_rpo_seconds or 0.0) / g.target_seconds if g.target_seconds else 0.0
    return (_SEVERITY.get(g.rpo_status, 2), -behind, g.name)


def group_table(groups: Sequence[GroupStatus], now: datetime, limit: int = GROUPS_SHOWN) -> list[str]:
    """The groups' lines of `zerfaux status`: a count by status, then the worst ``limit`` groups."""
    if not groups:
        return ["Protection groups: none"]
    counts = {name: sum(1 for g in groups if g.rpo_status == name) for name in _SEVERITY}
    paused = sum(1 for g in groups if g.paused)
    lines = [f"Protection groups: {len(groups)} ({counts['violated']} violated, {counts['at_risk']} at risk, "
             f"{counts['ok']} ok, {counts['unknown']} unknown; {paused} paused)"]
    rows = [("GROUP", "RPO", "CURRENT", "STATUS", "NEXT", "LAST ERROR")]
    for g in sorted(groups, key=_worst_first)[:limit]:
        status = _LABEL.get(g.rpo_status, g.rpo_status) + (" (paused)" if g.paused else "")
        error = shorten(g.last_error, ERROR_WIDTH) if g.last_job_status != "completed" else ""
        rows.append((shorten(g.name, NAME_WIDTH), minutes_text(g.rpo_minutes), seconds_text(g.current_rpo_seconds),
                     status, _next(g.next_replication_at, now), error))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines += ["  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5]
              for row in rows]
    if len(groups) > limit:
        lines.append(f"  ... and {len(groups) - limit} more (all of them: select * from protection_status)")
    return [line.rstrip() for line in lines]


async def _report(settings: Settings) -> dict[str, Any]:
    from listener.service import make_store

    store = make_store(settings)
    await store.open()
    try:
        report = await store.status_report()
        report["mode"] = await store.database_mode()
        report["groups"] = await store.protection_overview()
        return report
    finally:
        await store.close()


def print_status(settings: Settings) -> int:
    report = asyncio.run(_report(settings))
    print(f"Mode: {report['mode'] or 'not set (the first listener records its own)'}")
    for line in group_table(report["groups"], datetime.now(UTC)):
        print(line)
    print("Queue (operations by kind and status):")
    if not report["by_kind"]:
        print("  empty")
    for row in report["by_kind"]:
        print(f"  {row['kind']:<20} {row['status']:<10} {row['n']:>7}")
    print(f"Oldest queued operation: {seconds_text(report['oldest_queued_seconds'])}")
    print("Live workers (seen in the last 2 minutes):")
    if not report["workers"]:
        print("  none")
    for w in report["workers"]:
        print(f"  {w['worker_id']:<40} running {w['running']:>3}  last seen {_clock(w['last_seen_at'])}")
    print("Recent operations:")
    for op in report["recent"]:
        error = f"  {op['last_error'][:100]}" if op["last_error"] and op["status"] != "succeeded" else ""
        print(
            f"  {_clock(op['created_at'])} {op['kind']:<20} {op['status']:<10} "
            f"attempt {op['attempts']}{'' if op['max_attempts'] is None else '/' + str(op['max_attempts'])}"
            f"  {op['subject_id']}{error}"
        )
    return 0
