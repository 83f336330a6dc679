"""A real `zerfaux run` serving the console (ZERFAUX_HTTP_PORT, stub backends, real Postgres), the
people who sign in to it, and what a person does in a browser: sign in, click, read.

    with Console(db, tmp_path, ZERFAUX_STUB_SECONDS="30") as console:
        viewer = console.person("viewer")            # a zerfaux.operators row and a JWT
        page = browser(PHONE)
        sign_in(page, console.url, viewer.token)
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.support.browser import Page
from tests.support.pg import Database
from tests.support.tokens import user_jwt
from tests.support.workload import Proc

SECRET = "zerfaux-console-test-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Person:
    user_id: str
    role: str
    token: str

    def claims(self) -> str:
        return json.dumps({"sub": self.user_id, "role": "authenticated", "aud": "authenticated"})


class Console:
    """The listener as a subprocess; ``url`` is its HTTP root once ``/healthz`` answers."""

    def __init__(self, db: Database, tmp_path: Path, **env: str) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"ZERFAUX_USE_STUBS": "true", "ZERFAUX_STUB_WORLD": str(tmp_path / "world"),
                    "ZERFAUX_STUB_VMS": "2", "ZERFAUX_HTTP_PORT": str(self.port), "ZERFAUX_HTTP_HOST": "127.0.0.1",
                    "ZERFAUX_JWT_SECRET": SECRET, "ZERFAUX_WORKER_ID": f"console-{self.port}", **env}
        self.proc: Proc | None = None

    def __enter__(self) -> Console:
        self.proc = Proc(self.db.url, "run", env=self.env)
        self.proc.wait_for_line("listening as")
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"no HTTP on {self.url}:\n{self.proc.output[-3000:]}"
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            code = self.proc.stop()
            assert code == 0, f"listener exited {code}:\n{self.proc.output[-3000:]}"

    @property
    def output(self) -> str:
        return self.proc.output if self.proc else ""

    def person(self, role: str, group_id: str | None = None) -> Person:
        """Someone with a ``zerfaux.operators`` row (all groups, or one) and a fresh JWT."""
        user_id = str(uuid.uuid4())
        self.db.sql("insert into zerfaux.operators (user_id, role, protection_group_id) values (%s, %s, %s)",
                    (user_id, role, group_id))
        return Person(user_id, role, user_jwt(SECRET, user_id, email=f"{role}-{user_id[:6]}@example.test"))


def as_person(db: Database, person: Person, query: str, params: Any = None) -> str | None:
    """Run ``query`` as the person would through the API (role authenticated, their claims) and
    return the database's refusal in its own words, or None when it was allowed (rolled back)."""
    with psycopg.connect(db.url) as conn:
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("set local role authenticated")
                conn.execute("select set_config('request.jwt.claims', %s, true)", (person.claims(),))
                conn.execute(query, params)
        except psycopg.Error as exc:
            return exc.diag.message_primary or str(exc)
    return None


# --- in the browser ------------------------------------------------------------------------

def sign_in(page: Page, base: str, token: str) -> None:
    """What a person does at /login: paste the token into the form and press Sign in."""
    page.open(base + "/login")
    fields = page.css("#login textarea[name=token]")
    assert fields, f"/login shows no field to paste a token into:\n{page.text()[:1000]}"
    fields[0].send_keys(token)
    page.css("#login button[type=submit]")[0].click()
    page.wait(lambda: path_of(page) != "/login" or page.css("#login-error"), 20, what="the sign-in answer")


def path_of(page: Page) -> str:
    return httpx.URL(page.url).path


def button(page: Page, words: str, timeout: float = 20.0) -> Any:
    """The visible button whose label a person reads as ``words`` (a regex, any case), waited for:
    after a click the old page's buttons go stale while the next page loads."""
    def find() -> Any:
        for b in page.css("button, input[type=submit]"):
            if b.is_displayed() and re.search(words, b.text or b.get_attribute("value") or "", re.I):
                return b
        return None
    return page.wait(find, timeout, what=f"a button like {words!r}")


def progress_values(page: Page) -> list[float]:
    """Each determinate progress bar's value as a share of its maximum (0..1), in page order
    (an indeterminate one, a job that has no estimate yet, has no value)."""
    return [float(v) for v in page.run("""
        return Array.from(document.querySelectorAll('progress, [role=progressbar]')).map(e => {
          if (e.tagName === 'PROGRESS') { return e.hasAttribute('value') ? e.value / e.max : NaN; }
          const max = parseFloat(e.getAttribute('aria-valuemax') || '100');
          const min = parseFloat(e.getAttribute('aria-valuemin') || '0');
          return (parseFloat(e.getAttribute('aria-valuenow') || 'NaN') - min) / (max - min);
        }).filter(v => !isNaN(v));""")]
