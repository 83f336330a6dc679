"""Bulk reads and task waits on a vCenter, the way the API is meant to be used.

Every read is one ``PropertyCollector.RetrievePropertiesEx`` with an explicit ``pathSet``, over a
``ContainerView`` (many objects) or a single object, paged with ``ContinueRetrievePropertiesEx``
when the server pages. Reading ``vm.name``, ``vm.runtime`` ... attribute by attribute costs one
round trip each, which over a WAN turns a sync of thousands of VMs from seconds into hours.
Tasks are awaited with a property filter and ``WaitForUpdatesEx`` (a long poll the server
answers when the task changes), never by re-reading ``task.info`` in a loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from pyVmomi import vim, vmodl

from handlers.errors import HandlerError, OperationCancelled, OperationStopped

log = logging.getLogger(__name__)

PAGE_SIZE = 1000
Props = dict[str, Any]
_PC = vmodl.query.PropertyCollector


def _to_rows(objects: Sequence[Any] | None) -> list[tuple[Any, Props]]:
    # Properties the server could not read (no permission, an inaccessible VM) arrive in
    # missingSet and are simply absent here, so callers read them with .get().
    return [(oc.obj, {p.name: p.val for p in oc.propSet or ()}) for oc in objects or ()]


def _retrieve(si: Any, spec: Any, page_size: int = PAGE_SIZE) -> list[tuple[Any, Props]]:
    return [row for page in _retrieve_pages(si, spec, page_size) for row in page]


def _retrieve_pages(si: Any, spec: Any, page_size: int = PAGE_SIZE) -> Iterator[list[tuple[Any, Props]]]:
    pc = si.content.propertyCollector
    result = pc.RetrievePropertiesEx([spec], _PC.RetrieveOptions(maxObjects=page_size))
    while result is not None:
        page, token = _to_rows(result.objects), result.token
        del result  # the page's raw objects go as soon as the caller is done with the page
        yield page
        if not token:
            break
        result = pc.ContinueRetrievePropertiesEx(token)


def collect(
    si: Any,
    obj_type: type,
    paths: Sequence[str],
    root: Any = None,
    page_size: int = PAGE_SIZE,
) -> list[tuple[Any, Props]]:
    """``(object, {path: value})`` for every ``obj_type`` under ``root`` (default: everything)."""
    content = si.content
    view = content.viewManager.CreateContainerView(root or content.rootFolder, [obj_type], True)
    try:
        traverse = _PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        spec = _PC.FilterSpec(
            objectSet=[_PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
            propSet=[_PC.PropertySpec(type=obj_type, pathSet=list(paths), all=False)],
        )
        rows = _retrieve(si, spec, page_size)
    finally:
        view.DestroyView()
    log.debug("retrieved %d %s objects", len(rows), obj_type.__name__)
    return rows


def collect_pages(
    si: Any,
    obj_type: type,
    paths: Sequence[str],
    root: Any = None,
    page_size: int = PAGE_SIZE,
) -> Iterator[list[tuple[Any, Props]]]:
    """What ``collect`` returns, a page of at most ``page_size`` objects at a time.

    For big sets (every VM with its devices: about 18 KB of pyVmomi objects per VM), so a caller
    that turns each page into its own compact rows holds one page of raw objects, not all of
    them. The page size is ours, not the server's: a server may ignore ``maxObjects`` (vcsim
    0.24.2 does) and answer a view traversal with every object at once, so the view's member
    references are listed first (small) and their properties read ``page_size`` objects a call.
    """
    content = si.content
    view = content.viewManager.CreateContainerView(root or content.rootFolder, [obj_type], True)
    try:
        refs = list(properties(si, view, ["view"]).get("view") or ())
    finally:
        view.DestroyView()
    prop_set = [_PC.PropertySpec(type=obj_type, pathSet=list(paths), all=False)]
    for start in range(0, len(refs), page_size):
        chunk = refs[start : start + page_size]
        rows: list[tuple[Any, Props]] = []
        while chunk:
            spec = _PC.FilterSpec(objectSet=[_PC.ObjectSpec(obj=r, skip=False) for r in chunk], propSet=prop_set)
            try:
                rows = _retrieve(si, spec, page_size)  # one chunk is at most one page
                break
            except vmodl.fault.ManagedObjectNotFound as exc:
                # Deleted since the listing: leave it out, as a sync started a moment later would.
                gone = getattr(getattr(exc, "obj", None), "_moId", None)
                if gone is None or not any(r._moId == gone for r in chunk):
                    raise
                log.debug("%s %s disappeared during the read", obj_type.__name__, gone)
                chunk = [r for r in chunk if r._moId != gone]
        yield rows
        del rows  # before the next chunk is read
    log.debug("retrieved %d %s objects in pages of %d", len(refs), obj_type.__name__, page_size)


def properties(si: Any, obj: Any, paths: Sequence[str]) -> Props:
    """``{path: value}`` of one object; ``ManagedObjectNotFound`` when it does not exist."""
    spec = _PC.FilterSpec(
        objectSet=[_PC.ObjectSpec(obj=obj, skip=False)],
        propSet=[_PC.PropertySpec(type=type(obj), pathSet=list(paths), all=False)],
    )
    rows = _retrieve(si, spec)
    return rows[0][1] if rows else {}


def retrieve_many(si: Any, objs: Sequence[Any], obj_type: type, paths: Sequence[str]) -> list[tuple[Any, Props]]:
    """``(object, {path: value})`` of the given objects (one type) in one read, paged as the server pages;
    ``ManagedObjectNotFound`` when one of them does not exist."""
    if not objs:
        return []
    spec = _PC.FilterSpec(
        objectSet=[_PC.ObjectSpec(obj=o, skip=False) for o in objs],
        propSet=[_PC.PropertySpec(type=obj_type, pathSet=list(paths), all=False)],
    )
    return _retrieve(si, spec)


def stopped(signal: threading.Event | None, doing: str) -> HandlerError | None:
    """The error an attempt raises when ``signal`` is set, or None to go on.

    A ``StopSignal`` says why: 'stop' (shutdown, lease lost) is ``OperationStopped``, 'cancel'
    ``OperationCancelled``. A plain Event carries no reason and keeps its old meaning, a cancel.
    """
    if signal is None or not signal.is_set():
        return None
    reason = getattr(signal, "reason", "cancel")
    why = getattr(signal, "why", "") or ("stopped" if reason == "stop" else "cancel requested")
    if reason == "stop":
        return OperationStopped(f"{why} {doing}")
    return OperationCancelled(f"cancelled {doing}")


def check_stop(signal: threading.Event | None, doing: str) -> None:
    """Raise before an effect (a vCenter task, an unregistration) once the attempt must stop.

    Called right before every call that starts a vCenter task, so a stopped attempt starts
    nothing new: the time between this check and the call is one local step, not a round trip.
    """
    error = stopped(signal, doing)
    if error is not None:
        raise error


def wait_for_task(si: Any, task: Any, stop: threading.Event | None = None, wake_seconds: int = 5) -> Any:
    """Block until ``task`` ends; return its result or raise its fault.

    A private PropertyCollector carries one filter on ``info.state``; ``WaitForUpdatesEx``
    returns when it changes, or after ``wake_seconds`` so ``stop`` is noticed. On a cancel the
    task is cancelled on the server (if it allows it) and ``OperationCancelled`` raised. On a
    stop (shutdown, lease lost) the task is left running, ``OperationStopped`` raised: the next
    attempt finds the task and waits for it (Storage vMotion) or finds its result by the mark
    (DR shell), so a deploy never throws away a relocation half done.
    """
    collector = si.content.propertyCollector.CreatePropertyCollector()
    try:
        spec = _PC.FilterSpec(
            objectSet=[_PC.ObjectSpec(obj=task, skip=False)],
            propSet=[_PC.PropertySpec(type=vim.Task, pathSet=["info.state"], all=False)],
        )
        collector.CreateFilter(spec, partialUpdates=True)
        options = _PC.WaitOptions(maxWaitSeconds=wake_seconds)
        version = ""
        state = None
        while state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            error = stopped(stop, f"while vCenter task {task._moId} was running")
            if isinstance(error, OperationStopped):
                log.info("leaving vCenter task %s running for the next attempt: %s", task._moId, error)
                raise error
            if error is not None:
                _cancel_task(task)
                raise error
            update = collector.WaitForUpdatesEx(version, options)
            if update is None:  # maxWaitSeconds passed with no change
                continue
            version = update.version
            for filter_set in update.filterSet or ():
                for obj_update in filter_set.objectSet or ():
                    for change in obj_update.changeSet or ():
                        if change.name == "info.state":
                            state = change.val
        info = properties(si, task, ["info"])["info"]
    finally:
        collector.DestroyPropertyCollector()
    if info.state == vim.TaskInfo.State.error:
        raise info.error
    return info.result


def running_tasks(si: Any, entity: Any, names: Sequence[str], entity_tasks: Sequence[Any] = ()) -> list[Any]:
    """Tasks on ``entity`` whose ``descriptionId`` or method is in ``names``, still queued or running.

    Read from the entity's own ``recentTask`` (given by the caller, who read it with the
    entity's other properties) and the task manager's ``recentTask``, which is where vcsim
    lists them, in one bulk read of the tasks' ``info``. A task started by another session (a
    listener that lost its lease) is listed there too: that is how the next attempt adopts it.
    """
    manager = si.content.taskManager
    listed = list(entity_tasks) + list(properties(si, manager, ["recentTask"]).get("recentTask") or ())
    refs = list({t._moId: t for t in listed}.values())
    if not refs:
        return []
    spec = _PC.FilterSpec(
        objectSet=[_PC.ObjectSpec(obj=t, skip=False) for t in refs],
        propSet=[_PC.PropertySpec(type=vim.Task, pathSet=["info"], all=False)],
    )
    try:
        rows = _retrieve(si, spec)
    except vmodl.fault.ManagedObjectNotFound:
        # A task aged out between the two reads: read them one at a time, skipping the gone.
        rows = []
        for ref in refs:
            try:
                rows.append((ref, properties(si, ref, ["info"])))
            except vmodl.fault.ManagedObjectNotFound:
                continue
    live = (vim.TaskInfo.State.queued, vim.TaskInfo.State.running)
    found = []
    for task, props in rows:
        info = props.get("info")
        if info is None or info.state not in live or info.entity is None:
            continue
        # info.name arrives as a ManagedMethod (its wsdlName is "RelocateVM_Task"); descriptionId is a string.
        method = getattr(info.name, "wsdlName", None) or getattr(info.name, "name", None) or info.name
        if info.entity._moId == entity._moId and (info.descriptionId in names or method in names):
            found.append(task)
    return found


def _cancel_task(task: Any) -> None:
    try:
        task.CancelTask()
    except vmodl.MethodFault as exc:  # not cancelable, or already done: nothing more to do
        log.debug("task could not be cancelled: %s", type(exc).__name__)
