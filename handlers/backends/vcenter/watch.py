"""Wait for a VM's properties to reach a state: one long poll (``WaitForUpdatesEx``) on a
collector of its own, woken at least every few seconds so ``stop`` is noticed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyVmomi import vim, vmodl

from handlers.backends.vcenter.query import Props, check_stop

WAKE_SECONDS = 5
_PC = vmodl.query.PropertyCollector
T = TypeVar("T")


def watch(si: Any, vm: Any, paths: Sequence[str], timeout_seconds: float, stop: threading.Event,
          reached: Callable[[Props], T | None], what: str, started: float | None = None) -> T | None:
    """``reached(values)`` after every update (the first answers at once with the current values);
    its first answer that is not None is returned, or None once ``timeout_seconds`` since
    ``started`` (default: now) have passed. ``what`` names the wait in a stop's message."""
    began = time.monotonic() if started is None else started
    collector = si.content.propertyCollector.CreatePropertyCollector()
    try:
        spec = _PC.FilterSpec(objectSet=[_PC.ObjectSpec(obj=vm, skip=False)],
                              propSet=[_PC.PropertySpec(type=vim.VirtualMachine, pathSet=list(paths), all=False)])
        collector.CreateFilter(spec, partialUpdates=True)
        values: Props = {}
        version = ""
        while True:
            check_stop(stop, f"while waiting for {what}")
            left = timeout_seconds - (time.monotonic() - began)
            wait = max(1, min(WAKE_SECONDS, math.ceil(left)))
            update = collector.WaitForUpdatesEx(version, _PC.WaitOptions(maxWaitSeconds=wait))
            if update is not None:
                version = update.version
                for filter_set in update.filterSet or ():
                    for obj_update in filter_set.objectSet or ():
                        for change in obj_update.changeSet or ():
                            values[change.name] = change.val
            answer = reached(values)
            if answer is not None:
                return answer
            if time.monotonic() - began >= timeout_seconds:
                return None
    finally:
        collector.DestroyPropertyCollector()
