"""Run the real listener against a test database: in-process (fast) or as a `zerfaux` subprocess.

    settings = engine_settings(db.url, ZERFAUX_STUB_SECONDS="0")
    await drain(settings)                    # zerfaux run --until-idle, in-process
    async with running(settings) as lst: ... # a listener until the block ends
    proc = spawn(db.url, "run")              # the real CLI in a subprocess
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from listener.config import Settings
from listener.service import Listener, build_listener, serve

ROOT = Path(__file__).resolve().parents[2]

FAST = {
    "ZERFAUX_STUB_SECONDS": "0",
    "ZERFAUX_SWEEP_SECONDS": "0.5",
    "ZERFAUX_LEASE_SECONDS": "5",
    "ZERFAUX_RETRY_BASE_SECONDS": "0.05",
    "ZERFAUX_RETRY_MAX_SECONDS": "0.5",
    "ZERFAUX_CONCURRENCY": "8",
}


def engine_settings(url: str, **env: str) -> Settings:
    return Settings.from_environ({"DATABASE_URL": url, **FAST, **env})


async def drain(settings: Settings, timeout: float = 60.0) -> Listener:
    """Run until idle (what `zerfaux run --until-idle` does); fail the test past ``timeout``."""
    listener = build_listener(settings)
    await asyncio.wait_for(serve(listener, until_idle=True), timeout)
    return listener


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Listener]:
    listener = build_listener(settings)
    task = asyncio.create_task(serve(listener))
    try:
        yield listener
    finally:
        listener.dispatcher.stop()
        await asyncio.wait_for(task, 30)


async def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"did not converge within {timeout}s; last value: {value!r}")


def spawn(url: str | None, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The real CLI (`python -m listener.cli ...`) in a subprocess, output captured."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ZERFAUX_", "DATABASE_URL", "SUPABASE_"))}
    full.update(FAST)
    if url:
        full["DATABASE_URL"] = url
    full.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "listener.cli", *args],
        cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
