"""What a handler may see of the engine while it runs."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Literal, Protocol
from uuid import UUID

StopReason = Literal["cancel", "stop"]


class StopSignal(threading.Event):
    """Tells a running attempt to stop, and why. Backends wait on it like an Event.

    - ``cancel``: a person asked (``cancel_requested``). Stop and clean up as a cancel does:
      abort a resumable receive, cancel a running vCenter task. The attempt ends 'cancelled'.
    - ``stop``: the engine stops this attempt (shutdown, or the lease is lost or about to be).
      Kill local processes, start nothing new, but keep resumable state (a receive's resume
      token, a running vCenter task): the next attempt, perhaps on another listener, resumes or
      adopts it. A stopped attempt must not clean up anything a later attempt may own.

    ``stop`` overrides ``cancel`` (a fenced worker never cleans up), never the other way round.
    """

    def __init__(self) -> None:
        super().__init__()
        self._reason: StopReason | None = None
        self._why = ""
        self._guard = threading.Lock()

    @property
    def reason(self) -> StopReason | None:
        return self._reason

    @property
    def why(self) -> str:
        """In words, for logs and errors: 'cancel requested', 'lease lost', 'shutting down'."""
        return self._why

    @property
    def cancelled(self) -> bool:
        """True only for a person's cancel: the one reason that allows cleaning up."""
        return self._reason == "cancel"

    def cancel(self, why: str = "cancel requested") -> None:
        with self._guard:
            if self._reason is None:
                self._reason, self._why = "cancel", why
        super().set()

    def stop(self, why: str) -> None:
        with self._guard:
            self._reason, self._why = "stop", why
        super().set()

    def set(self) -> None:  # a bare Event.set() is the cautious reason
        self.stop("stopped")


class OperationContext(Protocol):
    """Handed to a handler for one attempt of one operation.

    ``stop`` is set when the operation was cancelled, when this worker is shutting down, or when
    it lost (or is about to lose) its lease; ``stop.reason`` says which (see ``StopSignal``). A
    handler and the blocking backend it runs in a thread stop at their next check and raise
    ``OperationCancelled`` (cancel) or ``OperationStopped`` (stop). ``cancel`` is the same
    object, the older name. ``report`` writes live progress into the subject's row; it is
    throttled by the engine and silently ignored once the lease is lost. The engine's context also
    has ``async reread() -> Mapping | None``: the operation's input as the database has it now
    (None once the lease is lost); handlers look for it with ``getattr``, as test contexts lack it.
    It also has ``async record(progress)``: like ``report`` but never silently dropped, for
    progress a handler relies on (a recovery step recorded before its effect): it raises
    ``OperationStopped`` once the lease is lost and ``TransientError`` when the store stays away.
    """

    operation_id: UUID
    kind: str
    attempt: int
    stop: StopSignal
    cancel: StopSignal

    async def report(self, progress: Mapping[str, Any]) -> None: ...
