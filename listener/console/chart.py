"""A group's RPO over the last 24 hours, drawn on the server as SVG coordinates.

The RPO at time t is t minus the creation time of the newest recovery point that had reached
the target by t. So it climbs with slope one between arrivals and drops at each arrival to the
new point's own age: a sawtooth. A sawtooth whose teeth creep upward (replications taking longer
than they used to) shows here before the status turns 'violated'. RPO events (status changes)
are marked where they happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

WINDOW_SECONDS = 24 * 3600.0
WIDTH, HEIGHT = 480.0, 90.0
STATUS_ORDER = ("ok", "unknown", "at_risk", "violated")


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    status: str
    title: str


@dataclass(frozen=True)
class Chart:
    polyline: str  # "x,y x,y ..." or "" with no recovery point at all
    target_y: float | None  # the RPO target's line
    peak_seconds: float  # what the top of the chart stands for
    markers: list[Marker] = field(default_factory=list)
    width: float = WIDTH
    height: float = HEIGHT

    def svg(self, group_id: str, name: str) -> Markup:
        """The chart as inline SVG. Built here rather than in a template: a page of 50 charts is
        thousands of numbers, which need no escaping; the words (the group's name, the events'
        reasons) are escaped one by one."""
        from listener.console.render import duration

        w, h, peak = self.width, self.height, escape(duration(self.peak_seconds))
        parts = [f'<svg class="rpo-chart" data-group-id="{escape(group_id)}" viewBox="0 0 {w} {h}"'
                 f' preserveAspectRatio="none" role="img" aria-label="RPO over the last 24 hours, up to {peak}">'
                 f'<title>RPO of {escape(name)} over the last 24 hours (top of chart: {peak})</title>'
                 f'<rect class="frame" x="0" y="0" width="{w}" height="{h}"></rect>']
        if self.target_y is not None:
            parts.append(f'<line class="target" x1="0" x2="{w}" y1="{self.target_y}" y2="{self.target_y}"></line>')
        if self.polyline:
            parts.append(f'<polyline class="rpo" points="{self.polyline}"></polyline>')
        parts += [f'<circle class="event {escape(m.status)}" cx="{m.x}" cy="{m.y}" r="3">'
                  f'<title>{escape(m.title)}</title></circle>' for m in self.markers]
        parts.append("</svg>")
        return Markup("".join(parts))


def sawtooth(points: Sequence[Sequence[float]], start: float, end: float) -> list[tuple[float, float]]:
    """(time, rpo seconds) vertices of the RPO curve from ``start`` to ``end``; ``points`` are
    (created, arrived) epochs, in any order."""
    arrivals = sorted((float(a), float(c)) for c, a in points)
    newest: float | None = None
    for arrived, created in arrivals:
        if arrived <= start:
            newest = created if newest is None else max(newest, created)
    out: list[tuple[float, float]] = []
    if newest is not None:
        out.append((start, start - newest))
    for arrived, created in arrivals:
        if not start < arrived <= end:
            continue
        if newest is not None:
            out.append((arrived, arrived - newest))
        newest = created if newest is None else max(newest, created)
        out.append((arrived, max(0.0, arrived - newest)))
    if newest is not None:
        out.append((end, end - newest))
    return out


def draw(points: Sequence[Sequence[float]], events: Sequence[Sequence[Any]], now: float,
         rpo_minutes: float | None) -> Chart:
    start = now - WINDOW_SECONDS
    curve = sawtooth(points, start, now)
    target = rpo_minutes * 60.0 if rpo_minutes else None
    peak = max([rpo for _, rpo in curve] + [target * 1.25 if target else 60.0])
    peak = max(peak, 1.0)

    def x(t: float) -> float:
        return round((t - start) / WINDOW_SECONDS * WIDTH, 1)

    def y(rpo: float) -> float:
        return round(HEIGHT - min(rpo, peak) / peak * (HEIGHT - 4.0), 1)

    markers = []
    for at, status, rpo, reason in events:
        if float(at) < start:
            continue
        level = float(rpo) if rpo is not None else 0.0
        markers.append(Marker(x(float(at)), y(level), str(status), f"{status}: {reason}"))
    # The polyline is most of the work of a page of charts: one multiply-add and one format per
    # coordinate (the same one-decimal figures x() and y() give), no function call per vertex.
    sx, top, scale = WIDTH / WINDOW_SECONDS, HEIGHT, (HEIGHT - 4.0) / peak
    return Chart(
        polyline=" ".join(f"{(t - start) * sx:.1f},{top - min(r, peak) * scale:.1f}" for t, r in curve),
        target_y=y(target) if target else None,
        peak_seconds=peak,
        markers=markers,
    )
