"""The DR console in a real browser: headless Chromium (Debian's) against a real `zerfaux run` in
stub mode on real Postgres, signed in with Supabase-style user JWTs.

What a person checks is what is asserted: the words and colours on the page, a progress bar's own
value, the buttons' effect on the rows, the database's refusal in its own words. The oracle is
the database read directly (``protection_status``, ``replication_jobs``, ``recovery_run_steps``).
Screenshots of every page at 1280×800 and 390×844 are kept under each test's tmp_path.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.conftest import GROUP, PRIMARY
from tests.support.browser import DESKTOP, PHONE, VIEWPORTS, BrowserFactory, Page
from tests.support.console_browser import (
    SECRET, Console, Person, as_person, button, path_of, progress_values, sign_in,
)
from tests.support.pg import Database
from tests.support.tokens import sign, user_jwt
from tests.support.workload import add_groups


def _has_recovery_runs(db: Database) -> bool:
    return bool(db.value("select to_regclass('public.recovery_runs') is not null"))


def _look(page: Page, name: str) -> Path:
    """Keep a screenshot of the page as the test's artefact, and fail on what makes it hard to read."""
    shot = page.shot(name)
    problems = page.legibility()
    assert not problems, f"{name} at {page.viewport.name} ({shot}): {problems}"
    return shot


def _replicate(db: Database, *groups: str) -> None:
    """A replication job for each group, unless the schedule gave it one already (one at a time)."""
    for group in groups:
        try:
            db.sql("insert into replication_jobs (protection_group_id) values (%s)", (group,))
        except psycopg.errors.UniqueViolation:  # the schedule's sweep was first: that job will do
            pass


def _replicated(db: Database, groups: list[str], timeout: float = 90) -> None:
    """Wait until each group's newest job completed and left a recovery point on target."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = db.value("""select count(*) from protection_groups g where g.id = any(%s::uuid[])
                             and exists (select 1 from recovery_points p where p.protection_group_id = g.id
                                          and p.on_target)
                             and not exists (select 1 from replication_jobs j where j.protection_group_id = g.id
                                              and j.status in ('pending', 'running'))""", (groups,))
        if done == len(groups):
            return
        time.sleep(0.2)
    raise AssertionError(db.sql("select protection_group_id, status, error from replication_jobs"))


WORDS = {"ok": "OK", "at_risk": "at risk", "violated": "RPO violated", "unknown": "unknown"}


def _group_rows(page: Page) -> dict[str, dict[str, str]]:
    """Each group row as a person reads it: name, the status badge's words and colours, the row's text."""
    return {r["name"]: r for r in page.run("""
        return Array.from(document.querySelectorAll('#groups tr.group')).map(tr => {
          const badge = tr.querySelector('.status');
          const s = badge ? getComputedStyle(badge) : null;
          return {name: tr.querySelector('.group-name').innerText.trim(), id: tr.dataset.groupId,
                  status: badge ? badge.innerText.trim() : '', text: tr.innerText,
                  colour: s ? s.color + ' on ' + s.backgroundColor : '',
                  visible: badge ? badge.getBoundingClientRect().width > 0 : false};
        });""")}


@pytest.fixture
def groups_world(seeded_db: Database) -> Database:
    """The seed's group (unpaused) and three more: on demand (no RPO), a tight one, a loose one."""
    db = seeded_db
    db.sql("update protection_groups set paused = false where id = %s", (GROUP,))
    db.sql("update replication_targets set max_concurrent = 8")
    extra = add_groups(db.url, 3, "cb")
    names = ["cb-on-demand", "cb-hourly", "cb-stale"]
    for gid, name, rpo in zip(extra, names, [None, 60, 30]):
        db.sql("update protection_groups set name = %s, rpo_minutes = %s, paused = false where id = %s",
               (name, rpo, gid))
    return db


def test_groups_page_shows_every_group_with_its_status(groups_world: Database, tmp_path: Path,
                                                        browser: BrowserFactory) -> None:
    db = groups_world
    with Console(db, tmp_path) as console:
        ids = [r["id"] for r in db.sql("select id::text from protection_groups order by name")]
        _replicate(db, *ids)
        _replicated(db, ids)
        # cb-stale's points are made old: what a group looks like after an outage (the RPO is gone);
        # paused, so the schedule does not replicate it again before the page is read.
        db.sql("update protection_groups set paused = true where name = 'cb-stale'")
        db.sql("""update recovery_points set created_at = now() - interval '2 hours',
                                           replicated_at = now() - interval '2 hours' + interval '20 seconds'
                   where protection_group_id = (select id from protection_groups where name = 'cb-stale')""")
        # cb-hourly has a day behind it: a point every 30 minutes, each 1 to 5 minutes on the way,
        # so its chart is a sawtooth under the dashed target.
        db.sql("""insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)
                  select g.id, 'zerfaux_cb_' || k, 'cb-' || k, now() - k * interval '30 minutes',
                         now() - k * interval '30 minutes' + (1 + k % 5) * interval '1 minute'
                    from protection_groups g cross join generate_series(1, 48) k where g.name = 'cb-hourly'""")
        admin = console.person("admin")
        expected = {r["name"]: r["rpo_status"] for r in db.sql("select name, rpo_status from protection_status")}
        assert set(expected.values()) >= {"ok", "violated", "unknown"}, expected
        for viewport in VIEWPORTS:
            page = browser(viewport)
            _look(page.open(console.url + "/login"), "login")
            sign_in(page, console.url, admin.token)
            assert path_of(page) == "/", page.url
            _look(page, "groups")
            rows = _group_rows(page)
            assert set(rows) == set(expected), (sorted(rows), sorted(expected))
            for name, status in expected.items():
                assert rows[name]["status"] == WORDS[status], (viewport.name, name, status, rows[name])
                assert rows[name]["visible"], (viewport.name, name)
            # Status in colour: the states a person must tell apart at a glance look different.
            colours = {status: rows[name]["colour"] for name, status in expected.items()}
            assert len(set(colours.values())) == len(set(expected.values())), colours
            stale = rows["cb-stale"]["text"]
            assert "30m" in stale and re.search(r"\b2h", stale), stale  # the target, and the RPO now


def test_progress_bar_advances_during_a_stub_replication(groups_world: Database, tmp_path: Path,
                                                          browser: BrowserFactory) -> None:
    db = groups_world
    with Console(db, tmp_path, ZERFAUX_STUB_SECONDS="40") as console:
        operator = console.person("operator")
        _replicate(db, GROUP)
        page = browser(DESKTOP)
        sign_in(page, console.url, operator.token)
        for where in ("/", f"/groups/{GROUP}"):
            page.open(console.url + where)
            page.run("window.__notReloaded = true")
            first = page.wait(lambda: [v for v in progress_values(page) if 0 < v < 1], 60,
                              what=f"a running progress bar on {where}")[0]
            _look(page, "progress-" + ("groups" if where == "/" else "group"))
            later = page.wait(lambda: [v for v in progress_values(page) if v > first], 60,
                              what=f"the progress bar on {where} moving past {first:.2f}")[0]
            assert page.run("return window.__notReloaded === true"), "the page reloaded instead of updating"
            moved = db.one("select bytes_transferred, bytes_estimated from replication_jobs"
                           " where protection_group_id = %s order by created_at desc limit 1", (GROUP,))
            # The bar shows the job's real share, never ahead of what the database has.
            assert later <= moved["bytes_transferred"] / moved["bytes_estimated"] + 1e-6, (later, moved)
        page.open(console.url + f"/groups/{GROUP}")
        _look(page, "group-running")


def test_a_later_page_stays_live_and_the_counts_follow_every_group(groups_world: Database, tmp_path: Path,
                                                                   browser: BrowserFactory) -> None:
    """Paging: 60 more groups, OK and paused (the schedule leaves them be), so page 2 holds OK
    groups only. A replication of page 2's last group moves its bar on the open page; a recovery
    point for a group on page 1 moves the counts line, both without a reload."""
    db = groups_world
    extra = add_groups(db.url, 60, "cbp")
    db.sql("update protection_groups set rpo_minutes = 30, paused = true where id = any(%s::uuid[])", (extra,))
    db.sql("""insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)
              select id, 'zerfaux_cbp', 'cbp-' || id, now() - interval '1 minute', now()
                from protection_groups where id = any(%s::uuid[])""", (extra,))
    with Console(db, tmp_path, ZERFAUX_STUB_SECONDS="40") as console:
        operator = console.person("operator")
        page = browser(DESKTOP)
        sign_in(page, console.url, operator.token)
        page.open(console.url + "/?page=2")
        rows = _group_rows(page)
        assert rows and {r["id"] for r in rows.values()} <= set(extra), sorted(rows)  # OK ones come last
        assert page.css("#pager-top [aria-current=page]")[0].text == "2"
        target = list(rows.values())[-1]["id"]
        counts = {s: int(page.css(f"#count-{s}")[0].get_attribute("data-count")) for s in ("ok", "unknown")}
        assert counts["ok"] == 60 and counts["unknown"] >= 1, counts
        page.run("window.__notReloaded = true")
        _replicate(db, target)
        first = page.wait(lambda: [v for v in progress_values(page) if 0 < v < 1], 60,
                          what="a running progress bar on page 2")[0]
        page.wait(lambda: [v for v in progress_values(page) if v > first], 60,
                  what=f"the progress bar on page 2 moving past {first:.2f}")
        # cb-hourly (page 1, unknown: no point yet) gets a recovery point: it is OK now.
        db.sql("""insert into recovery_points (protection_group_id, snapshot_name, guid, created_at, replicated_at)
                  select id, 'zerfaux_cbp_h', 'cbp-h', now(), now() from protection_groups where name = 'cb-hourly'""")
        page.wait(lambda: page.css("#count-ok")[0].get_attribute("data-count") == str(counts["ok"] + 1), 60,
                  what="the counts line counting cb-hourly as OK")
        assert page.css("#count-unknown")[0].get_attribute("data-count") == str(counts["unknown"] - 1)
        assert page.run("return window.__notReloaded === true"), "the page reloaded instead of updating"
        _look(page, "groups-page-2")


def test_a_viewer_is_shown_the_databases_refusal(groups_world: Database, tmp_path: Path,
                                                 browser: BrowserFactory) -> None:
    db = groups_world
    with Console(db, tmp_path) as console:
        viewer = console.person("viewer")
        # The on-demand group: no schedule starts a job there while the test runs (which the
        # database would name first: one job at a time per group).
        group = db.value("select id::text from protection_groups where name = 'cb-on-demand'")
        refusal = as_person(db, viewer, "insert into replication_jobs (protection_group_id) values (%s)", (group,))
        assert refusal and "row-level security" in refusal, refusal
        before = db.value("select count(*) from replication_jobs")
        for viewport in VIEWPORTS:
            page = browser(viewport)
            sign_in(page, console.url, viewer.token)
            page.open(console.url + f"/groups/{group}")
            button(page, r"^replicate now$").click()
            page.wait(lambda: page.css("#refusal-message"), 20, what="the refusal page")
            assert page.css("#refusal-message")[0].text == refusal, (page.text()[:1000], refusal)
            _look(page, "viewer-refused")
        assert db.value("select count(*) from replication_jobs") == before


@pytest.mark.parametrize("how", ["forged", "expired", "alg-none", "service-role", "garbage"])
def test_a_bad_jwt_gets_no_page(groups_world: Database, tmp_path: Path, browser: BrowserFactory, how: str) -> None:
    db = groups_world
    with Console(db, tmp_path) as console:
        admin = console.person("admin")
        token = {
            "forged": user_jwt("another-projects-secret-0123456789abcdef", admin.user_id),
            "expired": user_jwt(SECRET, admin.user_id, expires_in=-600),
            "alg-none": user_jwt(SECRET, admin.user_id, alg="none"),
            "service-role": sign({"role": "service_role", "iss": "supabase", "exp": int(time.time()) + 3600}, SECRET),
            "garbage": "not-a-jwt",
        }[how]
        # A script gets 401 and nothing about the groups.
        for path in ("/", f"/groups/{GROUP}", "/feed"):
            r = httpx.get(console.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 401, (path, r.status_code, r.text[:300])
            assert "gold" not in r.text
        # A browser holding that cookie is sent to /login and sees no group.
        page = browser(PHONE)
        page.open(console.url + "/login")
        page.cookie("zerfaux_console", token)
        for path in ("/", f"/groups/{GROUP}"):
            page.open(console.url + path)
            assert path_of(page) == "/login", (path, page.url)
            assert "gold" not in page.text()
        # Pasting it into /login signs nobody in, and says why.
        page.driver.delete_all_cookies()
        sign_in(page, console.url, token)
        assert page.css("#login-error"), page.text()[:500]
        _look(page, f"login-refused-{how}")
        page.open(console.url + "/")
        assert path_of(page) == "/login", page.url
        assert "gold" not in page.text()


def test_pages_read_correctly_with_javascript_off(groups_world: Database, tmp_path: Path,
                                                  browser: BrowserFactory) -> None:
    db = groups_world
    with Console(db, tmp_path, ZERFAUX_STUB_SECONDS="60") as console:
        operator = console.person("operator")
        _replicate(db, GROUP)
        for viewport in VIEWPORTS:
            page = browser(viewport, javascript=False)
            sign_in(page, console.url, operator.token)  # a plain form post
            assert path_of(page) == "/", page.text()[:500]
            assert page.run("return document.body.getAttribute('data-feed')") is None  # no script ran
            expected = {r["name"]: r["rpo_status"] for r in db.sql("select name, rpo_status from protection_status")}
            rows = _group_rows(page)
            assert {n: r["status"] for n, r in rows.items()} == {n: WORDS[s] for n, s in expected.items()}
            # The running job's bar is in the HTML itself, with the share the database had.
            bars = page.wait(lambda: (page.open(console.url + "/"), progress_values(page))[1], 60,
                             what="a progress bar rendered by the server")
            job = db.one("select bytes_transferred, bytes_estimated from replication_jobs where status = 'running'")
            assert 0 <= bars[0] <= job["bytes_transferred"] / job["bytes_estimated"] + 1e-6, (bars, job)
            _look(page, "groups")
            page.open(console.url + f"/groups/{GROUP}")
            assert page.css("#group-name")[0].text == "gold"
            assert page.css("#action-replicate") and page.css("#action-test")  # the forms are there without JS
            _look(page, "group")


@pytest.fixture
def recovery_world(groups_world: Database) -> Database:
    db = groups_world
    if not _has_recovery_runs(db):
        pytest.skip("recovery_runs is not in this build's migrations (issue 13's rec-sql branch)")
    for i, prio in ((1, 1), (2, 2)):
        name = f"cb-app-{i}"
        vm = db.value("""insert into vcenter_vms (vcenter_id, moref, name, datastore, num_cpu, memory_mb, guest_id,
                                                  disks, networks)
                         values (%s, %s, %s, 'zfs-protect-01', 2, 4096, 'ubuntu64Guest', %s::jsonb, '["VM Network"]')
                         returning id""",
                      (PRIMARY, f"vm-cb-{i}", name,
                       f'[{{"file": "[zfs-protect-01] {name}/{name}.vmdk", "capacity": 17179869184,'
                       f' "datastore": "zfs-protect-01", "controller": "pvscsi"}}]'))
        db.sql("insert into protected_vms (protection_group_id, vm_id, boot_priority) values (%s, %s, %s)",
               (GROUP, vm, prio))
    db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
           " values (%s, 'VM Network', 'DR Network')", (GROUP,))
    return db


def _steps_shown(page: Page) -> list[tuple[str, str]]:
    return [(str(a), str(b)) for a, b in page.run(
        "return Array.from(document.querySelectorAll('#steps li.step'))"
        ".map(li => [li.querySelector('.step-name').innerText, li.querySelector('.step-status').innerText])")]


def test_an_operator_starts_a_test_failover_and_sees_its_steps(recovery_world: Database, tmp_path: Path,
                                                               browser: BrowserFactory) -> None:
    db = recovery_world
    with Console(db, tmp_path, ZERFAUX_STUB_SECONDS="2") as console:
        _replicate(db, GROUP)
        _replicated(db, [GROUP])
        viewer, operator = console.person("viewer"), console.person("operator")
        refusal = as_person(db, viewer, "insert into recovery_runs (protection_group_id, kind) values (%s, 'test')",
                            (GROUP,))
        assert refusal, "the database let a viewer start a test failover"

        page = browser(DESKTOP)
        sign_in(page, console.url, viewer.token)
        page.open(console.url + f"/groups/{GROUP}")
        button(page, r"test failover").click()
        button(page, r"^yes").click()
        page.wait(lambda: page.css("#refusal-message"), 20, what="the refusal page")
        assert page.css("#refusal-message")[0].text == refusal
        assert db.value("select count(*) from recovery_runs") == 0

        page = browser(DESKTOP)
        sign_in(page, console.url, operator.token)
        page.open(console.url + f"/groups/{GROUP}")
        button(page, r"test failover").click()
        # The confirmation names what will happen: which VMs power on, where, on which network.
        confirm = page.wait(lambda: page.css("#confirm-vms"), 20, what="a confirmation")[0].text
        assert "cb-app-1" in confirm and "cb-app-2" in confirm and "isolated test port group" in confirm, confirm
        _look(page, "confirm-test")
        button(page, r"^yes").click()
        page.wait(lambda: path_of(page).startswith("/runs/"), 20, what="the run's page")
        run_id = path_of(page).rsplit("/", 1)[1]
        run = db.one("select requested_by::text, kind from recovery_runs where id = %s", (run_id,))
        assert run == {"requested_by": operator.user_id, "kind": "test"}
        page.run("window.__notReloaded = true")
        # The steps appear and move on while the page stays open.
        try:
            page.wait(lambda: any(st == "done" for _, st in _steps_shown(page)), 90, what="a step done")
        except AssertionError:
            print(db.sql("select kind, status, attempts, last_error, run_after, worker_id from zerfaux.operations"))
            print(console.output[-5000:])
            raise
        _look(page, "run-running")
        page.wait(lambda: db.value("select status from recovery_runs where id = %s", (run_id,))
                  in ("active", "failed"), 180, what="the run settling")
        rows = db.sql("select name, status from recovery_run_steps where run_id = %s order by seq", (run_id,))
        page.wait(lambda: _steps_shown(page) == [(r["name"], r["status"]) for r in rows], 30,
                  what=f"every step as the database has it: {rows}")
        assert page.run("return window.__notReloaded === true"), "the page reloaded instead of updating"
        assert db.value("select status from recovery_runs where id = %s", (run_id,)) == "active"
        assert page.css("#run-status")[0].text == "active"
        for viewport in VIEWPORTS:
            shots = browser(viewport)
            sign_in(shots, console.url, operator.token)
            for where, name in ((f"/runs/{run_id}", "run"), (f"/runs/{run_id}/report", "report"),
                                (f"/groups/{GROUP}", "group-tested"),
                                (f"/groups/{GROUP}/confirm/cleanup?test_run={run_id}", "confirm-cleanup")):
                shots.open(console.url + where)
                assert "gold" in shots.text(), (where, shots.text()[:500])
                _look(shots, name)
