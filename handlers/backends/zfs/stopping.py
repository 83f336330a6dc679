"""Which exception ends an attempt that was told to stop: a person's cancel, or the engine's stop.

A ``StopSignal`` (handlers/context.py) says why; a bare ``threading.Event`` (tests, older callers)
counts as a cancel, which is what it meant before the two were told apart.
"""

from __future__ import annotations

import threading

from handlers.errors import OperationCancelled, OperationStopped


def stopping(signal: threading.Event) -> bool:
    """The engine stopped this attempt (shutdown, lease lost): keep what a later attempt resumes from."""
    return signal.is_set() and getattr(signal, "reason", "cancel") == "stop"


def interrupted(signal: threading.Event, what: str) -> OperationCancelled | OperationStopped:
    """The exception for an attempt ended by ``signal``; ``what`` says where it was ("after 5 bytes")."""
    if stopping(signal):
        why = getattr(signal, "why", "") or "stopped"
        return OperationStopped(f"replication stopped ({why}) {what}; resumable state kept for the next attempt")
    return OperationCancelled(f"replication cancelled {what}")
