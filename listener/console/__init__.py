"""The DR console (docs/console.md): pages and buttons served by the listener's own HTTP app.

Every button is a row edit in a transaction as the signed-in user, exactly as a frontend app
would make it; the database's row-level security and rules decide, and a refusal is shown in
the database's words. Nothing is loaded from anywhere but this listener.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from listener.console.auth import (COOKIE, Identity, KeysUnavailable, NotSignedIn, Verifier, read_form, seconds_left,
                                   wants_html)
from listener.console.feed import Feed
from listener.console.queries import ConsoleDB
from listener.console.render import page

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
COOKIE_TOKEN_LIMIT = 3900  # bytes of JWT: the cookie's name and attributes fit in a browser's 4096


@dataclass
class Console:
    verifier: Verifier
    db: ConsoleDB | None  # None: no direct Postgres (PostgREST only), the console is off
    feed: Feed | None
    off_reason: str | None = None

    def start_feed(self) -> None:
        """The feed's tasks in the running loop (the database is opened on first use, so a
        database that is down at start does not keep the HTTP app from serving /healthz)."""
        if self.feed is not None and self.off_reason is None:
            self.feed.start()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()
        if self.db is not None:
            await self.db.close()


def build_console(conninfo: str | None, jwt_secret: str | None, jwks_url: str | None) -> Console:
    verifier = Verifier(jwt_secret, jwks_url)
    if conninfo is None:
        return Console(verifier, None, None,
                       "the console needs a direct Postgres connection (DATABASE_URL, or the embedded "
                       "database); with SUPABASE_URL alone it is off (docs/console.md, 'PostgREST mode')")
    db = ConsoleDB(conninfo)
    reason = None if verifier.configured else (
        "no key to check sign-ins with: set ZERFAUX_JWT_SECRET (the project's JWT secret) or "
        "ZERFAUX_JWKS_URL (its JWKS) and restart the listener")
    return Console(verifier, db, Feed(conninfo, db), reason)


def unauthorized(request: Request, reason: str) -> Response:
    if wants_html(request):
        response = RedirectResponse(f"/login?why={_why_code(reason)}", status_code=303)
        if request.cookies.get(COOKIE) is not None and reason != "not signed in":
            response.delete_cookie(COOKIE, path="/")
        return response
    return JSONResponse({"error": f"not signed in: {reason}",
                         "fix": "send 'Authorization: Bearer <a Supabase user JWT>'"},
                        status_code=401, headers={"WWW-Authenticate": 'Bearer realm="zerfaux"'})


# The login page says why in fixed words chosen by a code, so a link cannot put text on it.
WHY = {
    "none": "Sign in with a Supabase user token.",
    "expired": "Your token has expired: sign in again for a fresh one.",
    "invalid": "That token was refused: its signature does not match this project's key.",
    "role": "That token is not a signed-in person's (role 'authenticated'); service and anonymous keys cannot sign in.",
    "other": "That token was refused.",
}


def _why_code(reason: str) -> str:
    if reason == "not signed in":
        return "none"
    if "expired" in reason:
        return "expired"
    if "signature" in reason or "not a JWT" in reason:
        return "invalid"
    if "role" in reason or "audience" in reason:
        return "role"
    return "other"


async def signed_in(console: Console, request: Request) -> Identity | Response:
    """The caller, or the answer for one who is not (303 to /login or 401, 503 when off)."""
    if console.db is None or console.off_reason is not None:
        return off(console, request)
    try:
        return await console.verifier.identify(request)
    except KeysUnavailable as exc:
        log.warning("console: cannot check a sign-in now: %s", exc)
        if wants_html(request):
            return page(request, "message.html", {"title": "Cannot check your sign-in now", "message": (
                f"{exc}. Your session is kept: reload in a moment.")}, status=503, headers={"Retry-After": "10"})
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "10"})
    except NotSignedIn as exc:
        log.debug("console: not signed in: %s", exc)
        return unauthorized(request, str(exc))


def off(console: Console, request: Request) -> Response:
    reason = console.off_reason or "the console is off"
    if wants_html(request):
        return page(request, "off.html", {"reason": reason}, status=503)
    return JSONResponse({"error": reason}, status_code=503)


def routes(console: Console) -> list[BaseRoute]:
    from listener.console import actions, pages

    async def login_form(request: Request) -> Response:
        if console.off_reason is not None:
            return off(console, request)
        why = WHY.get(request.query_params.get("why", "none"), WHY["other"])
        return page(request, "login.html", {"why": why, "error": None, "signed": None})

    async def login(request: Request) -> Response:
        if console.off_reason is not None:
            return off(console, request)
        token = (await read_form(request)).get("token", "").strip()
        try:
            identity = await console.verifier.verify(token, via_cookie=True)
        except NotSignedIn as exc:
            return page(request, "login.html", {"why": WHY["none"], "error": f"Not signed in: {exc}.",
                                                "signed": None}, status=401)
        if len(identity.token) > COOKIE_TOKEN_LIMIT:
            # A browser silently drops a cookie over 4096 bytes: the person would be sent back
            # here with no word of why.
            return page(request, "login.html", {"why": WHY["none"], "signed": None, "error": (
                f"Not signed in: this token is {len(identity.token)} bytes, too long for a browser's cookie "
                f"(at most {COOKIE_TOKEN_LIMIT}); send it as 'Authorization: Bearer' from a script instead.")},
                status=400)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, identity.token, max_age=seconds_left(identity), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        log.info("console: %s signed in", identity.user_id)
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),  # a link elsewhere cannot sign a person out
        *pages.routes(console),
        *actions.routes(console),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def context(console: Console, identity: Identity, **extra: Any) -> dict[str, Any]:
    return {"me": identity, "csrf": console.verifier.csrf_token(identity), **extra}
