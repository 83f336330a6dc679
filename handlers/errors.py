"""Errors that decide what the dispatcher does next.

Backends translate library exceptions into these at their boundary; only the dispatcher
decides what happens after one is raised. Messages are read by operators: say what failed
and what they can do about it, never include a secret.
"""


class HandlerError(Exception):
    """Base of every error a handler raises on purpose."""


class PermanentError(HandlerError):
    """Bad input, not found, refused by policy: retrying cannot help, fail at once."""


class TransientError(HandlerError):
    """A network blip, a busy host, a timeout: retry with backoff."""


class OperationCancelled(HandlerError):
    """The operation stopped because somebody asked it to (``cancel_requested``)."""


class OperationStopped(HandlerError):
    """The engine stopped this attempt (shutdown, lease lost): not a failure, not a cancel.

    Resumable state was kept on purpose; the dispatcher writes nothing for the attempt (its
    operation was released or belongs to another worker by now).
    """
