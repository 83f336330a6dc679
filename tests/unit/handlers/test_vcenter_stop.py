"""Stop is not cancel on the vCenter side, with a stubbed session (issue 11, part 2).

vcsim's tasks are complete when the call that starts them returns, so a task that is still
running cannot be produced there: these tests stand in a session whose task never ends. What a
real vcsim can show (no new task once stopped) is in tests/integration/test_vcenter_races.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from pyVmomi import vim

from handlers.backends.vcenter import query, vmotion
from handlers.backends.vcenter.vmotion import StorageMoverReal
from handlers.context import StopSignal
from handlers.errors import OperationCancelled, OperationStopped
from handlers.types import VCenterEndpoint

ENDPOINT = VCenterEndpoint("id-1", "src", "vc.example", 443, "svc", "vc-pass", True)


class _Collector:
    """A private PropertyCollector whose task never changes: every wait times out."""

    def __init__(self) -> None:
        self.waits = 0
        self.destroyed = False

    def CreateFilter(self, spec: Any, partialUpdates: bool) -> None:  # noqa: N802, N803 - the API's names
        pass

    def WaitForUpdatesEx(self, version: str, options: Any) -> None:  # noqa: N802
        self.waits += 1

    def DestroyPropertyCollector(self) -> None:  # noqa: N802
        self.destroyed = True


class _Recorder:
    """A SOAP stub that records the methods called on the objects bound to it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def InvokeMethod(self, obj: Any, info: Any, args: Any) -> Any:  # noqa: N802
        self.calls.append(info.wsdlName)
        return None


def _task() -> tuple[Any, _Recorder]:
    recorder = _Recorder()
    return vim.Task("task-7", recorder), recorder


class _Session:
    def __init__(self) -> None:
        self.collector = _Collector()

        class _PC:
            CreatePropertyCollector = staticmethod(lambda: self.collector)  # noqa: N815

        class _Content:
            propertyCollector = _PC()  # noqa: N815

        self.content = _Content()
        self._stub = _NoTasks()


class _NoTasks:
    """A SOAP stub that refuses every method call: the test fails if a task is started."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def InvokeMethod(self, obj: Any, info: Any, args: Any) -> Any:  # noqa: N802
        self.calls.append(info.wsdlName)
        raise AssertionError(f"{info.wsdlName} was called")


def _after_waits(n: int, signal: StopSignal, how: str, si: _Session) -> None:
    """Set ``signal`` (by ``how``) once the task has been waited on ``n`` times."""
    wait = si.collector.WaitForUpdatesEx

    def waiting(version: str, options: Any) -> None:
        wait(version, options)
        if si.collector.waits == n:
            getattr(signal, how)("lease lost" if how == "stop" else "cancel requested")

    si.collector.WaitForUpdatesEx = waiting  # type: ignore[method-assign]


def test_stop_leaves_the_running_task_alone() -> None:
    si, signal = _Session(), StopSignal()
    task, calls = _task()
    _after_waits(2, signal, "stop", si)
    with pytest.raises(OperationStopped, match="lease lost while vCenter task task-7 was running"):
        query.wait_for_task(si, task, signal, wake_seconds=0)
    assert calls.calls == []  # no CancelTask
    assert si.collector.waits == 2 and si.collector.destroyed


def test_cancel_cancels_the_running_task() -> None:
    si, signal = _Session(), StopSignal()
    task, calls = _task()
    _after_waits(2, signal, "cancel", si)
    with pytest.raises(OperationCancelled):
        query.wait_for_task(si, task, signal, wake_seconds=0)
    assert calls.calls == ["CancelTask"]


def test_stop_overrides_a_cancel_asked_at_the_same_time() -> None:
    si, signal = _Session(), StopSignal()
    task, calls = _task()
    signal.cancel()
    signal.stop("shutting down")
    with pytest.raises(OperationStopped):
        query.wait_for_task(si, task, signal, wake_seconds=0)
    assert calls.calls == []


def test_a_plain_event_keeps_meaning_cancel() -> None:
    import threading

    event = threading.Event()
    event.set()
    assert isinstance(query.stopped(event, "before x"), OperationCancelled)
    assert query.stopped(threading.Event(), "before x") is None
    assert query.stopped(None, "before x") is None


def _info(key: str, state: str, entity: str, description: str) -> Any:
    return vim.TaskInfo(
        key=key, task=vim.Task(key), descriptionId=description, state=state,
        entity=vim.VirtualMachine(entity), cancelable=True, cancelled=False,
    )


def test_running_tasks_keeps_only_live_relocations_of_that_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = {
        "t-run": _info("t-run", "running", "vm-1", "VirtualMachine.relocate"),
        "t-queued": _info("t-queued", "queued", "vm-1", "VirtualMachine.relocate"),
        "t-done": _info("t-done", "success", "vm-1", "VirtualMachine.relocate"),
        "t-other-vm": _info("t-other-vm", "running", "vm-2", "VirtualMachine.relocate"),
        "t-power": _info("t-power", "running", "vm-1", "VirtualMachine.powerOn"),
    }
    monkeypatch.setattr(query, "properties", lambda si, obj, paths: {"recentTask": [vim.Task(k) for k in tasks]})
    monkeypatch.setattr(
        query, "_retrieve",
        lambda si, spec, page_size=0: [(o.obj, {"info": tasks[o.obj._moId]}) for o in spec.objectSet],
    )

    class _Si:
        class content:  # noqa: N801
            taskManager = vim.TaskManager("TaskManager")  # noqa: N815

    found = query.running_tasks(_Si(), vim.VirtualMachine("vm-1"), ("VirtualMachine.relocate",), [vim.Task("t-run")])
    assert sorted(t._moId for t in found) == ["t-queued", "t-run"]


def test_relocation_adopts_the_task_an_earlier_attempt_left_running(monkeypatch: pytest.MonkeyPatch) -> None:
    si = _Session()
    target = vim.Datastore("ds-target")
    old = vim.Datastore("ds-old")
    left_running = vim.Task("task-41")
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName="[old] vm/vm.vmdk", datastore=old)
    disk = vim.vm.device.VirtualDisk(key=2000, backing=backing)
    moved = {"done": False}

    def props(si_: Any, obj: Any, paths: Any) -> dict[str, Any]:
        if isinstance(obj, vim.HostSystem):
            return {"name": "esx-1", "datastore": [target, old]}
        if moved["done"]:
            backing.fileName, backing.datastore = "[target] vm/vm.vmdk", target
            return {"name": "app", "datastore": [target], "config.files.vmPathName": "[target] vm/vm.vmx",
                    "config.hardware.device": [disk], "runtime.host": vim.HostSystem("host-1"), "recentTask": []}
        return {"name": "app", "datastore": [old], "config.files.vmPathName": "[old] vm/vm.vmx",
                "config.hardware.device": [disk], "runtime.host": vim.HostSystem("host-1"),
                "recentTask": [left_running]}

    waited: list[str] = []

    def wait(si_: Any, task: Any, stop: Any = None) -> None:
        waited.append(task._moId)
        moved["done"] = True  # the earlier attempt's relocation finishes while we wait

    monkeypatch.setattr(vmotion, "properties", props)
    monkeypatch.setattr(vmotion, "collect", lambda si_, t, paths: [(target, {"name": "target"}), (old, {"name": "old"})])
    monkeypatch.setattr(vmotion, "running_tasks", lambda si_, vm, names, listed: list(listed))
    monkeypatch.setattr(vmotion, "wait_for_task", wait)

    assert StorageMoverReal(None)._relocate(si, ENDPOINT, "vm-1", "target", StopSignal()) is True  # type: ignore[arg-type]
    assert waited == ["task-41"]
    assert si._stub.calls == []  # no RelocateVM_Task of its own


def test_a_stopped_relocation_starts_no_task(monkeypatch: pytest.MonkeyPatch) -> None:
    si = _Session()
    target, old = vim.Datastore("ds-target"), vim.Datastore("ds-old")
    monkeypatch.setattr(vmotion, "properties", lambda si_, obj, paths: (
        {"name": "esx-1", "datastore": [target, old]} if isinstance(obj, vim.HostSystem) else
        {"name": "app", "datastore": [old], "config.files.vmPathName": "[old] vm/vm.vmx",
         "config.hardware.device": [], "runtime.host": vim.HostSystem("host-1"), "recentTask": []}))
    monkeypatch.setattr(vmotion, "collect", lambda si_, t, paths: [(target, {"name": "target"}), (old, {"name": "old"})])
    monkeypatch.setattr(vmotion, "running_tasks", lambda si_, vm, names, listed: [])
    signal = StopSignal()
    signal.stop("shutting down")
    with pytest.raises(OperationStopped, match="shutting down before the relocation started"):
        StorageMoverReal(None)._relocate(si, ENDPOINT, "vm-1", "target", signal)  # type: ignore[arg-type]
    assert si._stub.calls == []
