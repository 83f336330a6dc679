"""The DR console attacked, over real HTTP on real Postgres: forged and odd tokens, cross-site
forms, hostile text in every row a page shows, one person's identity reaching another's request,
people with no role or a viewer's role pressing every button, ids that are not ids, feeds that
are never read or outlive their token, and a console database that hangs or is down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.conftest import DR, GROUP, PRIMARY, add_groups, add_vm, protect
from tests.support.console import SECRET, ConsoleServer, grant, make_jwt
from tests.support.pg import Database
from tests.support.tcp_proxy import tcp_proxy

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}


@pytest.fixture
def served(seeded_db: Database) -> Iterator[ConsoleServer]:
    with ConsoleServer(seeded_db, poll_seconds=30.0) as server:
        yield server


def client(server: ConsoleServer, token: str | None = None, **kw: Any) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, timeout=30, headers=headers, **kw)


def sign_in(server: ConsoleServer, token: str) -> httpx.Client:
    c = client(server)
    r = c.post("/login", data={"token": token}, headers=HTML)
    assert r.status_code == 303, r.text
    return c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def claims(user: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "aud": "authenticated", "role": "authenticated", "iat": now, "exp": now + 600, **extra}


@contextlib.contextmanager
def jwks_server(body: bytes, *, hold: threading.Event | None = None, status: int = 200) -> Iterator[tuple[str, list[str]]]:
    """A JWKS endpoint on loopback; ``hold`` keeps each answer back until it is set."""
    hits: list[str] = []

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            if hold is not None:
                hold.wait(30)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{http.server_address[1]}/auth/v1/.well-known/jwks.json", hits
    finally:
        if hold is not None:
            hold.set()
        http.shutdown()
        http.server_close()


def rsa_jwks() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return key, json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256", "use": "sig"}]}).encode()


# --- tokens ----------------------------------------------------------------------------------

def _unsigned(body: dict[str, Any], alg: str) -> str:
    def part(obj: dict[str, Any]) -> str:
        import base64

        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(body)}."


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", "HS512", "RS256", "PS256"])
def test_unsigned_or_unexpected_algorithms_get_no_page(served: ConsoleServer, seeded_db: Database, alg: str) -> None:
    user = grant(seeded_db, "admin")
    token = _unsigned(claims(user), alg)
    with client(served, token) as c:
        r = c.get("/", headers=JSON)
        assert r.status_code == 401, r.text
    with client(served) as c:
        r = c.post("/login", data={"token": token}, headers=HTML)
        assert r.status_code == 401 and "set-cookie" not in r.headers


def test_hs256_signed_with_the_jwks_public_key_is_refused(seeded_db: Database) -> None:
    """The classic confusion: the attacker knows the public key and signs HS256 with it."""
    key, body = rsa_jwks()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    user = grant(seeded_db, "admin")
    good = jwt.encode(claims(user), key, algorithm="RS256", headers={"kid": "k1"})
    # PyJWT itself refuses a PEM as an HMAC key; sign by hand as an attacker would.
    import base64
    import hashlib
    import hmac

    head = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims(user)).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(pem, head + b"." + payload, hashlib.sha256).digest()).rstrip(b"=")
    forged = b".".join([head, payload, signature]).decode()
    with jwks_server(body) as (url, _):
        for secret in (None, SECRET):  # JWKS only, and JWKS beside the project's secret
            with ConsoleServer(seeded_db, secret=secret, jwks_url=url) as server:
                with client(server, good) as c:
                    assert c.get("/", headers=JSON).status_code == 200
                with client(server, forged) as c:
                    r = c.get("/", headers=JSON)
                    assert r.status_code == 401, r.text


def _signed_rs256(key: rsa.RSAPrivateKey, header: dict[str, Any], body: dict[str, Any]) -> str:
    """Signed by hand: PyJWT will not put a kid that is not a string in a header."""
    import base64

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing = b64(json.dumps({"alg": "RS256", "typ": "JWT", **header}).encode()) + b"." + b64(json.dumps(body).encode())
    algorithm = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256)
    return (signing + b"." + b64(algorithm.sign(signing, key))).decode()


@pytest.mark.parametrize("kid", ["../../../../etc/passwd", "' or 1=1 --", "k1\x00", "K1", "x" * 5000, 17, None])
def test_a_kid_that_is_not_the_projects_gets_no_page(seeded_db: Database, kid: Any) -> None:
    key, body = rsa_jwks()
    user = grant(seeded_db, "admin")
    token = _signed_rs256(key, {} if kid is None else {"kid": kid}, claims(user))
    with jwks_server(body) as (url, hits):
        with ConsoleServer(seeded_db, secret=None, jwks_url=url) as server:
            with client(server, token) as c:
                for _ in range(5):
                    assert c.get("/", headers=JSON).status_code == 401
        # An unknown kid may refresh the keys once; five tries are not five fetches.
        assert len(hits) <= 2


def test_a_jwks_that_does_not_answer_holds_none_of_the_engines_threads(seeded_db: Database) -> None:
    """Anyone can send a token naming an unknown key (no valid signature needed). While the
    project's JWKS does not answer (a DR site cut off from the internet), such tokens must not
    take the loop's default executor, which the handlers' pyVmomi and ZFS calls run on."""
    _, body = rsa_jwks()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    user = grant(seeded_db, "admin")
    hold = threading.Event()
    with jwks_server(body, hold=hold, status=503) as (url, hits):
        with ConsoleServer(seeded_db, secret=SECRET, jwks_url=url) as server:
            tokens = [jwt.encode(claims(user), stranger, algorithm="RS256", headers={"kid": f"k-{i}"})
                      for i in range(12)]

            def ask(token: str) -> int:
                with client(server, token) as c:
                    return c.get("/", headers=JSON).status_code

            with ThreadPoolExecutor(12) as pool:
                answers = [pool.submit(ask, t) for t in tokens]
                deadline = time.monotonic() + 20
                while not hits and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert hits, "the console never asked the JWKS"
                time.sleep(1.0)  # let the other eleven requests pile up behind the first fetch
                # The engine's own blocking work still gets a thread at once...
                assert server.call(asyncio.to_thread(lambda: "free"), timeout=5) == "free"
                # ...and an HS256 person still signs in meanwhile.
                with client(server, make_jwt(user)) as c:
                    assert c.get("/", headers=JSON).status_code == 200
                hold.set()
                assert [a.result(30) for a in answers] == [401] * 12
            # The fetch failed: the others were refused without a fetch of their own.
            assert len(hits) == 1


def test_tokens_missing_what_a_users_token_has_get_no_page(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "admin")
    now = int(time.time())
    bad = {
        "no exp": {k: v for k, v in claims(user).items() if k != "exp"},
        "no sub": {k: v for k, v in claims(user).items() if k != "sub"},
        "no aud": {k: v for k, v in claims(user).items() if k != "aud"},
        "sub not a user id": claims("admin"),
        "another audience": claims(user, aud="another-project"),
        "audience list without ours": claims(user, aud=["x", "y"]),
        "anon": claims(user, role="anon"),
        "no role": {k: v for k, v in claims(user).items() if k != "role"},
        "not yet valid": claims(user, nbf=now + 3600),
        "expired past the skew": claims(user, exp=now - 120),
        "exp not a number": claims(user, exp="tomorrow"),
    }
    for why, body in bad.items():
        token = jwt.encode(body, SECRET, algorithm="HS256")
        with client(served, token) as c:
            r = c.get("/", headers=JSON)
            assert r.status_code == 401, (why, r.text)


def test_huge_tokens_are_refused_in_words_not_crashes(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "admin")
    with client(served) as c:
        try:  # the HTTP server's own limit on a header: a 400, or the connection closed
            r = c.get("/", headers={**JSON, "Authorization": "Bearer " + make_jwt(user, pad="x" * 200_000)})
            assert r.status_code in (400, 431)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            pass
    with client(served) as c:
        assert c.get("/healthz").status_code == 200
        # A valid token too long for a browser's cookie (4096 bytes): said so, no cookie that
        # the browser would drop without a word.
        r = c.post("/login", data={"token": make_jwt(user, pad="x" * 5000)}, headers=HTML)
        assert r.status_code == 400 and "set-cookie" not in r.headers
        assert "too long for a browser" in r.text
        # Over the form limit: no token read at all.
        r = c.post("/login", data={"token": make_jwt(user, pad="x" * 70_000)}, headers=HTML)
        assert r.status_code == 401 and "no token given" in r.text
    with client(served, make_jwt(user, pad="x" * 5000)) as script:  # a script's header may be long
        assert script.get("/", headers=JSON).status_code == 200


def test_the_session_cookie_is_http_only_strict_and_secure_behind_tls(served: ConsoleServer,
                                                                     seeded_db: Database) -> None:
    user = grant(seeded_db, "viewer", GROUP)
    token = make_jwt(user, lifetime=900)
    with client(served) as c:
        # A TLS-ending proxy on this machine says so (uvicorn trusts 127.0.0.1's X-Forwarded-*).
        r = c.post("/login", data={"token": token}, headers={**HTML, "X-Forwarded-Proto": "https"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        flags = {f.strip().split("=")[0].lower(): f.strip() for f in cookie.split(";")[1:]}
        assert {"httponly", "secure", "samesite", "path", "max-age"} <= set(flags), cookie
        assert flags["samesite"].lower() == "samesite=strict" and flags["path"] == "Path=/"
        assert 0 < int(flags["max-age"].split("=")[1]) <= 900  # ends with the token
        assert "domain" not in flags  # this host only
    # The login page never sends a person anywhere but this console's own groups page.
    with client(served) as c:
        for evil in ("//evil.example", "https://evil.example", "/\\evil.example", "javascript:alert(1)"):
            r = c.post(f"/login?next={evil}", data={"token": token, "next": evil}, headers=HTML)
            assert r.status_code == 303 and r.headers["location"] == "/", evil
            assert "evil" not in c.get(f"/login?next={evil}&why={evil}", headers=HTML).text


# --- CSRF --------------------------------------------------------------------------------------

POSTS = [(f"/groups/{GROUP}/do/sync", {}), (f"/groups/{GROUP}/do/replicate", {}),
         (f"/groups/{GROUP}/do/pause", {}), (f"/groups/{GROUP}/do/resume", {}),
         (f"/groups/{GROUP}/runs", {"kind": "test", "confirm": "yes"}),
         (f"/groups/{GROUP}/runs", {"kind": "failover", "confirm": "yes"})]


def effects(db: Database) -> tuple[Any, ...]:
    """Everything a console button can change."""
    return (db.value("select count(*) from replication_jobs"), db.value("select count(*) from recovery_runs"),
            db.value("select count(*) from zerfaux.operations"),
            db.value("select count(*) from vcenters where sync_requested_at is not null"),
            db.value("select paused from protection_groups where id = %s", (GROUP,)))


@pytest.mark.parametrize("path,fields", POSTS)
def test_every_form_needs_this_sessions_token_from_this_site(served: ConsoleServer, seeded_db: Database,
                                                           path: str, fields: dict[str, str]) -> None:
    admin = grant(seeded_db, "admin")
    other = grant(seeded_db, "admin")
    before = effects(seeded_db)
    with contextlib.closing(sign_in(served, make_jwt(admin))) as c, \
            contextlib.closing(sign_in(served, make_jwt(other))) as c2:
        mine = csrf_of(c.get(f"/groups/{GROUP}", headers=HTML).text)
        theirs = csrf_of(c2.get(f"/groups/{GROUP}", headers=HTML).text)
        # The same person's earlier session (another token) is another session.
        with contextlib.closing(sign_in(served, make_jwt(admin, lifetime=1800))) as c3:
            earlier = csrf_of(c3.get(f"/groups/{GROUP}", headers=HTML).text)
        own = served.url
        refused = [
            ({}, {}),  # no token
            ({"csrf": ""}, {}),
            ({"csrf": theirs}, {}),  # another person's session
            ({"csrf": earlier}, {}),
            ({"csrf": mine.upper()}, {}),
            ({"csrf": mine}, {"Origin": "https://evil.example"}),
            ({"csrf": mine}, {"Origin": "null"}),
            ({"csrf": mine}, {"Origin": own.replace("127.0.0.1", "127.0.0.1.evil.example")}),
        ]
        for extra, headers in refused:
            r = c.post(path, data={**fields, **extra}, headers={**HTML, **headers})
            assert r.status_code == 403 and "not from this session" in r.text, (extra, headers, r.text)
        # The token sent as JSON (a cross-site fetch can send a simple text/plain body): not a form.
        r = c.post(path, content=json.dumps({**fields, "csrf": mine}), headers={**HTML, "Content-Type": "text/plain"})
        assert r.status_code == 403
        assert effects(seeded_db) == before
        # No Origin and no Referer (some browsers, privacy settings): the token alone decides.
        r = c.post(path, data={**fields, "csrf": mine}, headers=HTML)
        assert r.status_code != 403 or 'id="refusal"' in r.text, r.text
        assert "not from this session" not in r.text


def test_a_form_through_a_tls_proxy_is_this_sites(served: ConsoleServer, seeded_db: Database) -> None:
    """Behind a proxy that ends TLS the browser's Origin says https while the listener hears
    http: the operator's form must still count as this site's."""
    user = grant(seeded_db, "operator", GROUP)
    with contextlib.closing(sign_in(served, make_jwt(user))) as c:
        csrf = csrf_of(c.get(f"/groups/{GROUP}", headers=HTML).text)
        host = served.url.removeprefix("http://")
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": csrf},
                   headers={**HTML, "Origin": f"https://{host}"})
        assert r.status_code == 303, r.text
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": csrf},
                   headers={**HTML, "Origin": "https://dr-console.example", "Host": "10.0.0.5:8080",
                            "X-Forwarded-Host": "dr-console.example"})
        assert r.status_code in (303, 409), r.text  # this site's form; the database may refuse a second job
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": csrf},
                   headers={**HTML, "Origin": "https://evil.example", "X-Forwarded-Host": "dr-console.example"})
        assert r.status_code == 403


# --- ids that are not ids -----------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/groups/' or 1=1 --", "/groups/1;select pg_sleep(5)", "/groups/%00", f"/groups/{GROUP}x",
    "/runs/' union select 1 --", "/runs/..%2F..%2Fetc%2Fpasswd/report", f"/runs/{uuid.uuid4()}",
    f"/runs/{uuid.uuid4()}/report", f"/groups/{uuid.uuid4()}", f"/groups/{GROUP}/confirm/drop_table",
    f"/groups/{GROUP}/confirm/test?point=' or 1=1 --", f"/groups/{GROUP}/confirm/test?point={uuid.uuid4()}",
    f"/groups/{uuid.uuid4()}/confirm/test", f"/groups/{GROUP}/confirm/cleanup?test_run=1 or 1=1",
])
def test_ids_that_are_not_ids_are_not_found_not_errors(served: ConsoleServer, seeded_db: Database, path: str) -> None:
    user = grant(seeded_db, "admin")
    with client(served, make_jwt(user)) as c:
        r = c.get(path, headers=HTML)
        assert r.status_code in (200, 404), (path, r.status_code, r.text[:300])
        if "cleanup?test_run" not in path and "point=' or" not in path:  # a bad id there is no id
            assert r.status_code == 404, path
        for action in ("sync", "x' or '1", "sync%00"):
            r = c.post(f"/groups/' or 1=1 --/do/{action}")
            assert r.status_code == 404, action
        r = c.post(f"/groups/{GROUP}/runs", data={"kind": "test' --", "confirm": "yes"})
        assert r.status_code == 404
        r = c.post(f"/groups/{GROUP}/runs", data={"kind": "test", "confirm": "yes", "point": "'; drop table x; --"})
        assert r.status_code in (201, 200, 403, 409)  # a bad point is no point: the database picks the newest
