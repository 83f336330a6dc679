"""The backend thread pool: every concurrency slot gets a thread (asyncio's own pool has
min(32, CPUs + 4), 6 on a 2-core machine, fewer than the default concurrency of 8)."""

from __future__ import annotations

import asyncio
import threading

from listener import executor


async def _all_at_once(n: int) -> list[bool]:
    barrier = threading.Barrier(n, timeout=5)  # passes only when n threads wait at the same time

    def meet() -> bool:
        barrier.wait()
        return True

    return await asyncio.gather(*(asyncio.to_thread(meet) for _ in range(n)))


async def test_every_slot_gets_its_own_thread_while_a_listener_serves() -> None:
    loop = asyncio.get_running_loop()
    size = executor.install(loop, 12)
    try:
        assert size == 12 + executor.HEADROOM
        assert await _all_at_once(12) == [True] * 12
    finally:
        executor.uninstall(loop)
    assert await _all_at_once(2) == [True, True]  # a plain pool again afterwards


async def test_listeners_sharing_a_loop_add_their_threads_and_the_last_one_shuts_the_pool() -> None:
    loop = asyncio.get_running_loop()
    executor.install(loop, 8)
    executor.install(loop, 8)
    executor.uninstall(loop)
    assert await _all_at_once(16) == [True] * 16  # the second listener's slots are still there
    executor.uninstall(loop)
    assert await _all_at_once(2) == [True, True]
