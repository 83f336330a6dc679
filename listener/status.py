"""``zerfaux status``: what the queue holds, who is working, what happened lately."""

from __future__ import annotations

import asyncio
from typing import Any

from listener.store_pg import PostgresStore


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


async def _report(url: str) -> dict[str, Any]:
    store = PostgresStore(url, pool_size=2, retry_seconds=5.0)
    await store.open()
    try:
        return await store.status_report()
    finally:
        await store.close()


def print_status(url: str) -> int:
    report = asyncio.run(_report(url))
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
        print(f"  {w['worker_id']:<40} running {w['running']:>3}  last seen {w['last_seen_at']:%H:%M:%S}")
    print("Recent operations:")
    for op in report["recent"]:
        error = f"  {op['last_error'][:100]}" if op["last_error"] and op["status"] != "succeeded" else ""
        print(
            f"  {op['created_at']:%H:%M:%S} {op['kind']:<20} {op['status']:<10} "
            f"attempt {op['attempts']}/{op['max_attempts']}  {op['subject_id']}{error}"
        )
    return 0
