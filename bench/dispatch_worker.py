"""One listener process for bench/dispatch.py's scale-out run: the real Dispatcher and
PostgresStore with a no-op handler, started on a line on stdin, draining until idle.

    python bench/dispatch_worker.py <database url> <concurrency> <worker id>
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dispatch import dispatcher_for  # noqa: E402
from listener.store_pg import PostgresStore  # noqa: E402


async def main(url: str, concurrency: int, worker: str) -> None:
    store = PostgresStore(url, pool_size=concurrency + 4)
    await store.open()
    try:
        dispatcher = dispatcher_for(store, concurrency, worker)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await dispatcher.run(until_idle=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
