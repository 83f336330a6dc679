"""``zerfaux status``: what the queue holds, who is working, what happened lately."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from listener.config import Settings


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _clock(stamp: str | None) -> str:
    return datetime.fromisoformat(stamp).strftime("%H:%M:%S") if stamp else "-"


async def _report(settings: Settings) -> dict[str, Any]:
    from listener.service import make_store

    store = make_store(settings)
    await store.open()
    try:
        report = await store.status_report()
        report["mode"] = await store.database_mode()
        return report
    finally:
        await store.close()


def print_status(settings: Settings) -> int:
    report = asyncio.run(_report(settings))
    print(f"Mode: {report['mode'] or 'not set (the first listener records its own)'}")
    print("Queue (operations by kind and status):")
    if not report["by_kind"]:
        print("  empty")
    for row in report["by_kind"]:
        print(f"  {row['kind']:<20} {row['status']:<10} {row['n']:>7}")
    print(f"Oldest queued operation: {_age(report['oldest_queued_seconds'])}")
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
