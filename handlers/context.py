"""What a handler may see of the engine while it runs."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol
from uuid import UUID


class OperationContext(Protocol):
    """Handed to a handler for one attempt of one operation.

    ``cancel`` is set when the operation was cancelled or when this worker lost its lease; a
    handler (and the blocking backend it runs in a thread) stops at its next check and raises
    ``OperationCancelled``. ``report`` writes live progress into the subject's row; it is
    throttled by the engine and silently ignored once the lease is lost.
    """

    operation_id: UUID
    kind: str
    attempt: int
    cancel: threading.Event

    async def report(self, progress: Mapping[str, Any]) -> None: ...
