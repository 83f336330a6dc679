"""``zerfaux report rpo``: each group's RPO compliance over a window, as a table or as JSON.

The numbers come from zerfaux.rpo_report (recovery_points and rpo_events; definitions in its
migration and in docs/rpo.md), so a dashboard querying the function sees the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from listener.config import Settings
from listener.protection import RpoCompliance
from listener.status import NAME_WIDTH, minutes_text, seconds_text, shorten


def window(days: float, until: datetime | None = None) -> tuple[datetime, datetime]:
    """[until - days, until); ``until`` defaults to now, a naive one is read as UTC."""
    end = until or datetime.now(UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    return end - timedelta(days=days), end


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def rpo_table(rows: Sequence[RpoCompliance], since: datetime, until: datetime) -> list[str]:
    span = seconds_text((until - since).total_seconds())
    lines = [f"RPO compliance from {since.astimezone(UTC):%Y-%m-%d %H:%M} to {until.astimezone(UTC):%Y-%m-%d %H:%M} "
             f"UTC ({span})"]
    if not rows:
        return lines + ["  no protection groups"]
    table = [("GROUP", "RPO", "WITHIN", "WORST", "VIOLATIONS", "LONGEST", "PAUSED", "UNKNOWN")]
    for r in rows:
        no_target = r.rpo_minutes is None
        table.append((
            shorten(r.name, NAME_WIDTH), minutes_text(r.rpo_minutes), _share(r.within_share),
            seconds_text(r.worst_rpo_seconds), "-" if no_target else str(r.violations),
            "-" if no_target or not r.violations else seconds_text(r.longest_violation_seconds),
            seconds_text(r.paused_seconds) if r.paused_seconds else "-",
            seconds_text(r.unknown_seconds) if r.unknown_seconds else "-",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(widths[i + 1]) for i, cell in enumerate(row[1:])]
        lines.append("  " + "  ".join(cells))
    lines.append("WITHIN: share of the observed time (paused and unknown time left out) below the RPO")
    return lines


def rpo_json(rows: Sequence[RpoCompliance], since: datetime, until: datetime) -> dict[str, Any]:
    return {"from": since.isoformat(), "until": until.isoformat(), "groups": [r.to_json() for r in rows]}


async def _rows(settings: Settings, since: datetime, until: datetime) -> list[RpoCompliance]:
    from listener.service import make_store

    store = make_store(settings)
    await store.open()
    try:
        return await store.rpo_report(since, until)
    finally:
        await store.close()


def print_rpo_report(settings: Settings, days: float, until: datetime | None, as_json: bool) -> int:
    since, end = window(days, until)
    rows = asyncio.run(_rows(settings, since, end))
    if as_json:
        print(json.dumps(rpo_json(rows, since, end), indent=2))
    else:
        for line in rpo_table(rows, since, end):
            print(line)
    return 0
