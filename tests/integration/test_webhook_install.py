"""``zerfaux webhook install | uninstall`` (issue 16, section 6) against a test-only
supabase_functions schema (tests/fakes/supabase_functions.sql) that records each request the
triggers make; the test sends the recorded request on to a running listener."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from listener.cli import main
from listener.sources.webhook import WebhookSource
from tests.fakes.supabase import FakeSupabase
from tests.integration.conftest import GROUP
from tests.integration.test_supabase_native import SECRET, supabase_only
from tests.support.engine import eventually, running
from tests.support.pg import Database

FUNCTIONS = Path(__file__).parents[1] / "fakes" / "supabase_functions.sql"
URL = "https://zerfaux.example.com/webhooks/supabase"


def cli(monkeypatch: pytest.MonkeyPatch, db: Database, *args: str) -> int:
    monkeypatch.setenv("DATABASE_URL", db.url)
    monkeypatch.setenv("ZERFAUX_WEBHOOK_SECRET", SECRET)
    return main(["webhook", *args])


@pytest.fixture
def hooks_db(seeded_db: Database) -> Database:
    seeded_db.sql(FUNCTIONS.read_text())
    return seeded_db


def triggers(db: Database) -> dict[str, str]:
    return {r["tgname"]: r["def"] for r in db.sql(
        "select tgname, pg_get_triggerdef(oid) as def from pg_trigger where tgname like 'zerfaux_%webhook'")}


def test_install_creates_the_dashboards_triggers_and_uninstall_removes_them(
        hooks_db: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(monkeypatch, hooks_db, "install", "--url", URL) == 0
    out = capsys.readouterr().out
    assert "timeout 5000 ms" in out and "stored in these triggers' definitions" in out and SECRET not in out
    found = triggers(hooks_db)
    assert set(found) == {"zerfaux_operations_webhook", "zerfaux_operations_requeued_webhook", "zerfaux_cancel_webhook"}
    assert "AFTER INSERT ON zerfaux.operations" in found["zerfaux_operations_webhook"]
    assert "supabase_functions.http_request('https://zerfaux.example.com/webhooks/supabase', 'POST'" in found[
        "zerfaux_operations_webhook"]
    # A second install replaces them (a new secret or URL), it does not add more.
    assert cli(monkeypatch, hooks_db, "install", "--url", URL, "--timeout-ms", "8000") == 0
    assert len(triggers(hooks_db)) == 3 and all("'8000'" in d for d in triggers(hooks_db).values())
    assert cli(monkeypatch, hooks_db, "uninstall") == 0
    assert triggers(hooks_db) == {} and "removed: zerfaux_cancel_webhook" in capsys.readouterr().out


def test_install_refuses_where_there_is_no_supabase_functions(
        seeded_db: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(monkeypatch, seeded_db, "install", "--url", URL) == 2
    assert "no supabase_functions.http_request" in capsys.readouterr().err and triggers(seeded_db) == {}


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "ftp://x/webhooks/supabase"], "--url must be an http(s) URL"),
    (["--url", "https://zerfaux.example.com/"], "must end with the listener's webhook path"),
    (["--url", URL, "--timeout-ms", "500"], "--timeout-ms must be from 1000"),
])
def test_install_refuses_bad_arguments(hooks_db: Database, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert cli(monkeypatch, hooks_db, "install", *args) == 2
    assert message in capsys.readouterr().err and triggers(hooks_db) == {}


async def test_a_webhook_made_by_install_reaches_the_listener_which_answers_before_working(
        hooks_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeSupabase(hooks_db.url) as fake:
        settings = supabase_only(hooks_db, fake, monkeypatch)
        assert cli(monkeypatch, hooks_db, "install", "--url", URL) == 0
        hooks_db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        sent = hooks_db.one("select url, method, headers, params, timeout_ms, body from supabase_functions.sent")
        assert (sent["url"], sent["method"], sent["timeout_ms"], sent["params"]) == (URL, "POST", 5000, {})
        assert sent["headers"] == {"Content-type": "application/json", "Authorization": f"Bearer {SECRET}"}
        assert (sent["body"]["type"], sent["body"]["schema"], sent["body"]["table"]) == ("INSERT", "zerfaux", "operations")
        async with running(settings) as listener:
            webhook = next(s for s in listener.sources if isinstance(s, WebhookSource))
            await eventually(lambda: webhook.connected)
            # The store is down: whatever the webhook wakes cannot be done now, and still the
            # endpoint answers 202 at once. The answer never waits for the work.
            fake.faults.unavailable = 10**6
            async with httpx.AsyncClient() as client:
                answer = await client.post(f"http://127.0.0.1:{settings.http_port}/webhooks/supabase",
                                           headers=sent["headers"], json=sent["body"])
            assert answer.status_code == 202 and webhook.received == 1
            fake.faults.unavailable = 0
            await eventually(lambda: hooks_db.value("select status from replication_jobs") == "completed", timeout=20)
