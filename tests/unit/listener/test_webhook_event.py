"""What a database-webhook body may be, and the one thing read from it."""

from __future__ import annotations

from typing import Any

import pytest

from listener.sources.webhook import BadWebhook, WebhookEvent, WebhookSource


def test_a_job_asking_for_cancellation_is_the_only_poke() -> None:
    cancel = WebhookEvent.parse({"type": "UPDATE", "schema": "public", "table": "replication_jobs",
                                 "record": {"cancel_requested": True}, "old_record": {}})
    insert = WebhookEvent.parse({"type": "INSERT", "schema": "public", "table": "replication_jobs",
                                 "record": {"cancel_requested": True}, "old_record": None})
    assert cancel.cancel_requested and not insert.cancel_requested
    calls: list[str] = []
    source = WebhookSource(lambda: calls.append("wake"), lambda: calls.append("poke"))
    source.deliver(cancel)
    source.deliver(insert)
    assert calls == ["poke", "wake", "wake"] and source.received == 2


@pytest.mark.parametrize(("body", "field"), [
    (None, "body"), ({"type": ["INSERT"]}, "type"), ({"type": {"a": 1}}, "type"),
    ({"type": "INSERT", "schema": ["public"], "table": "vcenters"}, "schema"),
    ({"type": "INSERT", "schema": "public", "table": {"t": 1}}, "table"),
    ({"type": "DELETE", "schema": "public", "table": "vcenters", "old_record": 3}, "old_record"),
])
def test_unhashable_or_misplaced_values_are_named_not_raised(body: Any, field: str) -> None:
    with pytest.raises(BadWebhook) as caught:
        WebhookEvent.parse(body)
    assert caught.value.field == field


def test_a_delete_needs_no_record() -> None:
    event = WebhookEvent.parse({"type": "DELETE", "schema": "public", "table": "protected_vms", "record": None})
    assert (event.type, event.table, event.cancel_requested) == ("DELETE", "protected_vms", False)
