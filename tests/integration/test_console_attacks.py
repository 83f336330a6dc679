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
                # "Cannot check your sign-in now", not "signed out": the JWKS is at fault.
                assert [a.result(30) for a in answers] == [503] * 12
            # The fetch failed: the others were refused without a fetch of their own.
            assert len(hits) == 1
            # A browser's session is kept meanwhile (its cookie is not cleared), and told to retry.
            with client(server) as c:
                c.cookies.set("zerfaux_console", tokens[0])
                r = c.get("/", headers=HTML)
                assert r.status_code == 503 and "set-cookie" not in r.headers and "session is kept" in r.text
                assert r.headers["retry-after"] == "10"
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
    "/static/..%2fauth.py", "/static/%2e%2e/queries.py", "/static/..%5c..%5cconsole.sql",
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


# --- hostile text in every row a page shows ------------------------------------------------------

EVIL = "\"'><svg/onload=alert(1)><script>alert(2)</script>"


def _raw(html: str) -> bool:
    return "<svg/onload" in html or "<script>alert" in html


def test_hostile_text_in_every_field_is_shown_never_run(served: ConsoleServer, seeded_db: Database) -> None:
    db = seeded_db
    db.sql("update protection_groups set name = %s where id = %s", ("g" + EVIL, GROUP))
    db.sql("update vcenters set name = %s where id = %s", ("dr" + EVIL, DR))
    vm = add_vm(db, name="vm-evil", moref="vm-666")
    db.sql("update vcenter_vms set name = %s, networks = %s::jsonb where id = %s",
           ("vm" + EVIL, json.dumps(["net" + EVIL]), vm))
    pvm = protect(db, vm)
    db.sql("update protected_vms set last_error = %s where id = %s", ("vm error" + EVIL, pvm))
    db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network, test_network)"
           " values (%s, %s, %s, %s)", (GROUP, "net" + EVIL, "rec" + EVIL, "tst" + EVIL))
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)"
           " values (%s, %s, '77', now() - interval '1 hour', now() - interval '50 minutes')", (GROUP, "snap" + EVIL))
    job = db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    db.sql("update replication_jobs set status = 'failed', error = %s, completed_at = now() where id = %s",
           ("job error" + EVIL, job))
    db.sql("insert into rpo_events (protection_group_id, at, new_status, rpo_seconds, reason)"
           " values (%s, now() - interval '10 minutes', 'violated', 4000, %s)", (GROUP, "reason" + EVIL))
    run = db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'test') returning id", (GROUP,))
    db.sql("update recovery_runs set status = 'active', started_at = now() - interval '5 minutes', error = %s,"
           " rto_seconds = 60 where id = %s", ("run error" + EVIL, run))
    db.sql("insert into recovery_run_steps (run_id, seq, name, protected_vm_id, status, started_at, finished_at,"
           " detail, error) values (%s, 1, %s, %s, 'warning', now() - interval '4 minutes', now(), %s::jsonb, %s)",
           (run, "step" + EVIL[:40], pvm, json.dumps({"boot_time": "t" + EVIL, "how": "h" + EVIL,
                                                       "waited_seconds": "w" + EVIL}), "step error" + EVIL))
    user = grant(db, "admin")
    pages = ["/", f"/groups/{GROUP}", f"/groups/{GROUP}/confirm/test", f"/groups/{GROUP}/confirm/failover",
             f"/groups/{GROUP}/confirm/cleanup?test_run={run}", f"/runs/{run}", f"/runs/{run}/report",
             f"/runs/{run}?part=steps"]
    with client(served, make_jwt(user, email="me" + EVIL)) as c:
        for path in pages:
            r = c.get(path, headers=HTML)
            assert r.status_code == 200, (path, r.text[:500])
            assert not _raw(r.text), path
            assert r.text.count("&lt;svg/onload") >= 2, path  # the fields did reach the page, escaped
        group_page = c.get(f"/groups/{GROUP}", headers=HTML).text
        for field in ("vm error", "net", "rec", "tst", "snap", "job error", "reason"):
            assert f"{field}&#34;&#39;&gt;&lt;svg/onload" in group_page, field
        steps = c.get(f"/runs/{run}", headers=HTML).text
        for field in ("step", "t", "h", "step error", "run error"):
            assert f"{field}&#34;&#39;&gt;&lt;svg/onload" in steps, field
        assert "script-src 'self'" in c.get(f"/runs/{run}/report", headers=HTML).headers["content-security-policy"]


def test_hostile_text_cannot_forge_a_feed_event(served: ConsoleServer, seeded_db: Database) -> None:
    forged = f"x\n\nevent: group\ndata: {{\"id\": \"{uuid.uuid4()}\", \"status\": \"ok\"}}\n\ndata: </script>{EVIL}\r\n"
    job = seeded_db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    seeded_db.sql("update replication_jobs set status = 'failed', error = %s, completed_at = now() where id = %s",
                  (forged, job))
    user = grant(seeded_db, "viewer", GROUP)
    assert served.console.feed is not None
    served.console.feed.max_stream_seconds = 3
    with client(served, make_jwt(user)) as c:
        once = c.get("/feed?once=1").json()["groups"]
        assert [g["id"] for g in once] == [GROUP] and once[0]["last_error"] == forged
        with c.stream("GET", "/feed", headers={"Accept": "text/event-stream"}) as stream:
            lines = list(stream.iter_lines())
    data = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in data]  # every data line is one JSON value
    assert [e["id"] for e in events if e] == [GROUP] and events[0]["last_error"] == forged
    assert not any(line.startswith("event: ") and line not in ("event: group", "event: bye") for line in lines)


# --- one person's identity never reaches another's request ---------------------------------------

def test_two_people_interleaved_on_one_pooled_connection(seeded_db: Database,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection for every request: a `set local` that outlived its transaction, or claims
    left behind, would show one person's groups to the next."""
    import functools

    import listener.console as console_pkg
    from listener.console.queries import ConsoleDB

    monkeypatch.setattr(console_pkg, "ConsoleDB", functools.partial(ConsoleDB, pool_size=1))
    g1, g2 = add_groups(seeded_db, 2)
    alice, bob = grant(seeded_db, "operator", g1), grant(seeded_db, "viewer", g2)
    nobody, admin = str(uuid.uuid4()), grant(seeded_db, "admin")
    expected = {alice: {g1}, bob: {g2}, nobody: set(), admin: {GROUP, g1, g2}}
    with ConsoleServer(seeded_db, poll_seconds=30.0) as server:
        def ask(i: int) -> tuple[str, set[str], int]:
            who = [alice, bob, nobody, admin][i % 4]
            with client(server, make_jwt(who)) as c:
                if i % 3 == 0:  # an action refused (or not) inside the transaction, then a page
                    c.post(f"/groups/{g2}/do/replicate")
                html = c.get("/", headers=HTML).text
                seen = set(re.findall(r'<tr class="group" id="group-[^"]+" data-group-id="([^"]+)"', html))
                role = re.findall(r'data-role="([a-z]+)"', html)
                return who, seen, len(role)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(48)))
        for who, seen, _ in results:
            assert seen == expected[who], who
        assert server.console.db is not None and server.console.db._pool.max_size == 1

        async def leftovers() -> dict[str, Any]:
            assert server.console.db is not None
            async with server.console.db._pool.connection() as conn:
                cur = await conn.execute("select current_user as u, current_setting('role') as role,"
                                         " coalesce(current_setting('request.jwt.claims', true), '') as claims,"
                                         " current_setting('statement_timeout') as timeout")
                return dict(await cur.fetchone())

        left = server.call(leftovers())
        assert left["u"] == "postgres" and left["role"] == "none" and left["claims"] == "", left
        assert left["timeout"] == "0"
    # Only bob's group got a job, and only from a person allowed to make one there (the admin).
    rows = seeded_db.sql("select protection_group_id from replication_jobs")
    assert {str(r["protection_group_id"]) for r in rows} <= {g2}


# --- people with no role, and a viewer, press every button ------------------------------------------

def test_a_person_with_no_operator_row_sees_nothing(served: ConsoleServer, seeded_db: Database) -> None:
    vm = add_vm(seeded_db, name="secret-vm", moref="vm-5")
    protect(seeded_db, vm)
    run = seeded_db.value("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at,"
                          " replicated_at) values (%s, 'zerfaux_s', '5', now(), now()) returning id", (GROUP,))
    nobody = str(uuid.uuid4())
    before = effects(seeded_db)
    assert served.console.feed is not None
    served.console.feed.max_stream_seconds = 2
    with contextlib.closing(sign_in(served, make_jwt(nobody))) as c:
        html = c.get("/", headers=HTML).text
        assert 'id="no-groups"' in html and GROUP not in html and "gold" not in html
        for path in (f"/groups/{GROUP}", f"/groups/{GROUP}/confirm/test", f"/groups/{GROUP}/confirm/failover",
                     f"/groups/{GROUP}/confirm/test?point={run}"):
            r = c.get(path, headers=HTML)
            assert r.status_code == 404 and "secret-vm" not in r.text and "zerfaux_s" not in r.text, path
        assert c.get("/feed?once=1").json() == {"groups": []}
        with c.stream("GET", "/feed", headers={"Accept": "text/event-stream"}) as stream:
            body = "".join(stream.iter_text())
        assert "event: group" not in body and "event: bye" in body
        csrf = csrf_of(html.replace('id="no-groups"', "")) if 'name="csrf"' in html else None
        assert csrf is None  # the page offers no form at all
    with client(served, make_jwt(nobody)) as script:
        for action in ("sync", "replicate", "pause", "resume"):
            r = script.post(f"/groups/{GROUP}/do/{action}")
            assert r.status_code in (403, 409) and "error" in r.json(), action
        r = script.post(f"/groups/{GROUP}/runs", data={"kind": "test", "confirm": "yes"})
        assert r.status_code == 403
    assert effects(seeded_db) == before


KINDS = ("test", "cleanup", "planned_migration", "failover", "commit", "rollback", "reprotect")


def test_a_viewer_pressing_every_button_gets_the_databases_refusal_and_changes_nothing(
        served: ConsoleServer, seeded_db: Database) -> None:
    vm = add_vm(seeded_db, name="web-9", moref="vm-9")
    protect(seeded_db, vm)
    seeded_db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)"
                  " values (%s, 'zerfaux_v', '9', now(), now())", (GROUP,))
    test_run = seeded_db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'test') returning id",
                               (GROUP,))
    seeded_db.sql("update recovery_runs set status = 'active' where id = %s", (test_run,))
    viewer = grant(seeded_db, "viewer", GROUP)
    before = effects(seeded_db)
    with contextlib.closing(sign_in(served, make_jwt(viewer))) as c:
        page = c.get(f"/groups/{GROUP}", headers=HTML).text
        assert 'data-role="viewer"' in page
        csrf = csrf_of(page)
        for action in ("sync", "replicate", "pause", "resume"):
            r = c.post(f"/groups/{GROUP}/do/{action}", data={"csrf": csrf}, headers=HTML)
            assert r.status_code in (403, 409) and 'id="refusal-message"' in r.text, action
            message = re.search(r'id="refusal-message">([^<]+)<', r.text)
            assert message and ("row-level security" in message.group(1) or "permission" in message.group(1)), action
        for kind in KINDS:
            fields = {"csrf": csrf, "kind": kind, "confirm": "yes"}
            if kind == "cleanup":
                fields["test_run"] = str(test_run)
            r = c.post(f"/groups/{GROUP}/runs", data=fields, headers=HTML)
            assert r.status_code in (403, 409) and 'id="refusal-message"' in r.text, (kind, r.text[:400])
    assert effects(seeded_db) == before
    assert seeded_db.value("select status from recovery_runs where id = %s", (test_run,)) == "active"


# --- the live feed ----------------------------------------------------------------------------------

def _events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, line[6:]


def test_a_stream_ends_with_its_token_and_an_expired_one_gets_none(served: ConsoleServer,
                                                                  seeded_db: Database) -> None:
    user = grant(seeded_db, "viewer", GROUP)
    with client(served, make_jwt(user, lifetime=3)) as c:
        started = time.monotonic()
        with c.stream("GET", "/feed", headers={"Accept": "text/event-stream"}) as stream:
            kinds = [k for k, _ in _events(stream.iter_lines())]
        assert kinds[-1] == "bye" and time.monotonic() - started < 25
    with client(served, make_jwt(user, lifetime=-60)) as c:  # past the 30 s of clock skew
        assert c.get("/feed", headers={"Accept": "text/event-stream"}).status_code == 401
        assert c.get("/feed?once=1").status_code == 401


def test_the_feed_never_sends_a_group_its_person_cannot_read(served: ConsoleServer, seeded_db: Database) -> None:
    (mine,) = add_groups(seeded_db, 1)
    theirs = seeded_db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    seeded_db.sql("update replication_jobs set status = 'running', started_at = now(), bytes_estimated = 100"
                  " where id = %s", (theirs,))
    user = grant(seeded_db, "operator", mine)
    feed = served.console.feed
    assert feed is not None
    feed.max_stream_seconds = 4
    seen: set[str] = set()
    with client(served, make_jwt(user)) as c:
        with c.stream("GET", "/feed", headers={"Accept": "text/event-stream"}) as stream:
            for i, (kind, data) in enumerate(_events(stream.iter_lines())):
                if kind == "group":
                    seen.add(json.loads(data)["id"])
                if i < 3:  # changes in both groups while the stream is open
                    seeded_db.sql("update replication_jobs set bytes_transferred = bytes_transferred + 10"
                                  " where id = %s", (theirs,))
                    seeded_db.sql("update protection_groups set paused = not paused where id = %s", (mine,))
                    feed.hint()
    assert seen == {mine}


def test_a_client_that_never_reads_is_cut_off_and_many_cost_one_refresh(served: ConsoleServer,
                                                                       seeded_db: Database) -> None:
    from listener.console.pages import BoundedStream

    add_groups(seeded_db, 60)
    seeded_db.sql("insert into replication_jobs (protection_group_id) select id from protection_groups")
    # Long errors make every refresh big: a socket nobody reads fills in a few refreshes.
    seeded_db.sql("update replication_jobs set status = 'failed', error = repeat('e', 20000)")
    user = grant(seeded_db, "admin")
    feed = served.console.feed
    assert feed is not None
    feed.max_stream_seconds, feed.poll_seconds, feed.debounce = 3.0, 0.3, 0.05
    BoundedStream.SEND_GRACE = 1.0
    port = int(served.url.rsplit(":", 1)[1])
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    stuck.sendall(f"GET /feed HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                  f"Authorization: Bearer {make_jwt(user)}\r\n\r\n".encode())
    try:
        deadline = time.monotonic() + 10
        while not feed._watchers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert feed._watchers, "the stuck client's stream never started"
        for i in range(40):  # every refresh changes all 61 groups; the client reads none of it
            seeded_db.sql("update replication_jobs set error = repeat(%s, 20000)", (chr(97 + i % 26),))
            time.sleep(0.25)
            for w in feed._watchers:
                assert len(w.pending) <= 61  # coalesced: at most one pending change per group
            if not feed._watchers:
                break
        assert not feed._watchers, "a client that never reads kept its stream past the deadline"
        # Many readers at once: each gets the groups, the database one refresh per tick for all.
        feed.max_stream_seconds = 2.0
        before = feed.refreshes

        def read(_: int) -> int:
            with client(served, make_jwt(user)) as c:
                with c.stream("GET", "/feed", headers={"Accept": "text/event-stream"}) as stream:
                    return sum(1 for k, _ in _events(stream.iter_lines()) if k == "group")

        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            counts = list(pool.map(read, range(20)))
        assert all(n >= 61 for n in counts), counts
        ticks = (time.monotonic() - started) / feed.poll_seconds
        assert feed.refreshes - before <= ticks + 3  # one shared refresh per tick, not one per client
        with client(served) as c:
            assert c.get("/healthz").status_code == 200
    finally:
        stuck.close()
        BoundedStream.SEND_GRACE = 10.0


# --- a console database that is down or hangs ----------------------------------------------------

@dataclass
class _Url:
    url: str


def test_a_database_down_at_start_and_back_later(seeded_db: Database) -> None:
    """The first page is asked for while the database is down: an "unavailable" page, and the
    console works again once the database is back (a pool whose first open failed cannot be
    reopened: it used to answer 500 for good)."""
    user = grant(seeded_db, "admin")
    with tcp_proxy("127.0.0.1", 5432) as proxy:
        proxy.cut()
        with ConsoleServer(_Url(proxy.url_for(seeded_db.url)), poll_seconds=30.0) as server:
            assert server.console.db is not None
            server.console.db.deadline = 3.0
            with client(server, make_jwt(user)) as c:
                r = c.get("/", headers=HTML)
                assert r.status_code == 503 and "Database unavailable" in r.text
                assert c.get(f"/groups/{GROUP}", headers=JSON).status_code == 503
                proxy.restore()
                deadline = time.monotonic() + 30
                while c.get("/", headers=JSON).status_code != 200:
                    assert time.monotonic() < deadline, "the console never came back"
                    time.sleep(0.5)
                assert 'data-group-id="' + GROUP in c.get("/", headers=HTML).text


def test_webhooks_health_and_metrics_answer_while_the_consoles_database_hangs(seeded_db: Database) -> None:
    from listener.console import build_console
    from listener.http import build_server, create_app, run_server
    from listener.metrics import Metrics
    from listener.sources.webhook import WebhookSource
    from listener.store_pg import PostgresStore

    user = grant(seeded_db, "admin")
    woken: list[str] = []
    with tcp_proxy("127.0.0.1", 5432) as proxy:
        console = build_console(proxy.url_for(seeded_db.url), SECRET, None)
        assert console.db is not None
        console.db.deadline = 3.0
        store = PostgresStore(seeded_db.url, pool_size=2)
        webhook = WebhookSource(lambda: woken.append("wake"), lambda: woken.append("poke"))
        app = create_app(secret="hook-secret-" + "z" * 20, webhook=webhook, store=store, sources=[webhook],
                         metrics=Metrics(), console=console)
        server = build_server(app, "127.0.0.1", 0)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        task = asyncio.run_coroutine_threadsafe(run_server(server, webhook), loop)
        try:
            deadline = time.monotonic() + 10
            while not server.started:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            with httpx.Client(base_url=url, timeout=30) as c:
                assert c.get("/", headers={**JSON, "Authorization": f"Bearer {make_jwt(user)}"}).status_code == 200
            proxy.cut()  # the console's database: every socket open, nothing comes back

            def page(_: int) -> int:
                with httpx.Client(base_url=url, timeout=60) as c:
                    return c.get("/", headers={**HTML, "Authorization": f"Bearer {make_jwt(user)}"}).status_code

            with ThreadPoolExecutor(8) as pool:
                pages = [pool.submit(page, i) for i in range(8)]
                time.sleep(0.5)
                with httpx.Client(base_url=url, timeout=10) as c:
                    for _ in range(3):
                        assert c.get("/healthz").status_code == 200
                        assert c.get("/metrics").status_code == 200
                        r = c.post("/webhooks/supabase", headers={"Authorization": "Bearer hook-secret-" + "z" * 20},
                                   json={"type": "INSERT", "table": "replication_jobs", "schema": "public",
                                         "record": {"id": str(uuid.uuid4())}, "old_record": None})
                        assert r.status_code == 202, r.text
                # The console's own pages end too, saying the database does not answer.
                assert [p.result(60) for p in pages] == [503] * 8
            assert webhook.received == 3
        finally:
            proxy.restore()
            server.should_exit = True
            with contextlib.suppress(Exception):
                task.result(15)
            asyncio.run_coroutine_threadsafe(console.stop(), loop).result(20)
            asyncio.run_coroutine_threadsafe(store.close(), loop).result(20)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()


# --- what the pages promise ------------------------------------------------------------------------

def _points(db: Database, n: int) -> list[str]:
    """``n`` recovery points on the target, newest first, a minute apart."""
    rows = db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)"
                  " select %s, 'zerfaux_p' || i, 'g' || i, now() - i * interval '1 minute',"
                  " now() - i * interval '1 minute' + interval '5 seconds' from generate_series(1, %s) i"
                  " returning id, snapshot_name", (GROUP, n))
    return [str(r["id"]) for r in sorted(rows, key=lambda r: int(r["snapshot_name"][9:]))]


def test_the_confirmation_names_the_point_the_run_will_use(served: ConsoleServer, seeded_db: Database) -> None:
    """A link to /confirm/failover?point=<an old point> must not say "the newest point" while
    its form sends the old one; a point of another group is not offered at all."""
    vm = add_vm(seeded_db, name="db-3", moref="vm-3")
    protect(seeded_db, vm)
    points = _points(seeded_db, 70)  # more than the page lists
    oldest = points[-1]
    (other_group,) = add_groups(seeded_db, 1)
    foreign = seeded_db.value("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at,"
                              " replicated_at) values (%s, 'zerfaux_foreign', 'f1', now(), now()) returning id",
                              (other_group,))
    operator = grant(seeded_db, "operator", GROUP)
    with contextlib.closing(sign_in(served, make_jwt(operator))) as c:
        page = c.get(f"/groups/{GROUP}/confirm/test?point={oldest}", headers=HTML).text
        shown = re.search(r'id="confirm-point" data-point-id="([^"]+)">([^<]+)<', page)
        assert shown and shown.groups() == (oldest, "zerfaux_p70"), page
        assert f'name="point" value="{oldest}"' in page
        r = c.get(f"/groups/{GROUP}/confirm/failover?point={foreign}", headers=HTML)
        assert r.status_code == 404 and "zerfaux_foreign" not in r.text
        newest = c.get(f"/groups/{GROUP}/confirm/test", headers=HTML).text
        assert re.search(r'id="confirm-point" data-point-id="([^"]+)"', newest).group(1) == points[0]  # type: ignore[union-attr]
        r = c.post(f"/groups/{GROUP}/runs", data={"csrf": csrf_of(page), "kind": "test", "confirm": "yes",
                                                  "point": oldest}, headers=HTML)
        assert r.status_code == 303, r.text
    assert str(seeded_db.value("select recovery_point_id from recovery_runs")) == oldest


def test_a_cleanup_confirmation_names_the_test_vms_it_removes_and_where(served: ConsoleServer,
                                                                       seeded_db: Database) -> None:
    for name, moref in (("app-1", "vm-a1"), ("app-2", "vm-a2")):
        protect(seeded_db, add_vm(seeded_db, name=name, moref=moref))
    _points(seeded_db, 1)
    test_run = str(seeded_db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'test')"
                                   " returning id", (GROUP,)))
    seeded_db.sql("update recovery_runs set status = 'active' where id = %s", (test_run,))
    user = grant(seeded_db, "operator", GROUP)
    tag = test_run.replace("-", "")[:8]
    with client(served, make_jwt(user)) as c:
        page = c.get(f"/groups/{GROUP}/confirm/cleanup?test_run={test_run}", headers=HTML).text
        assert 'id="confirm-vms"' in page and f"app-1-test-{tag}" in page and f"app-2-test-{tag}" in page
        assert "vc-dr" in page and "powered off and removed" in page
        rollback = c.get(f"/groups/{GROUP}/confirm/rollback", headers=HTML).text
        assert 'id="confirm-vms"' in rollback and "app-1" in rollback and "powered off and removed" in rollback


def test_a_run_page_reads_even_when_a_steps_detail_is_odd(served: ConsoleServer, seeded_db: Database) -> None:
    vm = add_vm(seeded_db, name="odd-1", moref="vm-o1")
    pvm = protect(seeded_db, vm)
    _points(seeded_db, 1)
    run = seeded_db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'test') returning id",
                          (GROUP,))
    seeded_db.sql("update recovery_runs set status = 'running', started_at = now() - interval '1 minute'"
                  " where id = %s", (run,))
    seeded_db.sql("insert into recovery_run_steps (run_id, seq, name, protected_vm_id, status, started_at, detail)"
                  " values (%s, 1, 'wait_ready', %s, 'running', now(), %s::jsonb),"
                  " (%s, 2, 'power_on', %s, 'pending', null, '{\"waited_seconds\": null, \"how\": [1]}'::jsonb)",
                  (run, pvm, json.dumps({"how": "tools", "waited_seconds": "a while", "boot_time": {"x": 1}}),
                   run, pvm))
    user = grant(seeded_db, "viewer", GROUP)
    with client(served, make_jwt(user)) as c:
        for path in (f"/runs/{run}", f"/runs/{run}/report", f"/runs/{run}?part=steps"):
            r = c.get(path, headers=HTML)
            assert r.status_code == 200 and "odd-1" in r.text, (path, r.text[:300])


def test_a_run_page_is_the_first_thing_asked_for_after_a_start(served: ConsoleServer, seeded_db: Database) -> None:
    """An operator following a link to a run right after the listener started: the run, not
    "recovery runs need issue 13's migration" (known only once the database was opened)."""
    protect(seeded_db, add_vm(seeded_db, name="first-1", moref="vm-f1"))
    _points(seeded_db, 1)
    run = seeded_db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'test') returning id",
                          (GROUP,))
    with client(served, make_jwt(grant(seeded_db, "viewer", GROUP))) as c:
        r = c.get(f"/runs/{run}", headers=HTML)
        assert r.status_code == 200 and f'data-run-id="{run}"' in r.text, r.text[:300]


def test_the_groups_page_shows_what_the_issue_lists(served: ConsoleServer, seeded_db: Database) -> None:
    seeded_db.sql("update protection_groups set rpo_minutes = 15, next_replication_at = '2030-01-02 03:04:05+00'"
                  " where id = %s", (GROUP,))
    seeded_db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)"
                  " values (%s, 'zerfaux_c1', 'c1', now() - interval '3 hours', now() - interval '170 minutes'),"
                  " (%s, 'zerfaux_c2', 'c2', now() - interval '40 minutes', now() - interval '38 minutes')",
                  (GROUP, GROUP))
    job = seeded_db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    seeded_db.sql("update replication_jobs set status = 'failed', completed_at = now(), error = %s where id = %s",
                  ("the DR storage host refused the SSH key: add it to authorized_keys", job))
    seeded_db.sql("insert into rpo_events (protection_group_id, at, new_status, rpo_seconds, reason)"
                  " values (%s, now() - interval '20 minutes', 'violated', 1200, 'last job failed')", (GROUP,))
    user = grant(seeded_db, "viewer", GROUP)
    with client(served, make_jwt(user)) as c:
        html = c.get("/", headers=HTML).text
    row = html[html.index(f'id="group-{GROUP}"'):]
    row = row[:row.index("</tr>")]
    assert 'data-status="violated"' in row and "RPO violated" in row
    assert "15m" in row and "2030-01-02 03:04:05 UTC" in row  # target and next scheduled replication
    assert "refused the SSH key" in row  # the last error in words
    assert '<polyline class="rpo"' in row and "violated: last job failed" in row  # the 24 h chart and its event
