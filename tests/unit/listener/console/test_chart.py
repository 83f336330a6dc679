"""The RPO sawtooth: climbs with slope one between arrivals, drops at each arrival to the new
point's own age; nothing is drawn before the first point."""

from __future__ import annotations

from listener.console.chart import WINDOW_SECONDS, draw, sawtooth


def test_the_rpo_drops_at_each_arrival_to_the_points_age() -> None:
    # Points created at 0 and 100, each arriving 10 s after it was taken.
    curve = sawtooth([(0, 10), (100, 110)], start=0, end=200)
    assert curve == [(10, 10), (110, 110), (110, 10), (200, 100)]


def test_a_point_from_before_the_window_starts_the_curve() -> None:
    assert sawtooth([(-50, -40)], start=0, end=30) == [(0, 50), (30, 80)]


def test_no_point_no_curve_but_the_target_line() -> None:
    chart = draw([], [], now=WINDOW_SECONDS, rpo_minutes=15)
    assert chart.polyline == "" and chart.target_y is not None and chart.markers == []


def test_events_become_markers_and_the_target_sits_below_the_peak() -> None:
    now = WINDOW_SECONDS * 2
    chart = draw([(now - 4000, now - 3990)], [(now - 60, "violated", 3900, "no replication")], now, 15)
    assert [m.status for m in chart.markers] == ["violated"]
    assert chart.peak_seconds >= 3990
    assert chart.target_y is not None and chart.target_y > chart.markers[0].y  # y grows downward
