"""The listener's HTTP face (Starlette under uvicorn, in the listener's own event loop).

    POST /webhooks/supabase   a Supabase database webhook: a wake-up hint, nothing more
    GET  /healthz             the process is alive
    GET  /readyz              the store answers and every configured source is connected
    GET  /metrics             Prometheus text format
    GET  /, /groups/<id>, /runs/<id>, /feed, /login ...   the DR console (listener/console, docs/console.md)

The webhook's checks run cheapest and least revealing first: is the endpoint on (a secret is
configured), is the bearer secret right (constant-time), is the body small enough (the declared
Content-Length, then counted while reading, since a chunked body declares nothing), is it JSON,
is it a webhook body. No body is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.metrics import Metrics
from listener.sources import Source
from listener.sources.webhook import BadWebhook, WebhookEvent, WebhookSource
from listener.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from listener.console import Console
    from listener.service import Listener

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
PING_TIMEOUT = 5.0


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _authorized(header: str | None, secret: str) -> bool:
    if header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    # Compare bytes: compare_digest on str refuses non-ASCII, and headers arrive latin-1 decoded.
    ok = hmac.compare_digest(token.strip().encode("latin-1", "replace"), secret.encode("utf-8"))
    return ok and scheme.lower() == "bearer"


def create_app(*, secret: str | None, webhook: WebhookSource | None, store: Store,
               sources: Sequence[Source], metrics: Metrics, max_body: int = MAX_BODY,
               console: Console | None = None) -> Starlette:
    def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
        metrics.webhook_requests.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    async def supabase_webhook(request: Request) -> Response:
        if not secret or webhook is None:
            return answer(503, {"error": "the webhook endpoint is off: set ZERFAUX_WEBHOOK_SECRET and send it "
                                         "as 'Authorization: Bearer <secret>' (docs/deploy-supabase.md)"})
        if not _authorized(request.headers.get("authorization"), secret):
            log.debug("webhook: rejected a request without the right bearer secret")
            return answer(401, {"error": "missing or wrong 'Authorization: Bearer <ZERFAUX_WEBHOOK_SECRET>'"},
                          {"WWW-Authenticate": "Bearer"})
        try:
            raw = await _read_body(request, max_body)
        except _TooLarge:
            return answer(413, {"error": f"body over {max_body} bytes"})
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return answer(400, {"error": "body is not JSON"})
        try:
            event = WebhookEvent.parse(body)
        except BadWebhook as exc:
            return answer(422, {"error": str(exc), "field": exc.field})
        log.debug("webhook: %s on %s.%s", event.type, event.schema, event.table)
        webhook.deliver(event)
        return answer(202, {"accepted": True})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        reasons = []
        try:
            await asyncio.wait_for(store.ping(), PING_TIMEOUT)
        except (StoreUnavailable, asyncio.TimeoutError, OSError) as exc:
            log.warning("readyz: the store does not answer: %s", exc or "timed out")
            reasons.append("store: not answering (see the listener's log)")
        state = {s.name: bool(s.connected) for s in sources}
        reasons += [f"source {name}: not connected" for name, up in state.items() if not up]
        status = 503 if reasons else 200
        return JSONResponse({"ready": not reasons, "sources": state, "reasons": reasons}, status_code=status)

    async def prometheus(request: Request) -> Response:
        metrics.observe_sources(sources)
        await metrics.observe_protection(store)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    extra = []
    if console is not None:
        from listener.console import routes as console_routes

        extra = console_routes(console)
    return Starlette(routes=[
        Route("/webhooks/supabase", supabase_webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *extra,
    ])


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the listener's loop: the listener owns SIGTERM, uvicorn must not catch it
    (it would re-raise it after its own shutdown and cut the dispatcher's drain short)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def build_server(app: Starlette, host: str, port: int) -> uvicorn.Server:
    return _EmbeddedServer(uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        server_header=False, timeout_graceful_shutdown=3,
    ))


async def run_server(server: uvicorn.Server, webhook: WebhookSource | None = None) -> None:
    """Serve until cancelled, then shut down cleanly (close sockets, finish requests)."""
    task = asyncio.ensure_future(server.serve())
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if webhook is not None and server.started:
            webhook.connected = True
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await asyncio.wait([task], timeout=10)
        raise
    except SystemExit:  # uvicorn's answer to a port it cannot bind (it has logged why)
        log.error("HTTP: could not serve on port %s; webhooks, /readyz and /metrics are off",
                  server.config.port)
    finally:
        if webhook is not None:
            webhook.connected = False


async def serve_http(listener: Listener, host: str | None = None) -> None:
    """The HTTP app for this listener on ZERFAUX_HTTP_PORT until the listener stops."""
    from listener.console import build_console
    from listener.service import database_url

    settings = listener.settings
    webhook = next((s for s in listener.sources if isinstance(s, WebhookSource)), None)
    console = build_console(database_url(settings), settings.jwt_secret, settings.jwks_url)
    app = create_app(secret=settings.webhook_secret, webhook=webhook, store=listener.store,
                     sources=listener.sources, metrics=listener.metrics, console=console)
    bind = host or settings.http_host
    log.info("HTTP on %s:%s (webhook %s, console %s)", bind, settings.http_port, "on" if webhook else "off",
             "on" if console.off_reason is None else f"off: {console.off_reason}")
    console.start_feed()
    try:
        await run_server(build_server(app, bind, settings.http_port or 0), webhook)
    finally:
        await console.stop()
