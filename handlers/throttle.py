"""Bandwidth limits per replication target: one token bucket per target, shared by every stream.

``replication_targets.bandwidth_limit_mbps`` caps all streams to a target together. Every stream
of this process to that target takes its bytes from the same ``Bucket``; the replication handler
sets the bucket's rate when a job starts and again whenever it reads the target row anew, so an
edit reaches running streams within seconds. The bucket lives in this process: two listeners
replicating to one target at the same time each allow the full limit (docs/replication.md,
*Bandwidth limits*).

The bucket lets a stream go into debt: ``take(n)`` counts n bytes that already moved (a
``splice`` cannot be asked to move exactly what the bucket allows) and then sleeps until the
balance is back at zero. Streams that share a bucket share its debt, so together they move at
the rate, whatever their number. ``chunk()`` bounds how much a stream moves between two takes,
to about a twentieth of a second's worth, which keeps the flow smooth.
"""

from __future__ import annotations

import threading
import time

MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s (SI, as link speeds are quoted)
BURST_SECONDS = 0.1  # unused allowance kept after a pause: a tenth of a second's worth
SLICE_SECONDS = 0.05
MIN_CHUNK = 16 * 1024


class Bucket:
    """A token bucket in bytes; ``rate`` None means no limit."""

    def __init__(self, rate: float | None = None) -> None:
        self._lock = threading.Lock()
        self._rate: float | None = None
        self._balance = 0.0
        self._stamp = time.monotonic()
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        """Bytes per second allowed now (None: unlimited)."""
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            if rate is not None and rate <= 0:
                rate = None
            if rate != self._rate:
                self._refill_locked(time.monotonic())
                # A debt made at the old rate is paid at the new one, but no more than a burst of it.
                if rate is not None:
                    self._balance = max(self._balance, -rate * BURST_SECONDS)
                else:
                    self._balance = 0.0
                self._rate = rate

    def chunk(self, most: int) -> int:
        """How many bytes a stream should move before its next ``take``."""
        rate = self._rate
        if rate is None:
            return most
        return max(MIN_CHUNK, min(most, int(rate * SLICE_SECONDS)))

    def _refill_locked(self, now: float) -> None:
        if self._rate is not None:
            self._balance = min(self._balance + (now - self._stamp) * self._rate, self._rate * BURST_SECONDS)
        self._stamp = now

    def take(self, moved: int, stop: threading.Event | None = None) -> None:
        """Count ``moved`` bytes and wait until the bucket is out of debt (or ``stop`` is set)."""
        while True:
            with self._lock:
                rate = self._rate
                if rate is None:
                    return
                now = time.monotonic()
                self._refill_locked(now)
                self._balance -= moved
                moved = 0
                wait = -self._balance / rate if self._balance < 0 else 0.0
            if wait <= 0:
                return
            # Wake at least every slice: a raised (or lifted) limit applies to a waiting stream too.
            pause = min(wait, SLICE_SECONDS)
            if stop is not None:
                if stop.wait(pause):
                    return
            else:
                time.sleep(pause)


class Throttles:
    """The buckets of this process, one per replication target id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}

    def bucket(self, target_id: str) -> Bucket:
        with self._lock:
            found = self._buckets.get(target_id)
            if found is None:
                found = self._buckets[target_id] = Bucket()
            return found

    def set_limit(self, target_id: str, mbps: float | None) -> None:
        """Apply ``bandwidth_limit_mbps`` (megabits per second; None or <= 0: no limit)."""
        self.bucket(target_id).set_rate(None if mbps is None or mbps <= 0 else float(mbps) * MBIT)


THROTTLES = Throttles()
