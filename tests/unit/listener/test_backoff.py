from __future__ import annotations

from listener.backoff import Backoff


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    backoff = Backoff(base=1.0, maximum=20.0)
    for attempt, low in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)]:
        delays = [backoff(attempt) for _ in range(50)]
        assert all(low <= d <= low + 1.0 for d in delays)
        assert len(set(delays)) > 1  # jitter: replicas do not retry in lockstep
    assert all(backoff(30) == 20.0 for _ in range(10))
