"""The buttons: each is one row edit in one transaction as the signed-in user, as a frontend app
would make it. The database decides (RLS, column grants, the rules' triggers); a refusal is shown
in its own words. Nothing here checks a role: a viewer's click goes to the database like anyone's.

CSRF: the session cookie is SameSite=Strict, every form carries a per-session token (an HMAC of
the session's JWT), and a request whose Origin header names another site is refused. A request
signed with ``Authorization: Bearer`` needs no token (a browser never adds that header by itself).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from listener.console.auth import Identity, read_form, wants_html
from listener.console.pages import failed, load_group, not_found, parse_id
from listener.console.queries import Refused, Unavailable
from listener.console.render import page

if TYPE_CHECKING:
    from listener.console import Console

log = logging.getLogger(__name__)

# Recovery runs a button may ask for, and what each does, in the words of the confirmation page.
RUN_KINDS: dict[str, str] = {
    "test": "Test failover: the VMs below power on at the DR site from a writable clone of the recovery "
            "point, on the test networks, while replication goes on.",
    "cleanup": "Clean up the test: its test VMs are powered off and deleted, its test datastore, port group "
               "and clone removed, and the recovery point marked tested.",
    "planned_migration": "Planned migration: a replication runs while the VMs still run, they are shut down at "
                         "the site they run at (by reverse boot priority), the final delta is replicated and its "
                         "GUID checked, and the VMs below power on at the other site on the recovery networks. No "
                         "data is lost.",
    "failover": "Failover: the source VMs are powered off where the primary site still answers (fencing), and "
                "the VMs below power on at the DR site from the newest recovery point (or the one named), "
                "without waiting for the primary site. The group then awaits a commit or a rollback.",
    "commit": "Commit the failover: the DR site becomes where these VMs run; the way back is a reprotect, then "
              "a failback.",
    "rollback": "Roll the failover back: the VMs started at the DR site are powered off and their disks "
                "detached, and the replica returns to its pre-failover snapshot: what they wrote there is "
                "discarded. Replication resumes.",
    "reprotect": "Reprotect: replication is reversed, from the site the VMs run at back to the other, "
                 "incrementally; data the other site holds beyond the common snapshot is kept, not destroyed.",
}
SIMPLE = ("sync", "replicate", "pause", "resume")
ADMIN_KINDS = ("planned_migration", "failover", "commit", "rollback", "reprotect")
POWERS_ON = {"test": "test", "planned_migration": "recovery", "failover": "recovery"}
# Kinds that power VMs off and remove them at the DR site: the confirmation lists them too.
REMOVES = {"cleanup": "test", "rollback": "recovery"}


def same_origin(request: Request) -> bool:
    """No Origin, or one naming this host. Only the host is compared: behind a proxy that ends
    TLS the listener sees http while the browser says https, and refusing every form there would
    lock operators out. X-Forwarded-Host counts too: a cross-site page cannot set it."""
    origin = request.headers.get("origin")
    if origin is None:  # not every browser sends it on a same-origin POST; SameSite and the token remain
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandboxed frame, a data: URL) and anything else odd
    ours = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
    return parts.netloc.lower() in {h.lower() for h in ours}


def refusal(request: Request, console: Console, who: Identity, exc: Refused | Unavailable) -> Response:
    if wants_html(request):
        response = failed(request, console, who, exc)
        if isinstance(exc, Refused) and exc.sqlstate != "42501":
            response.status_code = 409
        return response
    if isinstance(exc, Unavailable):
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse({"error": exc.message, "sqlstate": exc.sqlstate, "hint": exc.hint},
                        status_code=403 if exc.sqlstate == "42501" else 409)


def nothing_changed(what: str) -> Refused:
    # An UPDATE that row-level security filters raises nothing: it changes no row. Say so.
    return Refused(f"the database changed no row: {what} is not a row you may change (row-level security)", None)


def done(request: Request, location: str, body: dict[str, Any]) -> Response:
    if wants_html(request):
        return RedirectResponse(location, status_code=303)
    return JSONResponse({"ok": True, **body})


def routes(console: Console) -> list[Route]:
    from listener.console import context, signed_in

    db = console.db

    async def checked(request: Request) -> tuple[Identity, str, dict[str, str]] | Response:
        who = await signed_in(console, request)
        if isinstance(who, Response):
            return who
        group = parse_id(request.path_params["id"])
        if group is None:
            return not_found(request, console, who, "That is not a group id.")
        form = await read_form(request)
        if not same_origin(request) or not console.verifier.csrf_ok(who, form.get("csrf")):
            log.warning("console: refused a form without this session's token or from another origin")
            return page(request, "message.html", context(console, who, title="Refused",
                        message="This form is not from this session (stale page or another site): "
                                "reload the page and try again."), status=403)
        return who, group, form

    async def simple(request: Request) -> Response:
        got = await checked(request)
        if isinstance(got, Response):
            return got
        who, group, _ = got
        action = request.path_params["action"]
        if action not in SIMPLE:
            return not_found(request, console, who, "No such action.")
        assert db is not None
        try:
            async with db.as_user(who) as s:
                if action == "sync":
                    rows = await s.rows("request_sync", {"group": group})
                    if not rows:
                        raise nothing_changed("no vCenter of this group")
                    body: dict[str, Any] = {"vcenters": [str(r["id"]) for r in rows]}
                elif action == "replicate":
                    body = {"id": str((await s.rows("replicate_now", {"group": group}))[0]["id"])}
                else:
                    rows = await s.rows("set_paused", {"group": group, "paused": action == "pause"})
                    if not rows:
                        raise nothing_changed("this group")
                    body = {"id": group}
        except (Refused, Unavailable) as exc:
            return refusal(request, console, who, exc)
        log.info("console: %s asked for %s in group %s", who.user_id, action, group)
        return done(request, f"/groups/{group}?done={action}", body)

    async def confirm(request: Request) -> Response:
        who = await signed_in(console, request)
        if isinstance(who, Response):
            return who
        assert db is not None
        group, kind = parse_id(request.path_params["id"]), request.path_params["kind"]
        if group is None or kind not in RUN_KINDS:
            return not_found(request, console, who, "No such action.")
        point = parse_id(request.query_params.get("point", "")) if request.query_params.get("point") else None
        test_run = parse_id(request.query_params.get("test_run", "")) if request.query_params.get("test_run") else None
        chosen = None
        try:
            async with db.as_user(who) as s:
                view = await load_group(s, group, db.has_runs)
                if view is not None and point is not None:
                    # The point the form will send, read by id (it may be older than the page's
                    # list): the confirmation names exactly what the run will use.
                    chosen = await s.one("group_point", {"group": group, "point": point})
        except (Refused, Unavailable) as exc:
            return failed(request, console, who, exc)
        if view is None:
            return not_found(request, console, who, "No such group, or you may not read it.")
        if point is not None and chosen is None:
            return not_found(request, console, who, "That recovery point is not one of this group's.")
        # What the database picks when no point is named (recovery_runs' trigger): the newest on the target.
        newest = next((p for p in view["points"] if p["on_target"] and p["removed_at"] is None), None)
        dr = next((v for v in view["vcenters"] if str(v["id"]) == str(view["dr_vcenter_id"])), None)
        return page(request, "confirm.html", context(
            console, who, g=view, kind=kind, what=RUN_KINDS[kind], network=POWERS_ON.get(kind),
            point=chosen or (newest if kind in POWERS_ON else None), point_id=point, test_run=test_run,
            dr=dr, admin_only=kind in ADMIN_KINDS, removes=REMOVES.get(kind)))

    async def start_run(request: Request) -> Response:
        got = await checked(request)
        if isinstance(got, Response):
            return got
        who, group, form = got
        kind = form.get("kind", "")
        if kind not in RUN_KINDS:
            return not_found(request, console, who, "No such kind of recovery run.")
        if form.get("confirm") != "yes":
            ids = {k: parse_id(form.get(k, "")) for k in ("point", "test_run")}
            query = "&".join(f"{k}={v}" for k, v in ids.items() if v)
            return RedirectResponse(f"/groups/{group}/confirm/{kind}" + (f"?{query}" if query else ""),
                                    status_code=303)
        assert db is not None
        params = {"group": group, "kind": kind, "point": parse_id(form.get("point", "")),
                  "test_run": parse_id(form.get("test_run", ""))}
        try:
            async with db.as_user(who) as s:
                run_id = str((await s.rows("start_run", params))[0]["id"])
        except (Refused, Unavailable) as exc:
            return refusal(request, console, who, exc)
        log.info("console: %s asked for a %s run in group %s: %s", who.user_id, kind, group, run_id)
        return done(request, f"/runs/{run_id}?done=run", {"id": run_id})

    return [
        Route("/groups/{id}/do/{action}", simple, methods=["POST"]),
        Route("/groups/{id}/confirm/{kind}", confirm, methods=["GET"]),
        Route("/groups/{id}/runs", start_run, methods=["POST"]),
    ]
