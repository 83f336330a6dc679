"""Supabase database webhooks: a POST from pg_net wakes the dispatcher.

The body (FACTS.md) is ``{"type", "table", "schema", "record", "old_record"}``. Nothing in it is
executed or trusted: delivery is at most once and anyone holding the secret can send anything,
so a valid body is only a hint, as a NOTIFY is. The dispatcher then claims from the queue. The
one thing read from the record is whether a replication job now asks for cancellation, which
turns the hint into a poke (heartbeat now) instead of a wake.

The HTTP side (secret, size, JSON) lives in ``listener.http``; this module judges the shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from listener.sources import Wake

TABLES = frozenset({
    ("public", "vcenters"), ("public", "vcenter_vms"), ("public", "vcenter_datastores"),
    ("public", "replication_targets"), ("public", "protection_groups"), ("public", "protected_vms"),
    ("public", "replication_jobs"), ("zerfaux", "operations"),
})
TYPES = frozenset({"INSERT", "UPDATE", "DELETE"})


class BadWebhook(ValueError):
    """The JSON is not a database-webhook body; ``field`` names what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class WebhookEvent:
    type: str
    schema: str
    table: str
    cancel_requested: bool

    @classmethod
    def parse(cls, body: Any) -> WebhookEvent:
        if not isinstance(body, Mapping):
            raise BadWebhook("body", "must be a JSON object")
        kind = body.get("type")
        if not isinstance(kind, str) or kind not in TYPES:
            raise BadWebhook("type", "must be one of INSERT, UPDATE, DELETE")
        schema, table = body.get("schema"), body.get("table")
        if not isinstance(schema, str):
            raise BadWebhook("schema", "must be a string")
        if not isinstance(table, str):
            raise BadWebhook("table", "must be a string")
        if (schema, table) not in TABLES:
            raise BadWebhook("table", "is not a table Zerfaux watches")
        for name in ("record", "old_record"):
            if name in body and body[name] is not None and not isinstance(body[name], Mapping):
                raise BadWebhook(name, "must be an object or null")
        record = body.get("record")
        if kind != "DELETE" and not isinstance(record, Mapping):
            raise BadWebhook("record", f"is required for {kind}")
        cancel = (kind == "UPDATE" and table == "replication_jobs" and schema == "public"
                  and isinstance(record, Mapping) and record.get("cancel_requested") is True)
        return cls(kind, schema, table, cancel)


class WebhookSource:
    """Passive: the HTTP app hands it parsed events. Connected while the HTTP server serves."""

    name = "webhook"

    def __init__(self, wake: Wake, poke: Wake) -> None:
        self._wake = wake
        self._poke = poke
        self.connected = False
        self.received = 0

    def deliver(self, event: WebhookEvent) -> None:
        self.received += 1
        if event.cancel_requested:
            self._poke()
        self._wake()

    async def run(self) -> None:
        # Nothing to connect: the HTTP server (listener.http) sets ``connected`` while it serves.
        await asyncio.Event().wait()
