"""Delay before retry n: tenacity's exponential wait with jitter, usable outside a retry loop.

tenacity's wait functions take a ``RetryCallState``; the dispatcher and the event sources count
attempts themselves, so this builds the state they need in one place.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential_jitter


class Backoff:
    """``base * 2**(n-1)`` plus up to ``jitter`` (default ``base``) seconds, never above ``maximum``."""

    def __init__(self, base: float, maximum: float, jitter: float | None = None) -> None:
        spread = max(base, 0.0) if jitter is None else jitter
        self._wait = wait_exponential_jitter(multiplier=base, max=maximum, jitter=spread)
        self._max = maximum

    def __call__(self, attempt: int) -> float:
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = max(attempt, 1)
        return min(float(self._wait(state)), self._max)
