"""``CachedServiceInstance.memo``: one lookup for threads asking at once, kept for its age, errors not kept."""

from __future__ import annotations

import threading
import time

import pytest

from handlers.backends.vcenter.session import CachedServiceInstance


def test_threads_asking_at_once_share_one_lookup_and_it_expires() -> None:
    si = CachedServiceInstance("ServiceInstance", None)
    made: list[int] = []

    def make() -> str:
        made.append(1)
        time.sleep(0.05)
        return "dc-1"

    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(si.memo("dc", 60.0, make))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["dc-1"] * 8 and len(made) == 1
    assert si.memo("dc", 0.0, make) == "dc-1" and len(made) == 2  # older than max_age: looked up again
    assert si.memo("other", 60.0, lambda: "x") == "x"


def test_an_error_is_not_kept() -> None:
    si = CachedServiceInstance("ServiceInstance", None)

    def fail() -> str:
        raise RuntimeError("network 'prod' does not exist")

    with pytest.raises(RuntimeError):
        si.memo("net", 60.0, fail)
    assert si.memo("net", 60.0, lambda: "ok") == "ok"
