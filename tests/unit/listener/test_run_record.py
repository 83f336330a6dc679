"""``_Run.record``: the progress a recovery run relies on is written, or the attempt hears why not."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from handlers.errors import OperationStopped, TransientError
from listener.dispatcher import _Run
from listener.store import ClaimedOperation, StoreUnavailable


class _Store:
    def __init__(self, answers: list[str | Exception]) -> None:
        self.answers = answers
        self.calls: list[Mapping[str, Any]] = []

    async def progress(self, op_id: uuid.UUID, worker: str, progress: Mapping[str, Any]) -> str:
        self.calls.append(progress)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _run(store: _Store) -> _Run:
    op = ClaimedOperation(uuid.uuid4(), "recovery.run", uuid.uuid4(), 1, None, False, 0.0, {})
    return _Run(op, store, "w1", 0.0)  # type: ignore[arg-type]


async def test_a_brief_outage_is_ridden_out() -> None:
    store = _Store([StoreUnavailable("down"), StoreUnavailable("down"), "ok"])
    await _run(store).record({"steps": []})
    assert len(store.calls) == 3


async def test_a_long_outage_raises_transient_never_drops() -> None:
    store = _Store([StoreUnavailable("down")])
    with pytest.raises(TransientError, match="could not be recorded"):
        await _run(store).record({"steps": []}, retry_seconds=0.3)


async def test_a_lost_lease_stops_the_attempt() -> None:
    run = _run(_Store(["lost"]))
    with pytest.raises(OperationStopped):
        await run.record({"steps": []})
    assert run.lost and run.stop.reason == "stop"
    with pytest.raises(OperationStopped):  # and nothing more is sent
        await run.record({"steps": []})


async def test_a_cancel_is_signalled_and_the_record_kept() -> None:
    store = _Store(["cancel"])
    run = _run(store)
    await run.record({"steps": []})
    assert run.stop.cancelled and len(store.calls) == 1
