"""Retention grids in zrepl's form: ``1x1h(keep=all) | 24x1h | 14x1d | 8x1w``.

A grid is a list of adjacent intervals counted back from an anchor (the newest snapshot's
creation): ``24x1h`` is 24 one-hour intervals, one after the other. A snapshot falls into the
interval whose span (older edge included, newer edge excluded) holds its creation; in each
interval the ``keep`` oldest snapshots stay (default 1, ``keep=all`` every one), the others go.
A snapshot as new as the anchor (or newer) always stays; one older than the grid's far edge goes.

The same grammar is checked by the database (``zerfaux.retention_grid_error`` in
supabase/migrations/20261201152000_recovery_points.sql): both give the same message for the same
text, and tests/integration/test_retention_grid_sql.py holds them to it. Grammar:

* intervals separated by ``|``; spaces and tabs around every token are ignored;
* an interval is ``<count>x<length><unit>`` and optionally ``(keep=all)`` or ``(keep=<n>)``,
  with count, length and n whole numbers of at least 1 (at most 9 digits) and unit one of
  s, m, h, d, w;
* an interval may not be shorter than the one before it, unless every one before it keeps all
  (zrepl's rule: a shrinking grid is nearly always a mistake);
* the whole grid spans at most 100 years.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

EXAMPLE = "1x1h(keep=all) | 24x1h | 14x1d | 8x1w"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_SPAN = 36500 * 86400  # 100 years, in seconds
_WS = " \t"
_INTERVAL = re.compile(r"([0-9]+)[ \t]*x[ \t]*([0-9]+)[ \t]*([a-z]+)[ \t]*"
                       r"(\([ \t]*keep[ \t]*=[ \t]*([a-z0-9]+)[ \t]*\))?")
_FORM = "<count>x<length><unit>, optionally followed by (keep=all) or (keep=<n>); units s, m, h, d, w"

T = TypeVar("T")


class GridError(ValueError):
    """A grid that does not parse; the message says which interval and why (no column name)."""


@dataclass(frozen=True)
class Interval:
    count: int  # how many adjacent intervals of this length
    seconds: int  # the length of each
    keep: int | None  # how many of the oldest snapshots in each one stay; None: all

    @property
    def span(self) -> int:
        return self.count * self.seconds


@dataclass(frozen=True)
class Grid:
    intervals: tuple[Interval, ...]

    @property
    def span(self) -> int:
        return sum(i.span for i in self.intervals)

    def bucket(self, age: int | float) -> tuple[int, int | None] | None:
        """(which interval, how many it keeps) of a snapshot ``age`` seconds older than the anchor.

        None: beyond the grid. Intervals number from 0 at the anchor. An interval holds its older
        edge, not its newer one (zrepl's rule), so an age exactly on the edge between two
        intervals is in the newer of the two, and one exactly at the grid's far edge is in it."""
        offset, first = 0, 0
        for interval in self.intervals:
            if age <= offset + interval.span:
                # ceil((age - offset) / length) - 1, in integers where the age is one
                within = -(-(age - offset) // interval.seconds) - 1
                return first + int(within), interval.keep
            offset += interval.span
            first += interval.count
        return None


def _quoted(part: str) -> str:
    return '"' + part + '"'


def grid_error(text: str | None) -> str | None:
    """Why ``text`` is not a grid, or None when it is one (or is None: no grid)."""
    try:
        parse(text)
    except GridError as exc:
        return str(exc)
    return None


def parse(text: str | None) -> Grid | None:
    """The grid in ``text``; None for None; ``GridError`` for anything else that is not a grid."""
    if text is None:
        return None
    if text.strip(_WS) == "":
        raise GridError(f"is empty: give at least one interval, {_FORM}")
    intervals: list[Interval] = []
    for n, raw in enumerate(text.split("|"), start=1):
        part = raw.strip(_WS)
        if part == "":
            raise GridError(f"interval {n} is empty (two | in a row, or one at an end)")
        found = _INTERVAL.fullmatch(part)
        if found is None:
            raise GridError(f"interval {n} {_quoted(part)} is not of the form {_FORM}")
        count, length, unit, keep_group, keep_text = found.groups()
        if unit not in UNITS:
            raise GridError(f"interval {n} {_quoted(part)} has unit {_quoted(unit)}: use s, m, h, d or w")
        if max(len(count), len(length), len(keep_text or "")) > 9:
            raise GridError(f"interval {n} {_quoted(part)}: numbers may have at most 9 digits")
        if int(count) < 1 or int(length) < 1:
            raise GridError(f"interval {n} {_quoted(part)}: count and length must be at least 1")
        keep: int | None = 1
        if keep_group is not None:
            if keep_text == "all":
                keep = None
            elif keep_text.isdigit() and int(keep_text) >= 1:
                keep = int(keep_text)
            else:
                raise GridError(f"interval {n} {_quoted(part)}: keep must be all or a whole number of at least 1")
        interval = Interval(int(count), int(length) * UNITS[unit], keep)
        if intervals and interval.seconds < intervals[-1].seconds and any(i.keep is not None for i in intervals):
            raise GridError(f"interval {n} {_quoted(part)} is shorter than interval {n - 1}: lengths may not "
                            "decrease (except after intervals that all keep=all)")
        intervals.append(interval)
        if sum(i.span for i in intervals) > MAX_SPAN:
            raise GridError(f"interval {n} {_quoted(part)} makes the grid span more than 100 years")
    return Grid(tuple(intervals))


def fit(grid: Grid, items: Sequence[T], creation: Callable[[T], int | float],
        anchor: int | float | None = None) -> tuple[list[T], list[T]]:
    """Split ``items`` into (kept, pruned) by ``grid``, both in the order given.

    ``creation`` gives each item's creation time (seconds since the epoch); ``anchor`` is the
    grid's "now", by default the newest creation among ``items``. Items of equal creation keep
    their given order: pass them oldest first (by createtxg) so ties break as ZFS made them.
    """
    if not items:
        return [], []
    when = [creation(item) for item in items]
    origin = max(when) if anchor is None else anchor
    buckets: dict[int, list[int]] = {}
    limits: dict[int, int | None] = {}
    keep_index: set[int] = set()
    for index, created in enumerate(when):
        age = origin - created
        if age <= 0:
            keep_index.add(index)
            continue
        found = grid.bucket(age)
        if found is None:
            continue
        bucket, limit = found
        buckets.setdefault(bucket, []).append(index)
        limits[bucket] = limit
    for bucket, members in buckets.items():
        members.sort(key=lambda i: (when[i], i))
        limit = limits[bucket]
        keep_index.update(members if limit is None else members[:limit])
    kept = [item for i, item in enumerate(items) if i in keep_index]
    pruned = [item for i, item in enumerate(items) if i not in keep_index]
    return kept, pruned
