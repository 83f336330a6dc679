"""The token bucket that carries a target's bandwidth limit, and the rate a job reports."""

from __future__ import annotations

import threading
import time

from handlers.replication import Rate, bandwidth_limit
from handlers.throttle import MBIT, Bucket, Throttles


def _pump(bucket: Bucket, seconds: float, chunk: int = 64 * 1024) -> int:
    moved = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n = bucket.chunk(chunk)
        bucket.take(n)
        moved += n
    return moved


def test_streams_sharing_a_bucket_move_at_its_rate_together() -> None:
    bucket = Bucket(4_000_000)
    counts = [0, 0, 0]

    def run(i: int) -> None:
        counts[i] = _pump(bucket, 1.0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Three streams, one limit: together about 4 MB in a second (plus one burst and a chunk each).
    assert 3_400_000 < sum(counts) < 4_900_000, counts
    assert min(counts) > 0


def test_a_new_rate_reaches_a_stream_that_is_waiting() -> None:
    bucket = Bucket(1_000_000)
    started = time.monotonic()
    threading.Timer(0.2, bucket.set_rate, args=(None,)).start()
    bucket.take(2_000_000)  # two seconds of debt at this rate, unless the limit is lifted meanwhile
    assert 0.15 < time.monotonic() - started < 1.0


def test_no_limit_never_waits_and_gives_whole_chunks() -> None:
    bucket = Bucket(None)
    started = time.monotonic()
    for _ in range(1000):
        bucket.take(1 << 30)
    assert time.monotonic() - started < 0.5
    assert bucket.chunk(1 << 25) == 1 << 25


def test_limits_are_per_target_and_in_megabits() -> None:
    throttles = Throttles()
    throttles.set_limit("a", 50)
    throttles.set_limit("b", None)
    assert throttles.bucket("a").rate == 50 * MBIT == 6_250_000
    assert throttles.bucket("b").rate is None
    assert throttles.bucket("a") is throttles.bucket("a")
    throttles.set_limit("a", 0)
    assert throttles.bucket("a").rate is None


def test_bandwidth_limit_from_the_row() -> None:
    assert bandwidth_limit({"bandwidth_limit_mbps": None}) is None
    assert bandwidth_limit({}) is None
    assert bandwidth_limit({"bandwidth_limit_mbps": "12.5"}) == 12.5
    assert bandwidth_limit({"bandwidth_limit_mbps": 0}) is None


def test_rate_over_the_last_seconds() -> None:
    rate = Rate(window=3.0)
    assert rate.sample(0, now=100.0) is None
    assert rate.sample(1000, now=101.0) == 1000
    assert rate.sample(3000, now=102.0) == 1500
    assert rate.sample(3000, now=106.0) in (0, 750)  # stalled: the rate falls
    assert rate.sample(3000, now=110.0) == 0
    assert rate.sample(10, now=111.0) is None  # a new transfer starts counting again
