"""``zerfaux webhook install | uninstall``: the database webhooks of docs/deploy-supabase.md.

A Supabase database webhook is a trigger calling ``supabase_functions.http_request(url, method,
headers, params, timeout_ms)`` (FACTS.md); the dashboard creates exactly that. This module
creates the same triggers, over DATABASE_URL (they are DDL: there is no API call for them), on
the events that mean work: a new operation, an operation given back to 'queued', a replication
job asked to cancel. Only where ``supabase_functions`` exists (Database Webhooks enabled on a
Supabase project); elsewhere it refuses and says why.

The bearer secret is a trigger argument, so it lives in the trigger's definition
(``pg_trigger.tgargs``), as with a webhook made in the dashboard: see docs/deploy-supabase.md,
"Database webhooks", for who can read it there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from listener import sqlfile
from listener.config import ConfigError, redact_url

QUERIES = sqlfile.load(Path(__file__).with_name("webhooks.sql"))
DEFAULT_TIMEOUT_MS = 5000  # the dashboard's; pg_net's own default is 1000 ms
PATH = "/webhooks/supabase"


class WebhookInstallError(Exception):
    """The webhooks cannot be installed here; the message says why and what to do."""


@dataclass(frozen=True)
class Plan:
    url: str
    timeout_ms: int

    def describe(self) -> str:
        return "\n".join([
            "Database webhooks (triggers calling supabase_functions.http_request, POST "
            f"{self.url}, timeout {self.timeout_ms} ms, header Authorization: Bearer <ZERFAUX_WEBHOOK_SECRET>):",
            "  zerfaux_operations_webhook           after insert on zerfaux.operations",
            "  zerfaux_operations_requeued_webhook  after update of status on zerfaux.operations, to 'queued'",
            "  zerfaux_cancel_webhook               after update of cancel_requested on public.replication_jobs, to true",
            "The secret is stored in these triggers' definitions (pg_trigger), readable by every role that",
            "can run SQL on the database (not through the Data API); rotate it with install again.",
        ])


def plan(url: str, timeout_ms: int) -> Plan:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url must be an http(s) URL Supabase can reach, such as https://zerfaux.example.com{PATH}; "
                          f"got {url!r}")
    if not parts.path.rstrip("/").endswith(PATH):
        raise ConfigError(f"--url must end with the listener's webhook path {PATH}, got {url!r}")
    if not 1000 <= timeout_ms <= 60000:
        raise ConfigError(f"--timeout-ms must be from 1000 to 60000 (pg_net's default is 1000), got {timeout_ms}")
    return Plan(url, timeout_ms)


def _check(conn: psycopg.Connection[tuple[object, ...]], database_url: str) -> None:
    row = conn.execute(QUERIES["has_http_request"]).fetchone()
    if not row or not row[0]:
        raise WebhookInstallError(
            f"{redact_url(database_url)} has no supabase_functions.http_request: database webhooks exist only on "
            "Supabase with Database Webhooks enabled (Dashboard > Integrations > Database Webhooks > Enable). "
            "Elsewhere the listener is woken by LISTEN/NOTIFY or Realtime; nothing was changed")


def install(database_url: str, secret: str, target: Plan) -> list[tuple[str, str]]:
    """Create (or replace) the triggers in one transaction; answer (name, table) of each."""
    headers = json.dumps({"Content-type": "application/json", "Authorization": f"Bearer {secret}"})
    create = sql.SQL(QUERIES["create"]).format(
        url=sql.Literal(target.url), headers=sql.Literal(headers), timeout_ms=sql.Literal(str(target.timeout_ms)))
    with psycopg.connect(database_url) as conn:
        _check(conn, database_url)
        conn.execute(QUERIES["drop"])
        conn.execute(create)
        return [(str(name), str(table)) for name, table in conn.execute(QUERIES["installed"]).fetchall()]


def uninstall(database_url: str) -> list[tuple[str, str]]:
    """Drop the triggers; answer (name, table) of those that were there."""
    with psycopg.connect(database_url) as conn:
        before = [(str(n), str(t)) for n, t in conn.execute(QUERIES["installed"]).fetchall()]
        if before:
            conn.execute(QUERIES["drop"])
        return before
