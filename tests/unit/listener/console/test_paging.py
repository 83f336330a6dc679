"""The groups page's paging: the page number a person may ask for, and what a page says."""

from __future__ import annotations

import pytest

from listener.console import paging


@pytest.mark.parametrize("raw, page", [(None, 1), ("", 1), ("1", 1), (" 3 ", 3), ("20", 20)])
def test_a_page_number_is_a_whole_number_from_one(raw: str | None, page: int) -> None:
    assert paging.parse_page(raw) == page


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "1e3", "9999999999", "<b>"])
def test_anything_else_names_the_field_and_the_fix(raw: str) -> None:
    with pytest.raises(paging.BadPage, match=r"^page: .* use a whole number from 1, e\.g\. \?page=2"):
        paging.parse_page(raw)


def counts(total: int, ids: list[str | None]) -> list[dict[str, object]]:
    head = {"total": total, "n_violated": 3, "n_at_risk": 2, "n_unknown": 1, "n_ok": total - 6, "n_paused": 4}
    return [{**head, "id": i} for i in ids]


def test_a_middle_page_says_which_groups_it_shows_of_all() -> None:
    groups, p = paging.split(counts(120, [f"g{i}" for i in range(50)]), 2)
    assert len(groups) == 50 and (p.page, p.pages, p.total, p.first, p.last) == (2, 3, 120, 51, 100)
    assert p.counts == {"violated": 3, "at_risk": 2, "unknown": 1, "ok": 114} and p.paused == 4
    assert not p.past_last and p.href(1) == "/" and p.href(3) == "/?page=3"


def test_the_last_page_and_past_it() -> None:
    groups, p = paging.split(counts(120, [f"g{i}" for i in range(20)]), 3)
    assert (p.first, p.last, p.past_last) == (101, 120, False)
    groups, p = paging.split(counts(120, [None]), 7)  # the counts row alone
    assert groups == [] and p.past_last and p.pages == 3 and p.first == p.last == 0


def test_no_group_at_all_is_one_empty_page() -> None:
    groups, p = paging.split(counts(0, [None])[:1], 1)
    assert groups == [] and p.pages == 1 and p.total == 0 and not p.past_last
