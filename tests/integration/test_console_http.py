"""The DR console over real HTTP (uvicorn on loopback) on real Postgres: sign-in, what each
person sees under RLS, actions as row edits by that person, bounded queries, the live feed."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.conftest import DR, GROUP, PRIMARY, add_groups, add_vm, protect
from tests.support.console import SECRET, ConsoleServer, CountingConnection, grant, make_jwt
from tests.support.pg import Database

HTML = {"Accept": "text/html"}


@pytest.fixture
def served(seeded_db: Database) -> Iterator[ConsoleServer]:
    with ConsoleServer(seeded_db, counting=True, poll_seconds=30.0) as server:
        yield server


def client(server: ConsoleServer, token: str | None = None, **kw: Any) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, timeout=15, headers=headers, **kw)


def sign_in(server: ConsoleServer, token: str) -> httpx.Client:
    c = client(server)
    r = c.post("/login", data={"token": token}, headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/"
    return c


def running_job(db: Database, group: str, done: int, estimated: int) -> str:
    """A job as the engine leaves it mid-copy (an insert is always 'pending', the engine moves it)."""
    job = db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (group,))
    db.sql("update replication_jobs set status = 'running', started_at = now() - interval '10 seconds',"
           " bytes_transferred = %s, bytes_estimated = %s where id = %s", (done, estimated, job))
    return str(job)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


# --- sign-in ---------------------------------------------------------------------------------

def test_login_keeps_the_token_in_a_strict_http_only_cookie(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "viewer", GROUP)
    with client(served) as c:
        r = c.post("/login", data={"token": make_jwt(user)}, headers=HTML)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "zerfaux_console=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert "secure" not in cookie  # plain http on loopback; https requests get Secure
        page = c.get("/", headers=HTML)
        assert page.status_code == 200 and 'data-group-id="' + GROUP + '"' in page.text
        assert c.get("/logout", headers=HTML).status_code == 405  # a link from elsewhere signs nobody out
        assert c.get("/", headers=HTML).status_code == 200
        assert c.post("/logout", headers=HTML).status_code == 303
        assert c.get("/", headers=HTML).status_code == 303  # the cookie is gone


def test_no_token_redirects_a_browser_and_answers_401_to_a_script(served: ConsoleServer) -> None:
    with client(served) as c:
        r = c.get("/", headers=HTML)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        r = c.get("/", headers={"Accept": "application/json"})
        assert r.status_code == 401 and "not signed in" in r.json()["error"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/feed").status_code == 401
        assert c.post(f"/groups/{GROUP}/do/replicate").status_code == 401


@pytest.mark.parametrize("case", ["forged", "expired", "service_role", "other_audience", "garbage"])
def test_bad_tokens_get_no_page_and_the_login_page_says_why(served: ConsoleServer, seeded_db: Database,
                                                           case: str) -> None:
    user = grant(seeded_db, "admin")
    token = {
        "forged": make_jwt(user, secret="another-projects-secret-" + "y" * 20),
        "expired": make_jwt(user, lifetime=-120),
        "service_role": make_jwt(user, role="service_role"),
        "other_audience": make_jwt(user, aud="someone-else"),
        "garbage": "not.a.jwt",
    }[case]
    with client(served, token) as c:
        r = c.get("/", headers={"Accept": "application/json"})
        assert r.status_code == 401, r.text
        assert c.get(f"/groups/{GROUP}", headers={"Accept": "application/json"}).status_code == 401
    with client(served) as c:
        r = c.post("/login", data={"token": token}, headers=HTML)
        assert r.status_code == 401 and "set-cookie" not in r.headers
        words = {"forged": "signature does not match", "expired": "expired", "service_role": "role",
                 "other_audience": "audience", "garbage": "not a JWT"}[case]
        assert words in r.text
        # A cookie holding such a token is no better than a header.
        c.cookies.set("zerfaux_console", token)
        r = c.get("/", headers=HTML)
        assert r.status_code == 303 and "why=" in r.headers["location"]
        assert c.get(r.headers["location"], headers=HTML).status_code == 200


def test_jwks_tokens_are_verified_with_the_projects_public_key(seeded_db: Database) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}).encode()

    class Keys(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http = HTTPServer(("127.0.0.1", 0), Keys)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}/auth/v1/.well-known/jwks.json"
        user = grant(seeded_db, "viewer", GROUP)
        now = int(time.time())
        claims = {"sub": user, "aud": "authenticated", "role": "authenticated", "exp": now + 600}
        good = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
        stranger = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "k1"})
        with ConsoleServer(seeded_db, secret=None, jwks_url=url) as server:
            with client(server, good) as c:
                assert c.get("/", headers=HTML).status_code == 200
            with client(server, forged) as c:
                assert c.get("/").status_code == 401
            with client(server, make_jwt(user)) as c:  # HS256 with no secret configured
                assert c.get("/").status_code == 401
    finally:
        http.shutdown()
        http.server_close()


# --- what each person sees -------------------------------------------------------------------

def test_a_viewer_sees_only_their_groups(served: ConsoleServer, seeded_db: Database) -> None:
    others = add_groups(seeded_db, 3)
    user = grant(seeded_db, "viewer", others[1])
    with client(served, make_jwt(user)) as c:
        page = c.get("/", headers=HTML).text
        shown = set(re.findall(r'<tr class="group" id="group-[^"]+" data-group-id="([^"]+)"', page))
        assert shown == {others[1]}
        assert c.get(f"/groups/{GROUP}", headers=HTML).status_code == 404
        assert c.get(f"/groups/{others[1]}", headers=HTML).status_code == 200
        assert [g["id"] for g in c.get("/feed?once=1").json()["groups"]] == [others[1]]


def test_a_hostile_group_name_is_shown_not_run(served: ConsoleServer, seeded_db: Database) -> None:
    name = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    seeded_db.sql("update protection_groups set name = %s where id = %s", (name, GROUP))
    user = grant(seeded_db, "admin")
    with client(served, make_jwt(user)) as c:
        for path in ("/", f"/groups/{GROUP}", f"/groups/{GROUP}/confirm/test"):
            html = c.get(path, headers=HTML).text
            assert "<script>alert" not in html and "<img src=x" not in html, path
            assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html, path
        r = c.get("/", headers=HTML)
        assert "script-src 'self'" in r.headers["content-security-policy"]


def test_the_group_page_shows_vms_points_and_the_running_replication(served: ConsoleServer,
                                                                     seeded_db: Database) -> None:
    vm = add_vm(seeded_db, name="db-01", moref="vm-901")
    seeded_db.sql("update vcenter_vms set networks = '[\"prod-net\"]' where id = %s", (vm,))
    pvm = protect(seeded_db, vm)
    seeded_db.sql("update protected_vms set boot_priority = 1 where id = %s", (pvm,))
    seeded_db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
                  " values (%s, 'prod-net', 'dr-net')", (GROUP,))
    seeded_db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at,"
                  " tested_at) values (%s, 'zerfaux_a', '11', now() - interval '2 hours', now() - interval '119 minutes',"
                  " now() - interval '1 hour'), (%s, 'zerfaux_b', '12', now() - interval '5 minutes', now(), null)",
                  (GROUP, GROUP))
    job = running_job(seeded_db, GROUP, done=250, estimated=1000)
    user = grant(seeded_db, "viewer", GROUP)
    with client(served, make_jwt(user)) as c:
        html = c.get(f"/groups/{GROUP}", headers=HTML).text
    assert f'data-vm-id="{pvm}" data-boot-priority="1"' in html
    assert "prod-net →" in html and "dr-net" in html
    assert re.search(rf'<progress class="replication" data-job-id="{job}"[^>]*value="25"', html)
    assert html.count('data-tested="true"') == 1 and html.count('data-tested="false"') == 1
    assert '<polyline class="rpo"' in html  # the chart has a curve


# --- actions ---------------------------------------------------------------------------------

def test_an_operators_replicate_now_makes_the_row_as_that_person(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "operator", GROUP)
    with contextlib.closing(sign_in(served, make_jwt(user))) as c:
        html = c.get(f"/groups/{GROUP}", headers=HTML).text
        # Without this session's token the form is refused, whatever the cookie.
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": "0" * 40}, headers=HTML)
        assert r.status_code == 403
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": csrf_of(html)},
                   headers={**HTML, "Origin": "https://evil.example"})
        assert r.status_code == 403
        assert seeded_db.value("select count(*) from replication_jobs") == 0
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": csrf_of(html)}, headers=HTML)
        assert r.status_code == 303 and r.headers["location"] == f"/groups/{GROUP}?done=replicate"
    row = seeded_db.one("select protection_group_id, status, origin from replication_jobs")
    assert (str(row["protection_group_id"]), row["status"], row["origin"]) == (GROUP, "pending", "request")
    # The trigger enqueued the work, as for any frontend's insert.
    assert seeded_db.value("select count(*) from zerfaux.operations where kind = 'replication.run'") == 1


def test_operator_sync_and_pause_change_the_rows(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "operator", GROUP)
    with client(served, make_jwt(user)) as c:  # a script: bearer, no CSRF token needed
        assert c.post(f"/groups/{GROUP}/do/sync").json()["ok"] is True
        assert c.post(f"/groups/{GROUP}/do/resume").json()["ok"] is True
    rows = seeded_db.sql("select id from vcenters where sync_requested_at is not null order by id")
    assert [str(r["id"]) for r in rows] == [PRIMARY, DR]
    assert seeded_db.value("select paused from protection_groups where id = %s", (GROUP,)) is False


def test_a_viewers_action_gets_the_databases_message(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "viewer", GROUP)
    with contextlib.closing(sign_in(served, make_jwt(user))) as c:
        html = c.get(f"/groups/{GROUP}", headers=HTML).text
        r = c.post(f"/groups/{GROUP}/do/replicate", data={"csrf": csrf_of(html)}, headers=HTML)
        assert r.status_code == 403
        assert 'id="refusal"' in r.text and 'data-sqlstate="42501"' in r.text
        assert 'new row violates row-level security policy for table &#34;replication_jobs&#34;' in r.text
    with client(served, make_jwt(user)) as script:
        r = script.post(f"/groups/{GROUP}/do/replicate")
        assert r.status_code == 403 and r.json()["sqlstate"] == "42501"
        r = script.post(f"/groups/{GROUP}/do/pause")
        assert r.status_code == 409 and "changed no row" in r.json()["error"]
    assert seeded_db.value("select count(*) from replication_jobs") == 0


def test_recovery_runs_ask_for_confirmation_then_go_to_the_database(served: ConsoleServer,
                                                                   seeded_db: Database) -> None:
    vm = add_vm(seeded_db, name="web-01", moref="vm-77")
    protect(seeded_db, vm)
    user = grant(seeded_db, "admin")
    with contextlib.closing(sign_in(served, make_jwt(user))) as c:
        csrf = csrf_of(c.get(f"/groups/{GROUP}", headers=HTML).text)
        r = c.post(f"/groups/{GROUP}/runs", data={"csrf": csrf, "kind": "failover"}, headers=HTML)
        assert r.status_code == 303 and r.headers["location"] == f"/groups/{GROUP}/confirm/failover"
        confirm = c.get(r.headers["location"], headers=HTML).text
        assert 'id="confirm"' in confirm and "web-01" in confirm and "vc-dr" in confirm
        r = c.post(f"/groups/{GROUP}/runs", data={"csrf": csrf, "kind": "failover", "confirm": "yes"}, headers=HTML)
        # Refused by the database (not available yet, or no recovery_runs table at all): its words.
        assert r.status_code in (403, 409) and 'id="refusal-message"' in r.text
        message = re.search(r'id="refusal-message">([^<]+)<', r.text)
        assert message and message.group(1).strip()
    if served.console.db is not None and served.console.db.has_runs:
        assert seeded_db.value("select count(*) from recovery_runs") == 0


# --- cost and liveness -----------------------------------------------------------------------

def statements(server: ConsoleServer, c: httpx.Client, path: str) -> int:
    before = CountingConnection.statements
    assert c.get(path, headers=HTML).status_code == 200
    return CountingConnection.statements - before


def test_pages_cost_a_fixed_number_of_queries(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "admin")
    with client(served, make_jwt(user)) as c:
        c.get("/", headers=HTML)  # the pool's first connection and the capability check
        few = statements(served, c, "/")
        add_groups(seeded_db, 49)
        seeded_db.sql("insert into replication_jobs (protection_group_id) select id from protection_groups")
        seeded_db.sql("update replication_jobs set status = 'running', started_at = now(), bytes_estimated = 100")
        seeded_db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
                      " select id, 'zerfaux_' || n, id::text || n, now() - n * interval '1 hour'"
                      " from protection_groups, generate_series(1, 3) n")
        many = statements(served, c, "/")
        html = c.get("/", headers=HTML).text
        assert html.count('<tr class="group"') == 50 and html.count('<progress class="replication"') == 50
        assert many == few <= 4
        assert statements(served, c, f"/groups/{GROUP}") <= 10
        before = served.console.feed.refreshes if served.console.feed else 0
        for _ in range(3):
            assert len(c.get("/feed?once=1").json()["groups"]) == 50
        assert served.console.feed is not None and served.console.feed.refreshes - before <= 1


def test_the_feed_sends_an_event_after_a_progress_change(served: ConsoleServer, seeded_db: Database) -> None:
    job = running_job(seeded_db, GROUP, done=0, estimated=1000)
    user = grant(seeded_db, "viewer", GROUP)
    events: list[dict[str, Any]] = []
    with client(served, make_jwt(user)) as c:
        with c.stream("GET", "/feed", headers={"Accept": "text/event-stream"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            deadline = time.monotonic() + 20

            def next_event() -> dict[str, Any]:
                kind = None
                for line in lines:
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "group":
                        return dict(json.loads(line[6:]))
                    assert time.monotonic() < deadline, "no event in time"
                raise AssertionError("the stream ended")

            first = next_event()
            assert first["id"] == GROUP and first["job"]["id"] == str(job) and first["job"]["transferred"] == 0
            # The poll is 30 s here: an event within 20 s came from the NOTIFY hint.
            seeded_db.sql("update replication_jobs set bytes_transferred = 600 where id = %s", (job,))
            events.append(next_event())
    assert events[0]["job"]["transferred"] == 600 and events[0]["job"]["estimated"] == 1000


def test_an_operator_starts_a_test_failover_and_reads_its_steps_and_report(served: ConsoleServer,
                                                                         seeded_db: Database) -> None:
    vm = add_vm(seeded_db, name="app-07", moref="vm-707")
    pvm = protect(seeded_db, vm)
    point = seeded_db.value("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at,"
                            " replicated_at) values (%s, 'zerfaux_t1', '4242', now() - interval '3 minutes', now())"
                            " returning id", (GROUP,))
    operator, viewer = grant(seeded_db, "operator", GROUP), grant(seeded_db, "viewer", GROUP)
    with contextlib.closing(sign_in(served, make_jwt(viewer))) as c:
        csrf = csrf_of(c.get(f"/groups/{GROUP}", headers=HTML).text)
        r = c.post(f"/groups/{GROUP}/runs", data={"csrf": csrf, "kind": "test", "confirm": "yes"}, headers=HTML)
        assert r.status_code == 403 and "recovery_runs_roles" in r.text
    assert seeded_db.value("select count(*) from recovery_runs") == 0
    with contextlib.closing(sign_in(served, make_jwt(operator))) as c:
        confirm = c.get(f"/groups/{GROUP}/confirm/test", headers=HTML).text
        assert "app-07" in confirm and "zerfaux_t1" in confirm and "vc-dr" in confirm
        r = c.post(f"/groups/{GROUP}/runs", data={"csrf": csrf_of(confirm), "kind": "test", "confirm": "yes"},
                   headers=HTML)
        assert r.status_code == 303 and r.headers["location"].startswith("/runs/")
        run = seeded_db.one("select id, kind, status, recovery_point_id, requested_by from recovery_runs")
        assert (run["kind"], run["status"], str(run["recovery_point_id"]), str(run["requested_by"])) == (
            "test", "pending", str(point), operator)
        # A second test of the same group: the database's rule, in its words.
        r = c.post(f"/groups/{GROUP}/runs", data={"csrf": csrf_of(confirm), "kind": "test", "confirm": "yes"},
                   headers=HTML)
        assert r.status_code == 409 and "recovery_runs_one_active_test_per_group" in r.text
        # Steps as the engine writes them: one VM that booted, one that timed out waiting for Tools.
        seeded_db.sql("update recovery_runs set status = 'active', started_at = now() - interval '90 seconds',"
                      " rto_seconds = 80, data_loss_seconds = 180 where id = %s", (run["id"],))
        seeded_db.sql("insert into recovery_run_steps (run_id, seq, name, protected_vm_id, status, started_at,"
                      " finished_at, detail) values"
                      " (%(r)s, 1, 'validate', null, 'done', now() - interval '90 seconds', now() - interval '85 seconds', '{}'),"
                      " (%(r)s, 2, 'power_on', %(v)s, 'done', now() - interval '60 seconds', now() - interval '59 seconds',"
                      "  '{\"boot_time\": \"2026-12-01T10:00:00Z\"}'),"
                      " (%(r)s, 3, 'wait_ready', %(v)s, 'warning', now() - interval '59 seconds', now() - interval '10 seconds',"
                      "  '{\"how\": \"timeout\", \"waited_seconds\": 49}')", {"r": run["id"], "v": pvm})
        page = c.get(f"/runs/{run['id']}", headers=HTML).text
        assert 'data-name="wait_ready" data-status="warning"' in page and "ready by timeout" in page
        assert "booted 2026-12-01 10:00:00 UTC" in page and 'id="rto" data-seconds="80.0"' in page
        report = c.get(f"/runs/{run['id']}/report", headers=HTML).text
        assert 'id="report-warnings">1<' in report and "app-07" in report and "1m 20s" in report
    with client(served, make_jwt(grant(seeded_db, "viewer", add_groups(seeded_db, 1)[0]))) as stranger:
        assert stranger.get(f"/runs/{run['id']}", headers=HTML).status_code == 404


# --- paging of the groups page (120 groups: three pages of 50) --------------------------------

ROW = re.compile(r'<tr class="group" id="group-[^"]+" data-group-id="([^"]+)" data-status="([a-z_]+)"')
WORST_FIRST = ("violated", "at_risk", "unknown", "ok")


def statuses_spread(db: Database, groups: list[str]) -> None:
    """A recovery point per group, chosen so the groups are violated, at risk, ok and unknown in
    turn (unknown: no point at all); what protection_status says is checked, not assumed."""
    db.sql("update protection_groups set rpo_minutes = 30 where id = any(%s::uuid[]) and rpo_minutes is null",
           (groups,))
    for i, group in enumerate(groups):
        age = (2.0, 0.8, 0.1, None)[i % 4]  # share of the group's RPO
        if age is not None:
            db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)"
                   " select id, 'zerfaux_p', id::text || 'p', now() - %s * rpo_minutes * interval '1 minute', now()"
                   " from protection_groups where id = %s", (age, group))


def all_pages(c: httpx.Client) -> tuple[list[tuple[str, str]], list[str]]:
    """Every (id, status) row of every page, following the pager's links from page 1; the pages."""
    rows: list[tuple[str, str]] = []
    pages, seen = ["/"], set()
    while pages:
        path = pages.pop(0)
        if path in seen:
            continue
        seen.add(path)
        html = c.get(path, headers=HTML).text
        rows += ROW.findall(html)
        nxt = re.search(r'<a rel="next" class="page-next" href="([^"]+)"', html)
        if nxt:
            pages.append(nxt.group(1))
    return rows, sorted(seen)


def test_paging_reaches_every_group_worst_first_with_counts_over_all(served: ConsoleServer,
                                                                     seeded_db: Database) -> None:
    statuses_spread(seeded_db, add_groups(seeded_db, 119))
    user = grant(seeded_db, "admin")
    truth = {r["id"]: r["rpo_status"] for r in seeded_db.sql(
        "select protection_group_id::text as id, rpo_status from protection_status")}
    assert len(truth) == 120 and set(truth.values()) == set(WORST_FIRST)
    with client(served, make_jwt(user)) as c:
        first = c.get("/", headers=HTML).text
        rows, pages = all_pages(c)
        assert pages == ["/", "/?page=2", "/?page=3"]
        ids = [i for i, _ in rows]
        assert len(ids) == len(set(ids)) == 120 and set(ids) == set(truth)  # every group, once
        assert all(truth[i] == s for i, s in rows)  # each with its status
        ranks = [WORST_FIRST.index(s) for _, s in rows]
        assert ranks == sorted(ranks) and rows[0][1] == "violated"  # worst first, across pages
        assert len(ROW.findall(first)) == 50 and first.count('class="rpo-chart"') == 50
        for status in WORST_FIRST:  # the counts are over all 120 groups, on every page
            n = sum(1 for s in truth.values() if s == status)
            for path in pages:
                assert f'id="count-{status}" data-count-status="{status}" data-count="{n}"' in \
                    c.get(path, headers=HTML).text, (status, path)
        assert 'data-total="120"' in first and "groups 1–50 shown" in first
        assert first.count('data-role="admin"') == 50  # a global admin is admin of every group
        # Scripts off: the pager is plain links, every page listed.
        assert all(f'href="/?page={n}"' in first for n in (2, 3))
        # Past the last page: no rows, the counts, a way back; a bad number: the field and the fix.
        past = c.get("/?page=9", headers=HTML)
        assert past.status_code == 200 and 'id="past-last-page"' in past.text and 'href="/?page=3"' in past.text
        assert not ROW.findall(past.text) and 'data-total="120"' in past.text
        bad = c.get("/?page=two", headers=HTML)
        assert bad.status_code == 400 and "page" in bad.text and "?page=2" in bad.text


def test_paging_costs_the_same_queries_on_every_page(served: ConsoleServer, seeded_db: Database) -> None:
    user = grant(seeded_db, "admin")
    with client(served, make_jwt(user)) as c:
        c.get("/", headers=HTML)  # the pool's first connection and the capability check
        one = statements(served, c, "/")
        groups = add_groups(seeded_db, 119)
        statuses_spread(seeded_db, groups)
        seeded_db.sql("insert into replication_jobs (protection_group_id) select unnest(%s::uuid[])", (groups,))
        seeded_db.sql("update replication_jobs set status = 'running', started_at = now(), bytes_estimated = 100"
                      " where status = 'pending'")
        seeded_db.sql("insert into rpo_events (protection_group_id, at, new_status, rpo_seconds, reason)"
                      " select id, now() - n * interval '1 hour', 'at_risk', 60, 'test'"
                      " from protection_groups, generate_series(1, 3) n")
        counts = [statements(served, c, p) for p in ("/", "/?page=2", "/?page=3", "/?page=4")]
        assert counts == [one] * 4 and one <= 4
        html = c.get("/?page=3", headers=HTML).text
        assert len(ROW.findall(html)) == 20 and html.count('<circle class="event') >= 20 * 3


def test_a_viewers_counts_and_pages_are_only_their_groups(served: ConsoleServer, seeded_db: Database) -> None:
    groups = add_groups(seeded_db, 60)
    statuses_spread(seeded_db, groups)
    mine = groups[:7]
    user = str(uuid.uuid4())
    for g in mine:
        grant(seeded_db, "operator" if g == mine[0] else "viewer", g, user=user)
    truth = {r["id"]: r["rpo_status"] for r in seeded_db.sql(
        "select protection_group_id::text as id, rpo_status from protection_status where protection_group_id = any(%s::uuid[])",
        (mine,))}
    with client(served, make_jwt(user)) as c:
        html = c.get("/", headers=HTML).text
        assert dict(ROW.findall(html)) == truth and 'data-total="7"' in html and 'class="pager"' not in html
        roles = dict(re.findall(r'data-group-id="([^"]+)" data-status="[a-z_]+" data-paused="[a-z]+" data-role="([a-z]+)"',
                                html))
        assert roles == {g: "operator" if g == mine[0] else "viewer" for g in mine}, roles
        for status in WORST_FIRST:
            n = sum(1 for s in truth.values() if s == status)
            assert f'id="count-{status}" data-count-status="{status}" data-count="{n}"' in html
