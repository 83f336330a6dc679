"""Templates (Jinja2, autoescaped: a group named ``<script>`` is shown, never run) and the
filters that turn rows into words a person reads at 3 a.m."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

TEMPLATES = Path(__file__).with_name("templates")

STATUS_WORDS = {"ok": "OK", "at_risk": "at risk", "violated": "RPO violated", "unknown": "unknown"}


def duration(seconds: object) -> str:
    try:
        s = int(round(float(seconds)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # None, or a step's detail that is not a number
        return "—"
    if s < 0:
        return "—"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" if s % 60 == 0 else f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h" if s % 3600 == 0 else f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def size(n: float | int | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def when(value: object) -> str:
    """A time as a person reads it; ISO text from a step's detail (vCenter's bootTime) too."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value  # not a time: shown as it is (escaped), never an error page
    if value is None:
        return "—"
    if not isinstance(value, datetime):
        return str(value)  # a step's detail may hold anything: shown as it is (escaped)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(timezone.utc).isoformat()


def percent(done: int | None, total: int | None) -> int | None:
    if not total or done is None:
        return None
    return max(0, min(100, int(done * 100 / total)))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(duration=duration, size=size, when=when, iso=iso)
    env.globals.update(status_words=STATUS_WORDS, percent=percent)
    return env


ENV = _env()


def page(request: Request, template: str, context: dict[str, Any], status: int = 200,
         headers: dict[str, str] | None = None) -> HTMLResponse:
    body = ENV.get_template(template).render(request=request, **context)
    response = HTMLResponse(body, status_code=status, headers=headers)
    # No third-party anything: the pages load only their own CSS and script.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response
