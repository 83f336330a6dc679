"""The HTTP app over real HTTP (uvicorn on loopback): webhook statuses, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listener.http import build_server, create_app, run_server
from listener.metrics import Metrics
from listener.sources.webhook import TABLES, WebhookSource
from listener.store_pg import PostgresStore
from tests.support.hints import Hints
from tests.support.pg import Database

SECRET = "whsec-Zx8r1Q-s3cret"
# One client for the module: building one loads a TLS context (about 60 ms), which would
# dominate the property tests' time.
http = httpx.Client(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


class Served:
    """The app under uvicorn in a thread (its own loop), so sync and async tests can call it."""

    def __init__(self, secret: str | None, store: Any, sources: list[Any] | None = None) -> None:
        self.hints = Hints()
        self.webhook = WebhookSource(self.hints.wake, self.hints.poke)
        self.metrics = Metrics()
        self.sources = [self.webhook, *(sources or [])]
        app = create_app(secret=secret, webhook=self.webhook, store=store, sources=self.sources, metrics=self.metrics)
        self._server = build_server(app, "127.0.0.1", 0)
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Served:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _start(self) -> None:
        self._task = asyncio.ensure_future(run_server(self._server, self.webhook))
        while not self._server.started:
            await asyncio.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._task is not None
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class DeadStore:
    """Stands for an unreachable database in /readyz (the webhook never touches the store)."""

    description = "nowhere"

    async def ping(self) -> None:
        from listener.store import StoreUnavailable

        raise StoreUnavailable("nowhere does not answer")


@pytest.fixture
def served() -> Iterator[Served]:
    with Served(SECRET, DeadStore()) as app:
        yield app


def body(table: str = "operations", schema: str = "zerfaux", kind: str = "INSERT", **record: Any) -> dict[str, Any]:
    return {"type": kind, "table": table, "schema": schema, "record": {"id": "x", **record}, "old_record": None}


def post(served: Served, content: Any, auth: str | None = f"Bearer {SECRET}", **headers: str) -> httpx.Response:
    if auth is not None:
        headers["Authorization"] = auth
    if not isinstance(content, (bytes, str)) and not hasattr(content, "__next__"):
        content = json.dumps(content)
    return http.post(f"{served.url}/webhooks/supabase", content=content, headers=headers)


def test_a_valid_body_is_accepted_and_wakes(served: Served) -> None:
    answer = post(served, body())
    assert answer.status_code == 202 and served.hints.wakes == 1 and served.hints.pokes == 0


def test_every_watched_table_is_accepted(served: Served) -> None:
    for schema, table in sorted(TABLES):
        assert post(served, body(table, schema, "UPDATE")).status_code == 202
    assert post(served, {"type": "DELETE", "table": "vcenters", "schema": "public", "record": None,
                         "old_record": {"id": "x"}}).status_code == 202
    assert served.hints.wakes == len(TABLES) + 1


def test_a_cancel_request_pokes(served: Served) -> None:
    assert post(served, body("replication_jobs", "public", "UPDATE", cancel_requested=True)).status_code == 202
    assert served.hints.pokes == 1
    assert post(served, body("replication_jobs", "public", "UPDATE", cancel_requested="true")).status_code == 202
    assert served.hints.pokes == 1  # only a real boolean true counts


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {SECRET}", SECRET, f"Bearer {SECRET}x", "Bearer", ""])
def test_a_missing_or_wrong_secret_is_401_and_never_wakes(served: Served, auth: str | None) -> None:
    answer = post(served, body(), auth=auth)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert served.hints.wakes == 0


def test_a_body_over_one_mebibyte_is_413_by_length_or_by_counting(served: Served) -> None:
    big = b"x" * (1024 * 1024 + 1)
    assert post(served, big).status_code == 413

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to check
        for _ in range(20):
            yield b" " * 65536

    assert post(served, chunks()).status_code == 413
    assert post(served, json.dumps(body()).encode() + b" " * 1000).status_code == 202
    assert served.hints.wakes == 1


def test_not_json_is_400(served: Served) -> None:
    for content in (b"", b"{", b"\xff\xfe", b"nope", b"[" * 100000):
        assert post(served, content).status_code == 400
    assert served.hints.wakes == 0


@pytest.mark.parametrize(("content", "field"), [
    ([], "body"), ('"a string"', "body"), ({"table": "operations", "schema": "zerfaux"}, "type"),
    (body(kind="TRUNCATE"), "type"), (body(table="users", schema="auth"), "table"),
    (body(table="operations", schema="public"), "table"), ({**body(), "schema": 1}, "schema"),
    ({**body(), "table": None}, "table"), ({**body(), "record": [1]}, "record"),
    ({**body(), "record": None}, "record"), ({**body(), "old_record": "x"}, "old_record"),
])
def test_json_of_the_wrong_shape_is_422_naming_the_field(served: Served, content: Any, field: str) -> None:
    answer = post(served, content)
    assert answer.status_code == 422 and answer.json()["field"] == field
    assert served.hints.wakes == 0


def test_with_no_secret_configured_the_endpoint_is_off() -> None:
    with Served(None, DeadStore()) as served:
        for auth in (None, "Bearer", f"Bearer {SECRET}"):
            answer = post(served, body(), auth=auth)
            assert answer.status_code == 503 and "ZERFAUX_WEBHOOK_SECRET" in answer.json()["error"]
        assert served.hints.wakes == 0


# What h11 lets a client send: visible ASCII, no surrounding whitespace.
_headers = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(str.strip)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_shaped = st.fixed_dictionaries({
    "type": st.sampled_from(["INSERT", "UPDATE", "DELETE", "insert", ""]) | _json,
    "table": st.sampled_from(sorted(t for _, t in TABLES) + ["users"]) | _json,
    "schema": st.sampled_from(["public", "zerfaux", "auth"]) | _json,
    "record": st.none() | st.dictionaries(st.sampled_from(["id", "cancel_requested"]), _json, max_size=2) | _json,
    "old_record": st.none() | _json,
})
_bodies = st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode()) | _shaped.map(lambda v: json.dumps(v).encode())
_auths = st.none() | _headers | st.just(f"Bearer {SECRET}") | _headers.map(lambda t: f"Bearer {t}".strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_bodies, auth=_auths, content_type=st.none() | _headers)
def test_random_requests_never_5xx_and_never_wake_without_the_secret(
    served: Served, content: bytes, auth: str | None, content_type: str | None
) -> None:
    before = served.hints.wakes
    headers = {"Content-Type": content_type} if content_type is not None else {}
    answer = post(served, content, auth=auth, **headers)
    assert answer.status_code in (202, 400, 401, 413, 422)
    if auth != f"Bearer {SECRET}":
        assert answer.status_code == 401
    assert served.hints.wakes == before + (1 if answer.status_code == 202 else 0)
    assert http.get(f"{served.url}/healthz").status_code == 200


@pytest.fixture
def served_off() -> Iterator[Served]:
    with Served(None, DeadStore()) as app:
        yield app


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_bodies, auth=_auths)
def test_random_requests_to_an_endpoint_without_a_secret_never_wake(
    served_off: Served, content: bytes, auth: str | None
) -> None:
    assert post(served_off, content, auth=auth).status_code == 503
    assert served_off.hints.wakes == 0


def test_healthz_readyz_and_metrics(db: Database) -> None:
    store = PostgresStore(db.url, pool_size=2)

    class Flaky:
        name = "realtime"
        connected = False

    flaky = Flaky()
    with Served(SECRET, store, [flaky]) as served:
        asyncio.run_coroutine_threadsafe(store.open(), served._loop).result(15)
        try:
            assert http.get(f"{served.url}/healthz").json() == {"status": "alive"}
            ready = http.get(f"{served.url}/readyz")
            assert ready.status_code == 503 and ready.json()["reasons"] == ["source realtime: not connected"]
            flaky.connected = True
            ready = http.get(f"{served.url}/readyz")
            assert ready.status_code == 200 and ready.json()["sources"] == {"webhook": True, "realtime": True}
            post(served, body())
            post(served, body(), auth=None)
            text = http.get(f"{served.url}/metrics").text
            assert 'zerfaux_source_connected{source="webhook"} 1.0' in text
            assert 'zerfaux_source_connected{source="realtime"} 1.0' in text
            assert 'zerfaux_webhook_requests_total{status="202"} 1.0' in text
            assert 'zerfaux_webhook_requests_total{status="401"} 1.0' in text
            assert "zerfaux_claim_latency_seconds_bucket" in text
        finally:
            asyncio.run_coroutine_threadsafe(store.close(), served._loop).result(15)


def test_readyz_names_a_store_that_does_not_answer(served: Served) -> None:
    ready = http.get(f"{served.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["reasons"] == ["store: not answering (see the listener's log)"]
