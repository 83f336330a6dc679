"""The sweep's clock: it waits the sweep interval, or less when the schedule says a group is due
sooner, and a schedule that cannot run does not stop the pass."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from listener.sources.sweep import SweepSource
from listener.store import QueueState, Schedule


class Store:
    def __init__(self, schedule: Schedule | Exception) -> None:
        self.schedule = schedule
        self.calls: list[str] = []

    async def schedule_due(self) -> Schedule:
        self.calls.append("schedule_due")
        if isinstance(self.schedule, Exception):
            raise self.schedule
        return self.schedule

    async def record_rpo_transitions(self) -> int:
        self.calls.append("record_rpo_transitions")
        return 0

    async def queue_state(self) -> QueueState:
        self.calls.append("queue_state")
        return QueueState(queued=0, runnable=0, running=0, expired=0, next_run_after=None)

    async def prune(self, days: float) -> int:
        return 0


def sweep(store: Store, interval: float = 5.0) -> SweepSource:
    woken: list[int] = []
    source = SweepSource(store, lambda: woken.append(1), interval, 30.0)  # type: ignore[arg-type]
    return source


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


async def test_a_group_due_sooner_than_the_interval_shortens_the_wait() -> None:
    source = sweep(Store(Schedule(inserted=0, next_due_at=soon(2.0))))
    await source.sweep_once()
    assert 1.5 < source.pause() <= 2.0


async def test_nothing_due_or_due_later_waits_the_interval() -> None:
    for due in (None, soon(60.0)):
        source = sweep(Store(Schedule(inserted=0, next_due_at=due)))
        await source.sweep_once()
        assert source.pause() == 5.0


async def test_a_due_time_already_past_waits_the_floor_not_zero() -> None:
    source = sweep(Store(Schedule(inserted=3, next_due_at=soon(-10.0))))
    await source.sweep_once()
    assert source.pause() == 0.5


async def test_a_failing_schedule_still_wakes_and_reads_the_queue(caplog: Any) -> None:
    store = Store(RuntimeError("schedule_due did not answer"))
    source = sweep(store)
    await source.sweep_once()
    assert store.calls == ["schedule_due", "queue_state"]
    assert source.connected and source.pause() == 5.0
    assert "could not run the schedule" in caplog.text


def test_a_postgrest_row_carries_the_due_time_as_text() -> None:
    row: dict[str, Any] = {"inserted": 2, "next_due_at": "2026-12-01T12:00:00+00:00"}
    assert Schedule.from_row(row) == Schedule(2, datetime(2026, 12, 1, 12, tzinfo=timezone.utc))
