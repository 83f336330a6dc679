"""What the engine needs from a database, whichever way it is reached.

Two stores implement it: ``store_pg.PostgresStore`` (psycopg, a direct or session-pooler
connection) and the PostgREST store (RPC calls with the service-role key). Both call the same
SQL functions of the migrations, so the behaviour is the same; only the wire differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

from listener.protection import GroupStatus, RpoCompliance

T = TypeVar("T")

# Calls made for a running attempt. Their retries are bounded below the lease (the stores'
# ``attempt_retry_seconds``): a write that could only land after the lease passed to another
# worker is worth nothing, and waiting for it would hold the attempt's slot. Claims, the sweep
# and status keep the longer budget that rides out a database restart.
ATTEMPT_CALLS = frozenset(
    {"heartbeat", "progress", "current_input", "complete", "complete_many", "fail", "finish_cancelled",
     "release"}
)


class StoreUnavailable(RuntimeError):
    """The database cannot be reached; the message names it (password hidden) and why."""


async def within(seconds: float, call: Coroutine[Any, Any, T], what: str) -> T:
    """Await ``call`` for at most ``seconds``, then give up on it without waiting for it to
    unwind: psycopg spends up to 10 s cancelling a query on a dead (half-open) connection, which
    ``asyncio.wait_for`` would wait for."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_discard)
        raise StoreUnavailable(f"{what} did not answer within {seconds:.1f}s")
    return task.result()


def _discard(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


@dataclass(frozen=True)
class ClaimedOperation:
    id: UUID
    kind: str
    subject_id: UUID
    attempts: int
    max_attempts: int | None  # None: no count cap, retried for the retry window instead
    cancel_requested: bool
    waited_seconds: float  # from run_after (the enqueue, for a first attempt) to this claim
    payload: Mapping[str, Any] | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ClaimedOperation:
        return cls(
            id=UUID(str(row["id"])),
            kind=row["kind"],
            subject_id=UUID(str(row["subject_id"])),
            attempts=int(row["attempts"]),
            max_attempts=None if row.get("max_attempts") is None else int(row["max_attempts"]),
            cancel_requested=bool(row["cancel_requested"]),
            waited_seconds=float(row.get("waited_seconds") or 0.0),
            payload=row["payload"],
        )


@dataclass(frozen=True)
class QueueState:
    queued: int
    runnable: int
    running: int
    expired: int
    next_run_after: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> QueueState:
        return cls(
            queued=int(row["queued"]),
            runnable=int(row["runnable"]),
            running=int(row["running"]),
            expired=int(row["expired"]),
            next_run_after=row["next_run_after"],
        )


@dataclass(frozen=True)
class Schedule:
    """One pass of ``zerfaux.schedule_due()``: jobs inserted, and when the next group is due
    (None: no group is scheduled, or every scheduled one has a job)."""

    inserted: int
    next_due_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Schedule:
        due = row.get("next_due_at")
        if isinstance(due, str):  # JSON (PostgREST) carries timestamps as text
            due = datetime.fromisoformat(due)
        return cls(inserted=int(row.get("inserted") or 0), next_due_at=due)


class Store(Protocol):
    description: str  # where it points, password hidden

    async def open(self) -> None:
        """Connect; raise ``StoreUnavailable`` naming the database and the reason."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when the database does not answer."""

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, held: Sequence[UUID] | None = None
    ) -> list[ClaimedOperation]:
        """Claim up to ``limit`` operations. ``held``: the ids this worker knows it runs; any
        other operation running under ``worker`` (a retried claim whose answer was lost) comes
        back too, as it is, no attempt counted. None: no such reconciling."""

    async def heartbeat(self, worker: str, ids: Sequence[UUID], lease_seconds: float) -> dict[UUID, bool]:
        """Renew leases; answer {id: cancel_requested} for every id still held."""

    async def progress(self, op_id: UUID, worker: str, progress: Mapping[str, Any]) -> str: ...

    async def current_input(self, op_id: UUID, worker: str) -> Mapping[str, Any] | None:
        """The kind's input for an operation this worker holds, read now (zerfaux.current_input)."""

    async def complete_many(
        self, worker: str, items: Sequence[tuple[UUID, Mapping[str, Any]]]
    ) -> dict[UUID, tuple[bool, str | None]]:
        """Complete several operations in one transaction: {id: (done, error writing the result)}."""

    async def fail(
        self, op_id: UUID, worker: str, error: str, permanent: bool, retry_seconds: float
    ) -> str:
        """'retrying' (again after ``retry_seconds``), 'failed' (permanent, past the store's retry
        window or an explicit max_attempts) or 'lost'."""

    async def finish_cancelled(self, op_id: UUID, worker: str, message: str) -> bool: ...

    async def release(self, worker: str, ids: Sequence[UUID]) -> int: ...

    async def prune(self, days: float) -> int: ...

    async def queue_state(self) -> QueueState: ...

    async def schedule_due(self) -> Schedule:
        """Insert one replication job (origin 'schedule') for each group that is due, and write
        every group's next_replication_at (zerfaux.schedule_due, docs/rpo.md). Safe to call from
        many listeners at once: a due group still gets one job."""

    async def record_rpo_transitions(self) -> int:
        """Record in rpo_events every group whose rpo_status changed since the last recorded
        one; answer how many (zerfaux.record_rpo_transitions). Concurrent callers record each
        transition once."""

    async def vault_secret(self, name: str) -> str | None:
        """A secret from Supabase Vault, or None where there is no Vault or no such secret."""

    async def claim_mode(self, mode: str) -> str:
        """The database's mode ('stub' | 'real'); ``mode`` is recorded first when none is yet.
        Atomic: listeners starting at once get the same answer."""

    async def set_mode(self, mode: str) -> str | None:
        """Record ``mode`` on purpose (``zerfaux mode``); answer the mode it replaced, or None."""

    async def database_mode(self) -> str | None:
        """The recorded mode, None before any listener started."""

    async def broadcast_ready(self) -> bool:
        """Whether enqueueing sends Broadcast from Database hints (zerfaux.broadcast_ready: the
        realtime schema and Zerfaux's policies on realtime.messages are there). Read only."""

    async def status_report(self, recent: int = 15, worker_seconds: float = 120.0) -> dict[str, Any]:
        """What `zerfaux status` shows (zerfaux.status_report): by_kind, recent, workers,
        oldest_queued_seconds; timestamps as ISO text."""

    async def protection_overview(self) -> list[GroupStatus]:
        """Every group's row of public.protection_status (zerfaux.protection_overview), by name."""

    async def rpo_report(self, since: datetime, until: datetime) -> list[RpoCompliance]:
        """Every group's RPO compliance over [since, until) (zerfaux.rpo_report), by name."""

    async def run_report(self, run_id: UUID) -> dict[str, Any] | None:
        """A recovery run's report (zerfaux.run_report: run, group, recovery point, steps,
        per-VM boot and ready times, RTO, data loss, warnings); None when there is no such run."""
