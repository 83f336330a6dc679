"""The listener's own thread pool for blocking backends, sized to ``ZERFAUX_CONCURRENCY``.

Handlers run their blocking backends (pyVmomi, paramiko, ``zfs`` pipes) through
``asyncio.to_thread``, which uses the event loop's default executor. asyncio sizes that to
min(32, CPUs + 4): 6 threads on a 2-core machine, below the default concurrency of 8, so the 7th
and 8th claimed operations would wait for a thread while their leases run. While it serves, a
listener installs a pool with a thread for every slot plus ``HEADROOM`` for the engine's own
``to_thread`` calls (a Vault lookup, closing backends).

Several listeners may share one event loop (tests do): each adds its threads to the loop's pool,
and the pool is shut down when the last of them stops.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

HEADROOM = 4


@dataclass
class _Shared:
    users: int = 0
    workers: int = 0
    pools: list[ThreadPoolExecutor] = field(default_factory=list)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shared] = weakref.WeakKeyDictionary()


def install(loop: asyncio.AbstractEventLoop, concurrency: int) -> int:
    """Make the loop's default executor big enough for ``concurrency`` more backends; returns
    its size."""
    shared = _by_loop.setdefault(loop, _Shared())
    shared.users += 1
    shared.workers += concurrency + HEADROOM
    # A pool cannot grow: a bigger one takes over, the old one ends what it runs.
    pool = ThreadPoolExecutor(max_workers=shared.workers, thread_name_prefix="zerfaux-backend")
    shared.pools.append(pool)
    loop.set_default_executor(pool)
    log.debug("backend thread pool: %d threads", shared.workers)
    return shared.workers


def uninstall(loop: asyncio.AbstractEventLoop) -> None:
    """One listener stopped; the last one shuts the pools down (threads still running finish)."""
    shared = _by_loop.get(loop)
    if shared is None:
        return
    shared.users -= 1
    if shared.users > 0:
        return
    del _by_loop[loop]
    # Later to_thread calls on this loop (after serve returns) get a plain pool again.
    loop.set_default_executor(ThreadPoolExecutor())
    for pool in shared.pools:
        pool.shutdown(wait=False)
