"""The shutdown paths vcsim cannot play: a guest that ignores ShutdownGuest, and ToolsUnavailable.

vcsim 0.24 powers a VM off at once on ShutdownGuest and never raises ToolsUnavailable (FACTS.md),
so these branches of ``_shutdown`` run here against a VM object that behaves like a real
vCenter's, with the reads and the task wait replaced; the vcsim tests cover the rest.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pyVmomi import vim

from handlers.backends.vcenter import failover
from handlers.errors import PermanentError
from handlers.types import VCenterEndpoint

VC = VCenterEndpoint("vc-src", "src", "vc.example", 443, "admin", None, True)


class FakeVM:
    _moId = "vm-7"

    def __init__(self, tools_unavailable: bool) -> None:
        self.calls: list[str] = []
        self._unavailable = tools_unavailable

    def ShutdownGuest(self) -> None:  # noqa: N802 (vSphere's name)
        self.calls.append("ShutdownGuest")
        if self._unavailable:
            raise vim.fault.ToolsUnavailable()

    def PowerOffVM_Task(self) -> str:  # noqa: N802
        self.calls.append("PowerOffVM_Task")
        return "task-1"


def world(monkeypatch: pytest.MonkeyPatch, *, goes_off: bool, tools_unavailable: bool = False) -> FakeVM:
    vm = FakeVM(tools_unavailable)
    monkeypatch.setattr(failover, "_vm", lambda si, moref: vm)
    monkeypatch.setattr(failover, "properties", lambda si, obj, paths: {
        "name": "db-01", "runtime.powerState": "poweredOn", "guest.toolsRunningStatus": "guestToolsRunning"})
    monkeypatch.setattr(failover, "_wait_off", lambda si, obj, timeout, stop, started: goes_off)
    monkeypatch.setattr(failover, "last_power_event", lambda si, obj, kinds=(): None)
    monkeypatch.setattr(failover, "wait_for_task", lambda si, task, stop=None: vm.calls.append(f"wait {task}"))
    return vm


def test_a_guest_that_ignores_the_shutdown_is_refused_without_force(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = world(monkeypatch, goes_off=False)
    with pytest.raises(PermanentError) as refused:
        failover._shutdown(object(), VC, "vm-7", 300, False, threading.Event())
    text = str(refused.value)
    assert "'db-01'" in text and "options.force_power_off" in text and "Tools running" in text, text
    assert vm.calls == ["ShutdownGuest"]  # never powered off


def test_with_force_it_is_powered_off_after_the_guest_shutdown_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = world(monkeypatch, goes_off=False)
    done = failover._shutdown(object(), VC, "vm-7", 300, True, threading.Event())
    assert done.how == "power_off" and vm.calls == ["ShutdownGuest", "PowerOffVM_Task", "wait task-1"]


@pytest.mark.parametrize("goes_off, force, expected", [(True, False, "guest"), (False, True, "power_off")])
def test_tools_unavailable_waits_like_no_tools(monkeypatch: pytest.MonkeyPatch, goes_off: bool, force: bool,
                                               expected: str) -> None:
    vm = world(monkeypatch, goes_off=goes_off, tools_unavailable=True)
    done = failover._shutdown(object(), VC, "vm-7", 300, force, threading.Event())
    assert done.how == expected
    assert vm.calls[0] == "ShutdownGuest" and ("PowerOffVM_Task" in vm.calls) == force


def test_a_negative_timeout_is_refused_naming_the_column() -> None:
    with pytest.raises(PermanentError, match="shutdown_timeout_seconds"):
        failover._shutdown(object(), VC, "vm-7", -1, True, threading.Event())
