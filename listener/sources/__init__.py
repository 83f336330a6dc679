"""Event sources. Each only wakes the dispatcher: none carries work (DESIGN §1).

A source has a ``name``, a ``connected`` flag (for /readyz and metrics) and ``run()``, which
runs until cancelled, reconnecting by itself, and wakes the dispatcher after every reconnect so
whatever happened while it was away is swept up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Wake = Callable[[], None]


class Source(Protocol):
    name: str
    connected: bool

    async def run(self) -> None: ...
