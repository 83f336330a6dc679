"""Paging of the groups page: which page was asked for, and what the page says about all groups.

A site with a thousand groups cannot show them all at once and stay quick (a thousand rows, a
thousand charts): the groups page shows ``PAGE_SIZE`` of them, worst status first, so what needs
attention is on page 1, with the counts per status over every group the user may read above
the table, and a link to every page, so every group stays reachable with scripts off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAGE_SIZE = 50
STATUSES = ("violated", "at_risk", "unknown", "ok")  # worst first: the page's order


class BadPage(ValueError):
    """``?page=`` is not a page number."""


def parse_page(raw: str | None) -> int:
    """The 1-based page number of ``?page=``; absent or empty is page 1."""
    if raw is None or raw.strip() == "":
        return 1
    text = raw.strip()
    if not text.isdigit() or int(text) < 1 or len(text) > 9:
        raise BadPage(f"page: {raw[:40]!r} is not a page number; use a whole number from 1, e.g. ?page=2")
    return int(text)


@dataclass(frozen=True)
class Paging:
    page: int
    pages: int  # at least 1
    total: int  # groups the user may read
    first: int  # 1-based position of the page's first group (0 with none)
    last: int
    counts: dict[str, int] = field(default_factory=dict)  # per status, over all groups
    paused: int = 0

    @property
    def past_last(self) -> bool:
        return self.total > 0 and self.page > self.pages

    def href(self, page: int) -> str:
        return "/" if page == 1 else f"/?page={page}"


def split(rows: list[dict[str, Any]], page: int, size: int = PAGE_SIZE) -> tuple[list[dict[str, Any]], Paging]:
    """The rows of console.sql's ``groups_page`` as the page's groups and its paging; every row
    carries the counts, and a page past the last is one row with a null id."""
    head = rows[0] if rows else {}
    total = int(head.get("total") or 0)
    groups = [r for r in rows if r.get("id") is not None]
    first = (page - 1) * size + 1 if groups else 0
    return groups, Paging(
        page=page, pages=max(1, -(-total // size)), total=total, first=first,
        last=first + len(groups) - 1 if groups else 0,
        counts={s: int(head.get(f"n_{s}") or 0) for s in STATUSES}, paused=int(head.get("n_paused") or 0),
    )
