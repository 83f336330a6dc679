"""The pages: groups at a glance, one group, one recovery run and its printable report, and the
live feed. Each page is one transaction as the signed-in user with a fixed number of queries."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from listener.console import chart, paging
from listener.console.auth import Identity, seconds_left
from listener.console.queries import Refused, Session, Unavailable
from listener.console.render import page, percent

if TYPE_CHECKING:
    from listener.console import Console

log = logging.getLogger(__name__)

DONE = {  # ?done=<code>: what the last action did, in fixed words
    "sync": "Inventory sync requested.", "replicate": "Replication requested.",
    "pause": "Scheduled replication paused.", "resume": "Scheduled replication resumed.",
}


def job_view(job_id: Any, status: str | None, done: int | None, total: int | None,
             elapsed: float | None) -> dict[str, Any] | None:
    if job_id is None:
        return None
    done = int(done or 0)
    rate = done / elapsed if elapsed and elapsed > 0 and done else None
    eta = (total - done) / rate if rate and total and total > done else None
    return {"id": str(job_id), "status": status, "transferred": done, "estimated": total,
            "percent": percent(done, total), "rate": rate, "eta": eta}


def group_view(row: dict[str, Any]) -> dict[str, Any]:
    started = row.get("job_started_at")
    elapsed = (row["now_epoch"] - started.timestamp()) if started else None
    return {
        **row, "id": str(row["id"]),
        "job": job_view(row["job_id"], row["job_status"], row["bytes_transferred"], row["bytes_estimated"], elapsed),
        "chart": chart.draw(row["points"], row["events"], row["now_epoch"], row["rpo_minutes"]),
    }


def parse_id(raw: str) -> str | None:
    try:
        return str(UUID(raw))
    except ValueError:
        return None


def not_found(request: Request, console: Console, who: Identity, what: str) -> Response:
    from listener.console import context

    return page(request, "message.html", context(console, who, title="Not found", message=what), status=404)


def failed(request: Request, console: Console, who: Identity, exc: Refused | Unavailable) -> Response:
    from listener.console import context

    if isinstance(exc, Unavailable):
        return page(request, "message.html", context(console, who, title="Database unavailable",
                                                     message=str(exc)), status=503)
    return page(request, "refused.html", context(console, who, refusal=exc), status=403)


async def load_group(s: Session, group: str, has_runs: bool) -> dict[str, Any] | None:
    rows = await s.rows("groups", {"group": group})
    if not rows:
        return None
    view = group_view(rows[0])
    vms = await s.rows("group_vms", {"group": group})
    mappings = await s.rows("group_mappings", {"group": group})
    by_source = {m["source_network"]: m for m in mappings}
    for vm in vms:
        nets = vm["networks"] if isinstance(vm["networks"], list) else []
        vm["nics"] = [{"source": n, "mapping": by_source.get(n)} for n in nets if isinstance(n, str)]
    jobs = await s.rows("group_jobs", {"group": group})
    for j in jobs:
        j["view"] = job_view(j["id"], j["status"], j["bytes_transferred"], j["bytes_estimated"], j["elapsed_seconds"])
    view.update(vms=vms, mappings=mappings, points=await s.rows("group_points", {"group": group}), jobs=jobs,
                vcenters=await s.rows("group_vcenters", {"group": group}),
                runs=await s.rows("group_runs", {"group": group}) if has_runs else None)
    return view


def step_timeline(run: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """SVG coordinates of each step's bar, from the run's start to its last finished step."""
    times = [t for s in steps for t in (s["started_at"], s["finished_at"]) if t is not None]
    start = run["started_at"] or (min(times) if times else None)
    if start is None or not times:
        return {"bars": [], "span": 0.0}
    end = max([*times, start])
    span = max((end - start).total_seconds(), 1.0)
    now = datetime.now(timezone.utc)
    bars = []
    for i, s in enumerate(steps):
        if s["started_at"] is None:
            continue
        finish = s["finished_at"] or min(now, end)
        x = (s["started_at"] - start).total_seconds() / span * 600
        w = max((finish - s["started_at"]).total_seconds() / span * 600, 2.0)
        bars.append({"y": i * 14, "x": round(x, 1), "w": round(w, 1), "status": s["status"], "seq": s["seq"],
                     "label": f"{s['seq']} {s['name']}" + (f" {s['vm_name']}" if s["vm_name"] else "")})
    return {"bars": bars, "span": span, "height": len(steps) * 14 + 4}


class BoundedStream(StreamingResponse):
    """A stream that ends at its deadline even for a client that stopped reading: its sends
    would otherwise wait for ever on a full socket, keeping its watcher (and the feed's
    refreshes) alive past the token's expiry. Such a client is cut off ``SEND_GRACE`` seconds
    after the deadline (the server closes the connection)."""

    SEND_GRACE = 10.0

    def __init__(self, content: AsyncIterator[str], ends: float, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.ends = ends

    async def stream_response(self, send: Any) -> None:
        async def bounded(message: Any) -> None:
            await asyncio.wait_for(send(message), max(0.1, self.ends + self.SEND_GRACE - time.monotonic()))

        try:
            await super().stream_response(bounded)
        except asyncio.TimeoutError:
            log.info("console feed: cut off a client that stopped reading")
        finally:
            await _close(self.body_iterator)


async def _close(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def routes(console: Console) -> list[Route]:
    from listener.console import context, signed_in

    db = console.db

    async def groups(request: Request) -> Response:
        who = await signed_in(console, request)
        if isinstance(who, Response):
            return who
        assert db is not None
        try:
            number = paging.parse_page(request.query_params.get("page"))
        except paging.BadPage as exc:
            return page(request, "message.html", context(console, who, title="Bad page number",
                                                         message=str(exc)), status=400)
        try:
            async with db.as_user(who) as s:
                rows = await s.rows("groups_page", {"limit": paging.PAGE_SIZE,
                                                    "offset": (number - 1) * paging.PAGE_SIZE})
        except (Refused, Unavailable) as exc:
            return failed(request, console, who, exc)
        shown, pager = paging.split(rows, number)
        return page(request, "groups.html", context(console, who, groups=[group_view(r) for r in shown],
                                                    paging=pager,
                                                    notice=DONE.get(request.query_params.get("done", ""))))

    async def group(request: Request) -> Response:
        who = await signed_in(console, request)
        if isinstance(who, Response):
            return who
        assert db is not None
        group_id = parse_id(request.path_params["id"])
        if group_id is None:
            return not_found(request, console, who, "That is not a group id.")
        try:
            async with db.as_user(who) as s:
                view = await load_group(s, group_id, db.has_runs)
        except (Refused, Unavailable) as exc:
            return failed(request, console, who, exc)
        if view is None:
            return not_found(request, console, who, "No such group, or you may not read it.")
        return page(request, "group.html", context(console, who, g=view, has_runs=db.has_runs,
                                                   notice=DONE.get(request.query_params.get("done", ""))))

    async def run(request: Request) -> Response:
        who = await signed_in(console, request)
        if isinstance(who, Response):
            return who
        assert db is not None
        run_id = parse_id(request.path_params["id"])
        if run_id is None:
            return not_found(request, console, who, "That is not a run id.")
        row: dict[str, Any] | None = None
        steps: list[dict[str, Any]] = []
        try:
            async with db.as_user(who) as s:
                # Known only once the database has been opened (the first request after a start).
                if db.has_runs:
                    row = await s.one("run", {"run": run_id})
                    steps = await s.rows("run_steps", {"run": run_id}) if row else []
        except (Refused, Unavailable) as exc:
            return failed(request, console, who, exc)
        if not db.has_runs:
            return not_found(request, console, who, "No such recovery run (recovery runs need issue 13's migration).")
        if row is None:
            return not_found(request, console, who, "No such run, or you may not read it.")
        row["id"], row["protection_group_id"] = str(row["id"]), str(row["protection_group_id"])
        ctx = context(console, who, run=row, steps=steps, timeline=step_timeline(row, steps),
                      warnings=[s for s in steps if s["status"] == "warning"],
                      failures=[s for s in steps if s["status"] == "failed"],
                      notice="Recovery run requested." if request.query_params.get("done") == "run" else None)
        if request.url.path.endswith("/report"):
            return page(request, "report.html", ctx)
        if request.query_params.get("part") == "steps":
            return page(request, "run_steps.html", ctx)
        return page(request, "run.html", ctx)

    async def feed(request: Request) -> Response:
        who = await signed_in(console, request)
        if isinstance(who, Response):
            return who
        assert db is not None and console.feed is not None
        hub = console.feed
        try:
            async with db.as_user(who) as s:
                visible = [str(r["id"]) for r in await s.rows("visible_groups")]
        except (Refused, Unavailable) as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        if request.query_params.get("once") or "text/event-stream" not in request.headers.get("accept", ""):
            return JSONResponse({"groups": await hub.snapshot(visible)}, headers={"Cache-Control": "no-store"})
        ends = time.monotonic() + min(float(seconds_left(who)), hub.max_stream_seconds)

        async def stream() -> AsyncIterator[str]:
            watcher = hub.watch(visible)
            try:
                yield "retry: 3000\n\n"
                while time.monotonic() < ends:
                    changes = await watcher.take(timeout=min(15.0, max(0.1, ends - time.monotonic())))
                    if not changes:
                        yield ": ping\n\n"
                    for change in changes:
                        yield f"event: group\ndata: {json.dumps(change, default=str)}\n\n"
                yield "event: bye\ndata: {}\n\n"
            finally:
                hub.unwatch(watcher)

        return BoundedStream(stream(), ends, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return [
        Route("/", groups, methods=["GET"]),
        Route("/groups/{id}", group, methods=["GET"]),
        Route("/runs/{id}", run, methods=["GET"]),
        Route("/runs/{id}/report", run, methods=["GET"]),
        Route("/feed", feed, methods=["GET"]),
    ]
