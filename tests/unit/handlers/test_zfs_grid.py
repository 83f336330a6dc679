"""The retention grid against hand-made timelines: what stays is written out, not recomputed."""

from __future__ import annotations

import pytest

from handlers.backends.zfs.grid import EXAMPLE, Grid, GridError, Interval, fit, parse

H, D, W = 3600, 86400, 604800
T = 1_800_000_000  # the newest snapshot's creation


def grid(text: str) -> Grid:
    found = parse(text)
    assert found is not None
    return found


def hours_back(kept: list[int]) -> list[int]:
    return sorted((T - t) // H for t in kept)


def test_the_example_parses_into_its_intervals() -> None:
    assert grid(EXAMPLE).intervals == (Interval(1, H, None), Interval(24, H, 1), Interval(14, D, 1), Interval(8, W, 1))
    assert grid(" 3 x 5 m ( keep = 2 ) ").intervals == (Interval(3, 300, 2),)


def test_hourly_snapshots_over_30_days_with_the_example_grid() -> None:
    # 720 snapshots, one an hour, the newest at T (0 hours back) and the oldest 719 hours back.
    times = [T - k * H for k in range(719, -1, -1)]  # oldest first, as ZFS lists them
    kept, pruned = fit(grid(EXAMPLE), times, lambda t: t)
    # 0: the newest (the anchor). 1: the keep=all hour (age 1 h exactly is its older edge).
    # 2..25: one in each of the 24 hourly intervals. Then the oldest of each day back from
    # 25 h: 49, 73, ..., 361 (14 days). Then the oldest of each week back from 361 h: 529 and
    # 697; the third week (698..865) holds 698..719, of which 719 is the oldest.
    expected = [0, 1, *range(2, 26), 49, 73, 97, 121, 145, 169, 193, 217, 241, 265, 289, 313, 337, 361,
                529, 697, 719]
    assert hours_back(kept) == expected
    assert len(kept) == 43 and len(pruned) == 720 - 43
    assert kept == sorted(kept)  # in the order given


def test_older_than_the_grid_is_pruned() -> None:
    times = [T - 3 * D, T - 2 * D - 1, T - 2 * D, T - D, T]
    kept, pruned = fit(grid("2x1d"), times, lambda t: t)
    # T - 2d is exactly the grid's far edge: in the last interval, and the oldest there.
    assert kept == [T - 2 * D, T - D, T]
    assert pruned == [T - 3 * D, T - 2 * D - 1]


def test_an_edge_belongs_to_the_newer_interval() -> None:
    # 1x1h | 1x1h: ages (0, 1h] and (1h, 2h]. Age 1h sits in the first with 30m: only the
    # oldest of the two (1h) stays there.
    times = [T - 2 * H, T - H - 1, T - H, T - H // 2, T]
    kept, pruned = fit(grid("1x1h | 1x1h"), times, lambda t: t)
    assert kept == [T - 2 * H, T - H, T]
    assert pruned == [T - H - 1, T - H // 2]


def test_keep_n_keeps_the_n_oldest_and_all_keeps_all() -> None:
    times = [T - 50 * 60, T - 40 * 60, T - 30 * 60, T - 20 * 60, T]
    assert fit(grid("1x1h(keep=2)"), times, lambda t: t)[0] == [T - 50 * 60, T - 40 * 60, T]
    assert fit(grid("1x1h(keep=all)"), times, lambda t: t)[0] == times
    assert fit(grid("1x1h"), times, lambda t: t)[0] == [T - 50 * 60, T]


def test_empty_and_one_snapshot() -> None:
    assert fit(grid(EXAMPLE), [], lambda t: t) == ([], [])
    assert fit(grid("1x1s"), [T], lambda t: t) == ([T], [])


def test_equal_creation_keeps_the_first_given() -> None:
    items = [("a", T - 100), ("b", T - 100), ("now", T)]
    kept, pruned = fit(grid("1x1h"), items, lambda item: item[1])
    assert [name for name, _ in kept] == ["a", "now"] and [name for name, _ in pruned] == ["b"]


def test_an_injected_anchor_moves_the_grid() -> None:
    # Anchored a day after the newest: the hour-grid holds nothing any more...
    times = [T - H, T]
    assert fit(grid("1x1h | 1x1h"), times, lambda t: t, anchor=T + D) == ([], times)
    # ...and what is newer than the anchor always stays.
    assert fit(grid("1x1m"), times, lambda t: t, anchor=T - H) == (times, [])


def test_parse_refuses_with_the_interval_named() -> None:
    assert parse(None) is None
    with pytest.raises(GridError, match='interval 3 "1x1q" has unit "q"'):
        parse("1x1h | 2x1h | 1x1q")
    with pytest.raises(GridError, match="shorter than interval 1"):
        parse("1x1d | 1x1h")
