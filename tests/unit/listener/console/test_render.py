"""How times read on the console's pages."""

from __future__ import annotations

from datetime import datetime, timezone

from listener.console.render import when


def test_a_time_reads_the_same_from_the_database_and_from_vcenters_iso_text() -> None:
    at = datetime(2026, 12, 1, 16, 8, 22, 161128, tzinfo=timezone.utc)
    assert when(at) == when("2026-12-01T16:08:22.161128+00:00") == "2026-12-01 16:08:22 UTC"
    assert when("2026-12-01T17:08:22+01:00") == "2026-12-01 16:08:22 UTC"
    assert when("2026-12-01T16:08:22Z") == "2026-12-01 16:08:22 UTC"


def test_nothing_and_text_that_is_no_time() -> None:
    assert when(None) == "—"
    assert when("soon") == "soon"


def test_any_other_value_is_shown_as_it_is() -> None:
    assert when(42) == "42" and when({"a": 1}) == "{'a': 1}"
