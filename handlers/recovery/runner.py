"""Execute a recovery run's plan: a test failover, its cleanup, or a cancelled test's cleanup.

The plan is recorded first (``{"plan": [...]}``), then each step 'running' before its effect and
with its outcome after. An attempt resumes from the first unfinished step, taking what later
steps need (placement, mountpoint, morefs) from the recorded ``detail`` of finished ones. Boot
order: the VMs of a priority are powered on together, then waited for together; the next
priority starts once each is ready or timed out ('warning'), plus the priority's largest
``boot_delay_seconds``.

Stopping: the engine's 'stop' (lease lost, shutdown) leaves everything as it is for the next
attempt (``OperationStopped``). A person's cancel of a test stops its steps, appends the cleanup
steps to the same run and runs them under a stop signal of their own (which still relays the
engine's 'stop'), then raises ``OperationCancelled``. A cleanup run is not cancelled half way:
it always converges to nothing left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from handlers.context import OperationContext, StopSignal
from handlers.errors import OperationCancelled, OperationStopped, PermanentError
from handlers.recovery.backends import ExportNotServed, Placement, Readiness, RecoveryCompute, RecoveryStorage
from handlers.recovery.book import Book, Executor, Outcome
from handlers.recovery.cleanup import Cleanup, placement_of
from handlers.recovery.plan import RunPlan, Step, cleanup_steps

log = logging.getLogger(__name__)

CREATE_LIMIT = 8  # test VMs created at once: a vCenter queues tasks past a few per host anyway
MAX_THREADS = 64


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def check_stored_plan(steps: Sequence[Step], rows: Mapping[int, Mapping[str, Any]], what: str, fix: str) -> None:
    """A resumed attempt's plan must be the one the first attempt recorded, step for step."""
    for step in steps:
        row = rows.get(step.seq)
        if row is None:
            continue
        if (row["name"], row["protected_vm_id"]) != (step.name, step.protected_vm_id):
            raise PermanentError(
                f"step {step.seq} was recorded as {row['name']!r} ({row['protected_vm_id']}) and is now "
                f"{step.name!r} ({step.protected_vm_id}): the group's protected VMs or boot priorities changed "
                f"while {what} was in progress, so it cannot resume safely; {fix}")


def readiness_outcome(ready: Readiness, moref: str, boot_time: Any, tools_timeout_seconds: int) -> Outcome:
    """A wait_ready step's outcome: done when Tools answered (or no wait was asked), else a warning."""
    detail = {"moref": moref, "how": ready.how, "waited_seconds": round(ready.waited_seconds, 3),
              "boot_time": boot_time, "ready_at": now_iso(), "ready": ready.ready}
    if ready.ready:
        return "done", detail, None
    if tools_timeout_seconds == 0:
        return "done", {**detail, "how": "not waited (tools_timeout_seconds = 0)"}, None
    return "warning", detail, (f"VMware Tools did not report running within {tools_timeout_seconds} s "
                               "(protected_vms.tools_timeout_seconds); the next priority went on")


class Runner:
    def __init__(self, plan: RunPlan, storage: RecoveryStorage, compute: RecoveryCompute,
                 ctx: OperationContext, stored: Sequence[Mapping[str, Any]],
                 test_rows: Sequence[Mapping[str, Any]] = ()) -> None:
        self.plan = plan
        self.storage = storage
        self.compute = compute
        self.ctx = ctx
        self.book = Book(ctx, stored)
        biggest = max([sum(1 for v in plan.vms if v.priority == p) for p in {v.priority for v in plan.vms}] or [1])
        self._pool = ThreadPoolExecutor(min(MAX_THREADS, max(CREATE_LIMIT, biggest) + 2),
                                        thread_name_prefix=f"recovery-{plan.run_id[:8]}")
        self._ex = Executor(self.book, ctx.stop, self._pool)
        self._test_rows = list(test_rows)  # a cleanup run's test's steps

    async def run(self) -> dict[str, Any]:
        try:
            if self.plan.kind == "cleanup":
                return await self._cleanup_run()
            return await self._test_run()
        finally:
            self._pool.shutdown(wait=False)

    # ---- the test -------------------------------------------------------------------------------

    async def _test_run(self) -> dict[str, Any]:
        if not self.book.rows and self.ctx.stop.cancelled:
            raise OperationCancelled("cancelled before it started: nothing was made")
        self._check_stored_plan()
        try:
            if self.ctx.stop.cancelled:
                raise OperationCancelled(self.ctx.stop.why)
            await self.book.plan(self.plan.steps)
            await self._test_steps(self._ex)
        except Exception:
            if self.ctx.stop.reason == "stop":
                raise OperationStopped(self.ctx.stop.why) from None
            if not self.ctx.stop.cancelled:
                raise
        else:
            return {"status": "active", "report": self._test_report()}
        await self._cancelled_cleanup()
        raise OperationCancelled("cancelled: the test's steps stopped and its cleanup removed what it made")

    def _check_stored_plan(self) -> None:
        check_stored_plan(self.plan.steps, self.book.rows, "this run", "insert a cleanup run for it")

    async def _test_steps(self, ex: Executor) -> None:
        plan, by_name = self.plan, {s.name: s for s in self.plan.steps if s.protected_vm_id is None}
        validated = await ex.one(by_name["validate"], self._validate)
        placement = placement_of(validated)
        if placement is None:
            raise PermanentError("the validate step recorded no placement: insert a cleanup run, then a new test")
        await ex.one(by_name["hold_snapshot"], lambda: self._storage_bool(
            self.storage.hold, "placed_now", plan.target, plan.snapshot, plan.tag, {"snapshot": plan.snapshot,
                                                                                   "tag": plan.tag}))
        clone = await ex.one(by_name["clone_snapshot"], self._clone)
        export = await ex.one(by_name["export_clone"], lambda: self._export(ex, placement))
        await ex.one(by_name["present_datastore"], lambda: self._present(ex, placement, export, clone))
        await ex.one(by_name["create_port_group"], lambda: self._port_group(ex, placement))
        creates = [s for s in plan.steps if s.name == "create_vm"]
        await ex.batch(creates, lambda s: self._create_vm(ex, placement, s), CREATE_LIMIT)
        morefs = {s.protected_vm_id: self.book.detail(s.seq).get("moref") for s in creates}
        priorities = sorted({s.priority for s in plan.steps if s.priority is not None})
        for i, priority in enumerate(priorities):
            ons = [s for s in plan.steps if s.name == "power_on" and s.priority == priority]
            waits = [s for s in plan.steps if s.name == "wait_ready" and s.priority == priority]
            await ex.batch(ons, lambda s: self._power_on(ex, morefs[s.protected_vm_id]), len(ons))
            await ex.batch(waits, lambda s: self._wait_ready(ex, s, morefs[s.protected_vm_id]), len(waits))
            if i + 1 < len(priorities):
                await self._boot_delay(ex, priority, waits, priorities[i + 1])
        await ex.one(by_name["activate"], self._activate)

    async def _validate(self) -> Outcome:
        plan, ex = self.plan, self._ex
        if plan.problems:
            raise PermanentError("; ".join(plan.problems))
        guid = await ex.call(self.storage.snapshot_guid, plan.target, plan.snapshot, self.ctx.stop)
        if guid is None:
            raise PermanentError(f"the recovery point {plan.snapshot!r} is not on the target any more: insert "
                                 "the run again with another recovery_point_id (or none: the newest)")
        if plan.expected_guid is not None and str(guid) != plan.expected_guid:
            raise PermanentError(
                f"{plan.snapshot!r} on the target has GUID {guid}, but recovery_points.guid records "
                f"{plan.expected_guid}: the replica is not the one Zerfaux replicated; replicate again")
        site = await ex.call(self.compute.check_site, plan.vcenter, plan.networks, plan.cluster, self.ctx.stop)
        if site.networks_missing:
            raise PermanentError(
                f"the DR vCenter {plan.vcenter.name!r} has no network {', '.join(map(repr, site.networks_missing))}: "
                "create it there, or change network_mappings.test_network (null = an isolated port group)")
        parent = plan.target_root
        free = await ex.call(self.storage.available_bytes, plan.target, parent, self.ctx.stop)
        if free < plan.min_free_bytes:
            raise PermanentError(
                f"{parent!r} on the DR storage host has {free} bytes available, less than the "
                f"{plan.min_free_bytes} a test of {len(plan.vms)} VM(s) needs (1 GiB or 5 % of their disks): "
                "free space in the DR pool")
        placement = {**asdict(site.placement), "hosts": list(site.placement.hosts)}
        return "done", {"guid": str(guid), "placement": placement, "networks": list(plan.networks),
                        "available_bytes": free, "min_free_bytes": plan.min_free_bytes}, None

    async def _storage_bool(self, fn: Any, key: str, *args: Any) -> Outcome:
        *call, detail = args
        return "done", {**detail, key: bool(await self._ex.call(fn, *call, self.ctx.stop))}, None

    async def _clone(self) -> Outcome:
        plan, ex = self.plan, self._ex
        info = await ex.call(self.storage.clone, plan.target, plan.snapshot, plan.clone_dataset,
                             plan.resource_run_id, self.ctx.stop)
        return "done", {"dataset": info.dataset, "origin": info.origin, "mountpoint": info.mountpoint,
                        "adopted": info.adopted}, None

    async def _export(self, ex: Executor, placement: Placement) -> Outcome:
        # Read-write with root not squashed, so never to everyone by default: the target's
        # nfs_clients, else the hosts the datastore is presented on.
        clients = list(self.plan.nfs_clients or placement.hosts)
        detail: dict[str, Any] = {"dataset": self.plan.clone_dataset, "clients": clients}
        try:
            path = await ex.call(self.storage.export, self.plan.target, self.plan.clone_dataset, self.ctx.stop,
                                 clients)
        except ExportNotServed as exc:
            # The property is set; whether a DR host can mount it, the next step finds out in
            # vSphere's words. Say here what the storage host lacks.
            return "warning", {**detail, "path": exc.path}, str(exc)
        return "done", {**detail, "path": path}, None

    async def _present(self, ex: Executor, placement: Placement, export: Mapping[str, Any],
                       clone: Mapping[str, Any]) -> Outcome:
        plan = self.plan
        path = str(export.get("path") or clone.get("mountpoint"))
        made = await ex.call(self.compute.present_datastore, plan.vcenter, placement, plan.tag, plan.nfs_host,
                             path, self.ctx.stop)
        return "done", {"datastore": plan.tag, "remote_host": plan.nfs_host, "remote_path": path,
                        "hosts": list(placement.hosts), "mounted_now": bool(made)}, None

    async def _port_group(self, ex: Executor, placement: Placement) -> Outcome:
        if not self.plan.needs_port_group:
            return "skipped", {"why": "every network mapping has a test_network"}, None
        made = await ex.call(self.compute.create_port_group, self.plan.vcenter, placement, self.plan.tag,
                             self.ctx.stop)
        return "done", {"port_group": self.plan.tag, "hosts": list(placement.hosts), "made_now": bool(made)}, None

    async def _create_vm(self, ex: Executor, placement: Placement, step: Step) -> Outcome:
        vm = self.plan.vm(step.protected_vm_id)
        if vm is None or vm.spec is None:  # validate passed, then the inventory changed under a resumed run
            raise PermanentError("; ".join(self.plan.problems) or f"protected VM {step.protected_vm_id} has no spec")
        ref = await ex.call(self.compute.create_vm, self.plan.vcenter, placement, vm.spec, self.ctx.stop)
        return "done", {"moref": ref.moref, "name": vm.spec.name, "adopted": ref.adopted,
                        "nics": [n.network for n in vm.spec.nics]}, None

    async def _power_on(self, ex: Executor, moref: str | None) -> Outcome:
        if not moref:
            raise PermanentError("the test VM's create_vm step recorded no moref: insert a cleanup run")
        boot_time = await ex.call(self.compute.power_on, self.plan.vcenter, moref, self.ctx.stop)
        return "done", {"moref": moref, "boot_time": boot_time}, None

    async def _wait_ready(self, ex: Executor, step: Step, moref: str | None) -> Outcome:
        vm = self.plan.vm(step.protected_vm_id)
        assert vm is not None and moref
        on = next(s for s in self.plan.steps if s.name == "power_on" and s.protected_vm_id == step.protected_vm_id)
        boot_time = self.book.detail(on.seq).get("boot_time")
        timeout = float(vm.tools_timeout_seconds)
        if timeout > 0 and self.book.status(step.seq) == "running":
            timeout = max(1.0, timeout - _seconds_since(boot_time))  # a resumed wait keeps its deadline
        ready = await ex.call(self.compute.wait_ready, self.plan.vcenter, moref, timeout, self.ctx.stop)
        return readiness_outcome(ready, moref, boot_time, vm.tools_timeout_seconds)

    async def _boot_delay(self, ex: Executor, priority: int, waits: list[Step], next_priority: int) -> None:
        delay = max((v.boot_delay_seconds for v in self.plan.vms if v.priority == priority), default=0)
        first_next = next(s for s in self.plan.steps if s.name == "power_on" and s.priority == next_priority)
        if delay <= 0 or self.book.status(first_next.seq) != "pending":
            return
        ready_at = max((str(self.book.detail(s.seq).get("ready_at") or "") for s in waits), default="")
        await ex.sleep(max(0.0, delay - _seconds_since(ready_at)))

    async def _activate(self) -> Outcome:
        waits = [s for s in self.plan.steps if s.name == "wait_ready"]
        warned = sum(1 for s in waits if self.book.status(s.seq) == "warning")
        return "done", {"vms": len(self.plan.vms), "ready": len(waits) - warned, "warnings": warned}, None

    def _test_report(self) -> dict[str, Any]:
        vms = []
        for vm in self.plan.vms:
            entry: dict[str, Any] = {"protected_vm_id": vm.protected_vm_id, "source_vm": vm.source_name,
                                     "boot_priority": vm.priority}
            for step in self.plan.steps:
                if step.protected_vm_id == vm.protected_vm_id:
                    d = self.book.detail(step.seq)
                    entry.update({k: d[k] for k in ("moref", "name", "boot_time", "ready_at", "how",
                                                    "waited_seconds") if k in d})
                    if self.book.status(step.seq) == "warning":
                        entry["warning"] = self.book.rows[step.seq].get("error")
            vms.append(entry)
        return {"run_id": self.plan.run_id, "kind": "test", "recovery_point": self.plan.snapshot,
                "clone": self.plan.clone_dataset, "datastore": self.plan.tag, "vms": vms,
                "warnings": [f"{s.name}: {self.book.rows[s.seq].get('error')}" for s in self.plan.steps
                             if s.protected_vm_id is None and self.book.status(s.seq) == "warning"]
                            + [v["warning"] for v in vms if v.get("warning")]}

    # ---- cleanups -------------------------------------------------------------------------------

    async def _cancelled_cleanup(self) -> None:
        test_seqs = {s.seq for s in self.plan.steps}
        # Not started: skipped. Left 'running' by an attempt that died or stopped: it may have had
        # its effect (the cleanup treats it so) and it will not finish now.
        unstarted: list[tuple[Step, Outcome]] = [
            (s, ("skipped", {"why": "cancelled"}, None)) for s in self.plan.steps if self.book.status(s.seq) == "pending"]
        unstarted += [(s, ("failed", {}, "cancelled after its attempt was interrupted")) for s in self.plan.steps
                      if self.book.status(s.seq) == "running"]
        async with self._own_stop() as stop:
            await self.book.write(unstarted)
            appended = [s for s in self.book.steps() if s.seq not in test_seqs]
            if not appended:
                appended = list(cleanup_steps(self.plan.vms, max(test_seqs, default=0) + 1, mark_tested=False))
                await self.book.plan(appended)
            test_rows = [self.book.rows[seq] for seq in sorted(test_seqs) if seq in self.book.rows]
            await Cleanup(self.plan, self.storage, self.compute, Executor(self.book, stop, self._pool),
                          test_rows).run(appended)

    async def _cleanup_run(self) -> dict[str, Any]:
        test_rows = self._test_rows
        async with self._own_stop() as stop:
            steps = self.book.steps() or list(self.plan.steps)
            await self.book.plan(steps)
            report = await Cleanup(self.plan, self.storage, self.compute, Executor(self.book, stop, self._pool),
                                   test_rows).run(steps)
        return {"status": "completed", "report": {"run_id": self.plan.run_id, "kind": "cleanup",
                                                  "test_run_id": self.plan.resource_run_id, **report}}

    @contextlib.asynccontextmanager
    async def _own_stop(self) -> AsyncIterator[StopSignal]:
        """A stop signal a person's cancel does not set, that still carries the engine's 'stop'."""
        stop = StopSignal()

        async def relay() -> None:
            while True:
                if self.ctx.stop.reason == "stop":
                    stop.stop(self.ctx.stop.why)
                    return
                await asyncio.sleep(0.05)

        task = asyncio.create_task(relay())
        try:
            yield stop
        except Exception:
            if stop.reason == "stop" or self.ctx.stop.reason == "stop":
                raise OperationStopped(self.ctx.stop.why or stop.why) from None
            raise
        finally:
            task.cancel()


def _seconds_since(iso: object) -> float:
    try:
        then = datetime.fromisoformat(str(iso))
    except ValueError:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - then).total_seconds())
