"""Execute a planned migration or a failover (issue 14); their boot order is ``failover_boot``, their
report ``failover_report``; commit, rollback and reprotect are ``failover_after``. The book, the
executor and the resume rules are the test's (``book``): the plan first, each step 'running'
before its effect and its outcome after, an attempt resuming at the first unfinished step with
what it needs taken from the recorded ``detail``.

No VM in two places: a planned migration shuts site A's VMs down (highest boot priority first)
before the final replication, and each ``power_on`` at B first reads its VM at A: anything but
poweredOff fails the step, and then no VM of that priority is powered on. A failover fences
instead (best effort, bounded by ``options.fence_timeout_seconds``) and records what it could.

Stopping: the engine's 'stop' leaves everything for the next attempt (``OperationStopped``).
A person's cancel does not stop these kinds once they are recorded (the database refuses it):
their backend calls get a stop signal of their own that only the engine's 'stop' sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any

from handlers.context import OperationContext, StopSignal
from handlers.errors import OperationCancelled, OperationStopped, PermanentError
from handlers.recovery.backends import ExportNotServed, Placement
from handlers.recovery.book import Book, Executor, Outcome
from handlers.recovery.cleanup import placement_of
from handlers.recovery.failover_backends import pre_failover_snapshot
from handlers.recovery.failover_boot import Boot
from handlers.recovery.failover_plan import FORWARD_KINDS, FailoverPlan, FailoverVM, remap_disks
from handlers.recovery.failover_report import forward_report
from handlers.recovery.plan import Step
from handlers.recovery.runner import MAX_THREADS, check_stored_plan, now_iso
from handlers.replication import ReplicationOutcome, ReplicationRequest, request_for

log = logging.getLogger(__name__)

VM_LIMIT = 16  # VM reconfigurations at once


class FailoverRunner:
    def __init__(self, plan: FailoverPlan, storage: Any, compute: Any, replication: Any,
                 ctx: OperationContext, stored: Sequence[Mapping[str, Any]]) -> None:
        self.plan = plan
        self.storage = storage
        self.compute = compute
        self.replication = replication
        self.ctx = ctx
        self.book = Book(ctx, stored)
        biggest = max([sum(1 for v in plan.vms if v.priority == p) for p in {v.priority for v in plan.vms}] or [1])
        self.pool = ThreadPoolExecutor(min(MAX_THREADS, max(VM_LIMIT, biggest) + 4),
                                       thread_name_prefix=f"failover-{plan.run_id[:8]}")
        self.stop = StopSignal()  # set only by the engine's 'stop' (relayed)
        self.ex = Executor(self.book, self.stop, self.pool)
        self._fences: ThreadPoolExecutor | None = None

    def _fence_pool(self) -> ThreadPoolExecutor:
        """Fencing calls' own threads: one given up on may block for long, and must not hold a
        thread the rest of the run needs."""
        if self._fences is None:
            self._fences = ThreadPoolExecutor(min(MAX_THREADS, max(1, len(self.plan.vms))),
                                              thread_name_prefix=f"fence-{self.plan.run_id[:8]}")
        return self._fences

    async def run(self) -> dict[str, Any]:
        if not self.book.rows and self.ctx.stop.cancelled:
            raise OperationCancelled("cancelled before it started: nothing was done")
        self._check_stored_plan()
        try:
            async with self._relay():
                await self.book.plan(self.plan.steps)
                if self.plan.kind in FORWARD_KINDS:
                    report = await self._forward()
                else:
                    from handlers.recovery.failover_after import AfterSteps
                    report = await AfterSteps(self).run()
        finally:
            self.pool.shutdown(wait=False)
            if self._fences is not None:
                self._fences.shutdown(wait=False)
        status = "awaiting_commit" if self.plan.kind == "failover" else "completed"
        return {"status": status, "report": report}

    @contextlib.asynccontextmanager
    async def _relay(self) -> AsyncIterator[None]:
        async def relay() -> None:
            while True:
                if self.ctx.stop.reason == "stop":
                    self.stop.stop(self.ctx.stop.why)
                    return
                await asyncio.sleep(0.05)

        task = asyncio.create_task(relay())
        try:
            yield
        except Exception:
            if self.stop.reason == "stop" or self.ctx.stop.reason == "stop":
                raise OperationStopped(self.ctx.stop.why or self.stop.why) from None
            raise
        finally:
            task.cancel()

    def _check_stored_plan(self) -> None:
        check_stored_plan(self.plan.steps, self.book.rows, f"this {self.plan.kind}",
                          "put them back as they were, or insert a rollback run to undo what it did")

    # ---- helpers shared with failover_after -----------------------------------------------------

    async def call(self, fn: Any, *args: Any) -> Any:
        return await self.ex.call(fn, *args, self.stop)

    def detail(self, name: str, pid: str | None = None) -> dict[str, Any]:
        return self.book.detail(self.plan.step(name, pid).seq)

    def request(self, name: str, direction: str, base: str | None = None) -> ReplicationRequest:
        """The replication of step ``name``: job id uuid5(run, step), so a resumed attempt reuses the
        snapshot the first one made; no retention pruning on either side while the run goes on."""
        plan = self.plan
        job_id = str(uuid.uuid5(uuid.UUID(plan.run_id), name))
        request = request_for(plan.group, plan.target, job_id=job_id, direction=direction, keep_all=True,
                              last_snapshot=base)  # a hint: the backend matches the base by GUID
        return replace(request, operation_id=str(self.ctx.operation_id), attempt=int(self.ctx.attempt))

    async def replicate(self, name: str, direction: str, base: str | None = None
                        ) -> tuple[ReplicationRequest, ReplicationOutcome]:
        if self.replication is None:
            raise PermanentError("this listener was started without a replication backend, which a "
                                 f"{self.plan.kind} needs: start it with the engine's handlers (build_handlers)")
        request = self.request(name, direction, base)
        outcome = await self.ex.call(self.replication.replicate, request, lambda _progress: None, self.stop)
        return request, outcome

    @staticmethod
    def replication_detail(request: ReplicationRequest, outcome: ReplicationOutcome, direction: str) -> dict[str, Any]:
        return {"job_id": request.job_id, "direction": direction, "source_dataset": request.source_dataset,
                "target_dataset": request.target_dataset, "snapshot_name": outcome.snapshot_name,
                "base_snapshot": outcome.base_snapshot, "bytes_transferred": outcome.bytes_transferred,
                "notes": list(outcome.notes)}

    # ---- planned migration and failover ---------------------------------------------------------

    async def _forward(self) -> dict[str, Any]:
        plan, ex = self.plan, self.ex
        validated = await ex.one(plan.step("validate"), self._validate)
        placement = placement_of(validated)
        if placement is None:
            raise PermanentError("the validate step recorded no placement: insert a rollback run")
        older = bool(validated.get("older"))
        if plan.kind == "planned_migration":
            await ex.one(plan.step("replicate"), self._replicate_first)
            for priority in sorted({v.priority for v in plan.vms}, reverse=True):
                downs = [s for s in plan.steps if s.name == "shutdown_source" and s.priority == priority]
                await ex.batch(downs, self._shutdown, len(downs))
            await ex.one(plan.step("replicate_final"), self._replicate_final)
        else:
            fences = [s for s in plan.steps if s.name == "fence_source"]
            await ex.batch(fences, self._fence, max(1, len(fences)))
        await ex.one(plan.step("pre_failover_snapshot"), lambda: self._pre_snapshot(older))
        await ex.one(plan.step("load_key"), self._load_key)
        await ex.one(plan.step("make_writable"), lambda: self._make_writable(older))
        if plan.kind == "failover":
            await ex.one(plan.step("clone_point"), lambda: self._clone_point(older))
        export = await ex.one(plan.step("export"), lambda: self._export(placement, older))
        await ex.one(plan.step("present_datastore"), lambda: self._present(placement, export, older))
        attaches = [s for s in plan.steps if s.name == "attach_disks"]
        await ex.batch(attaches, lambda s: self._attach(s, older), VM_LIMIT)
        await ex.batch([s for s in plan.steps if s.name == "set_networks"], self._set_networks, VM_LIMIT)
        await Boot(self).run()
        await ex.one(plan.step("finish"), self._finish)
        return self.report()

    def b_dataset(self, older: bool) -> str:
        return self.plan.clone_dataset if older else self.plan.b.dataset

    def b_datastore(self, older: bool) -> str:
        return self.plan.tag if older else self.plan.b_datastore

    async def _validate(self) -> Outcome:
        plan = self.plan
        if plan.problems:
            raise PermanentError("; ".join(plan.problems))
        assert plan.a.vcenter is not None and plan.b.vcenter is not None
        detail: dict[str, Any] = {"direction": plan.direction, "site_a": plan.a.role, "site_b": plan.b.role}
        if plan.kind == "failover":
            detail.update(await self._check_point())
        networks = sorted({n.network for v in plan.vms for n in v.nics})
        site = await self.call(self.compute.check_site, plan.b.vcenter, networks, plan.cluster)
        if site.networks_missing:
            raise PermanentError(
                f"the vCenter of site B {plan.b.vcenter.name!r} has no network "
                f"{', '.join(map(repr, site.networks_missing))}: create it there, or change "
                "network_mappings.recovery_network")
        b_states = await self._states(plan.b.vcenter, [v.b_moref for v in plan.vms])
        on = [f"{v.name} ({v.b_moref}: {b_states[str(v.b_moref)]})" for v in plan.vms
              if b_states[str(v.b_moref)] != "poweredOff"]
        if on:
            raise PermanentError(
                f"these VMs at site B ({plan.b.vcenter.name}) are not powered off: {', '.join(on)}; a {plan.kind} "
                "powers them on with the replicated disks, so power them off there first (nothing was done)")
        if plan.kind == "planned_migration":
            a_states = await self._states(plan.a.vcenter, [v.a_moref for v in plan.vms])
            detail["source_states"] = {v.protected_vm_id: a_states[str(v.a_moref)] for v in plan.vms}
        detail.update(placement={**asdict(site.placement), "hosts": list(site.placement.hosts)},
                      networks=networks)
        return "done", detail, None

    async def _states(self, vcenter: Any, morefs: Sequence[str | None]) -> dict[str, str]:
        """The VMs' power states in one bulk read; a VM the vCenter does not have fails the step."""
        wanted = [str(m) for m in morefs]
        got = await self.call(self.compute.power_states, vcenter, wanted)
        missing = [m for m in wanted if m not in got]
        if missing:
            raise PermanentError(f"VM {', '.join(missing)} does not exist at vCenter {vcenter.name!r}: sync the "
                                 "vCenter (vcenters.sync_requested_at) and fix the protected VM's moref")
        return {m: got[m] for m in wanted}

    async def _check_point(self) -> dict[str, Any]:
        plan = self.plan
        assert plan.b.storage is not None and plan.point_snapshot
        snapshot = f"{plan.b.dataset}@{plan.point_snapshot}"
        guid = await self.call(self.storage.snapshot_guid, plan.b.storage, snapshot)
        if guid is None:
            raise PermanentError(f"the recovery point {snapshot!r} is not on site B's storage any more: insert the "
                                 "failover again with another recovery_point_id (or none: the newest)")
        if plan.point_guid is not None and str(guid) != plan.point_guid:
            raise PermanentError(f"{snapshot!r} has GUID {guid}, but recovery_points.guid records {plan.point_guid}: "
                                 "the replica is not the one Zerfaux replicated; nothing was done")
        after = await self.call(self.storage.snapshots_after, plan.b.storage, plan.b.dataset, plan.point_snapshot)
        own = pre_failover_snapshot(plan.run_id)
        newer = [str(s) for s in after if str(s) != own]
        return {"point": plan.point_snapshot, "guid": str(guid), "older": bool(newer), "newer_snapshots": newer}

    async def _replicate_first(self) -> Outcome:
        request, outcome = await self.replicate("replicate", self.plan.direction)
        return "done", self.replication_detail(request, outcome, self.plan.direction), None

    async def _shutdown(self, step: Step) -> Outcome:
        plan, vm = self.plan, self.vm(step)
        if not vm.a_moref:
            raise PermanentError(f"VM {vm.name!r} has no VM at site A to shut down: sync the vCenters")
        force = bool(plan.option("force_power_off", True))
        done = await self.call(self.compute.shutdown_vm, plan.a.vcenter, vm.a_moref,
                               float(vm.shutdown_timeout_seconds), force)
        return "done", {"moref": vm.a_moref, "vcenter": plan.a.vcenter.name if plan.a.vcenter else None,
                        "how": done.how, "powered_off_at": done.powered_off_at,
                        "waited_seconds": round(float(done.waited_seconds), 3),
                        "timeout_seconds": vm.shutdown_timeout_seconds, "force_power_off": force}, None

    async def _replicate_final(self) -> Outcome:
        plan = self.plan
        request, outcome = await self.replicate("replicate_final", plan.direction,
                                                self.detail("replicate").get("snapshot_name"))
        snap = outcome.snapshot_name
        assert plan.b.storage is not None
        guid_b = await self.call(self.storage.snapshot_guid, plan.b.storage, f"{plan.b.dataset}@{snap}")
        point = next((p for p in outcome.recovery_points if p.snapshot_name == snap), None)
        if plan.a.storage is not None:
            guid_a = await self.call(self.storage.snapshot_guid, plan.a.storage, f"{plan.a.dataset}@{snap}")
        else:  # a local source: the replication matched the two sides' GUIDs itself
            guid_a = point.guid if point is not None and point.on_source else None
        if guid_b is None or guid_a is None or str(guid_a) != str(guid_b):
            raise PermanentError(
                f"the final snapshot @{snap} has GUID {guid_a} at site A ({plan.a.dataset}) and {guid_b} at site B "
                f"({plan.b.dataset}): the replica is not an exact copy, so nothing is powered on at B. Site A's VMs "
                "are off: power them on again there, or find out what changed the replica, then insert a rollback run")
        created = point.created_at if point is not None else now_iso()
        return "done", {**self.replication_detail(request, outcome, plan.direction), "guid": str(guid_b),
                        "guid_a": str(guid_a), "guid_b": str(guid_b), "created_at": created}, None

    async def _fence(self, step: Step) -> Outcome:
        plan, vm = self.plan, self.vm(step)
        if plan.option("skip_source", False):
            return "skipped", {"fenced": False, "why": "options.skip_source is true: site A was not touched"}, None
        if not vm.a_moref or plan.a.vcenter is None:
            why = f"no VM of {vm.name!r} is known at site A (no moref): it could not be powered off"
            return "warning", {"fenced": False, "why": why}, why
        timeout = float(plan.option("fence_timeout_seconds", 60))
        # A hard power off at once: the site is not trusted to shut down cleanly, and the wait is
        # bounded here; the call may go on in its thread after we stop waiting.
        call = asyncio.get_running_loop().run_in_executor(self._fence_pool(), functools.partial(
            self.compute.shutdown_vm, plan.a.vcenter, vm.a_moref, 0.0, True, self.stop))
        base = {"moref": vm.a_moref, "vcenter": plan.a.vcenter.name, "timeout_seconds": timeout}
        try:
            done = await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            why = (f"site A's vCenter {plan.a.vcenter.name!r} did not power {vm.name!r} off within {timeout:g} s "
                   "(options.fence_timeout_seconds): it may still be running there")
            return "warning", {**base, "fenced": False, "why": why}, why
        except OperationStopped:
            raise
        except Exception as exc:  # unreachable, refused: a failover goes on, saying so
            if self.stop.reason == "stop":
                raise
            why = f"could not power {vm.name!r} off at site A ({plan.a.vcenter.name}): {exc}"
            return "warning", {**base, "fenced": False, "why": why[:1000]}, why
        return "done", {**base, "fenced": True, "how": done.how, "powered_off_at": done.powered_off_at,
                        "why": "powered off" if done.how != "already_off" else "it was off already"}, None

    async def _pre_snapshot(self, older: bool) -> Outcome:
        plan = self.plan
        if older:
            return "skipped", {"why": "an older point comes up from a clone: the replica is not written"}, None
        name = pre_failover_snapshot(plan.run_id)
        info = await self.ex.call(self.storage.snapshot, plan.b.storage, plan.b.dataset, name, self.stop, plan.run_id)
        return "done", {"snapshot": info.snapshot, "name": name, "guid": str(info.guid),
                        "created_now": bool(info.created)}, None

    async def _load_key(self) -> Outcome:
        plan = self.plan
        if not plan.key_secret:
            return "skipped", {"why": "protection_groups.encryption_key_secret is not set"}, None
        loaded = await self.call(self.storage.load_key, plan.b.storage, plan.b.dataset, plan.key_secret)
        return "done", {"dataset": plan.b.dataset, "secret": plan.key_secret, "loaded_now": bool(loaded)}, None

    async def _make_writable(self, older: bool) -> Outcome:
        plan = self.plan
        if older:
            return "skipped", {"why": "an older point: its clone is written, never the replica"}, None
        mountpoint = await self.call(self.storage.promote_writable, plan.b.storage, plan.b.dataset)
        return "done", {"dataset": plan.b.dataset, "mountpoint": mountpoint}, None

    async def _clone_point(self, older: bool) -> Outcome:
        plan = self.plan
        if not older:
            return "skipped", {"why": "the newest point: the replica itself is made writable"}, None
        info = await self.call(self.storage.clone, plan.b.storage, f"{plan.b.dataset}@{plan.point_snapshot}",
                               plan.clone_dataset, plan.run_id)
        return "done", {"dataset": info.dataset, "origin": info.origin, "mountpoint": info.mountpoint,
                        "adopted": info.adopted, "datastore": plan.tag}, None

    async def _export(self, placement: Placement, older: bool) -> Outcome:
        plan = self.plan
        if plan.direction == "reverse" and not older:
            return "skipped", {"why": f"site B's datastore {plan.b_datastore!r} presents the dataset already"}, None
        dataset = self.b_dataset(older)
        clients = list(plan.nfs_clients or placement.hosts)
        detail: dict[str, Any] = {"dataset": dataset, "clients": clients}
        try:
            share = self.storage.export if older else self.storage.export_replica
            path = await self.ex.call(share, plan.b.storage, dataset, self.stop, clients)
        except ExportNotServed as exc:
            return "warning", {**detail, "path": exc.path}, str(exc)
        return "done", {**detail, "path": path}, None

    async def _present(self, placement: Placement, export: Mapping[str, Any], older: bool) -> Outcome:
        plan = self.plan
        name = self.b_datastore(older)
        if plan.direction == "reverse" and not older:
            return "skipped", {"datastore": name, "why": "the original VMs' datastore is there already"}, None
        path = str(export.get("path") or self.detail("make_writable").get("mountpoint")
                   or (self.detail("clone_point").get("mountpoint") if older else ""))
        made = await self.call(self.compute.present_datastore, plan.b.vcenter, placement, name, plan.nfs_host, path)
        return "done", {"datastore": name, "remote_host": plan.nfs_host, "remote_path": path,
                        "hosts": list(placement.hosts), "mounted_now": bool(made)}, None

    def vm(self, step: Step) -> FailoverVM:
        vm = self.plan.vm(step.protected_vm_id)
        if vm is None:
            raise PermanentError(f"protected VM {step.protected_vm_id} left the group while the run was in progress: "
                                 "insert a rollback run")
        return vm

    async def _attach(self, step: Step, older: bool) -> Outcome:
        plan, vm = self.plan, self.vm(step)
        if plan.direction == "reverse" and not older:
            return "skipped", {"moref": vm.b_moref, "why": "the original VM kept its disks"}, None
        datastore = self.b_datastore(older)
        disks = remap_disks(vm, plan.protection_datastore, datastore) if older else vm.disks
        detached: tuple[str, ...] = ()
        if older:  # the shell's disks are the DR datastore's: the clone's replace them
            detached = tuple(f for f in await self.call(self.compute.detach_disks, plan.b.vcenter, vm.b_moref)
                             if not f.startswith(f"[{datastore}]"))
        done = await self.call(self.compute.attach_disks, plan.b.vcenter, vm.b_moref, disks)
        return "done", {"moref": vm.b_moref, "datastore": datastore, "attached": list(done.attached),
                        "already": list(done.already), "detached": list(detached)}, None

    async def _set_networks(self, step: Step) -> Outcome:
        plan, vm = self.plan, self.vm(step)
        if not vm.nics:
            return "skipped", {"moref": vm.b_moref, "why": "the VM has no NIC"}, None
        changes = await self.call(self.compute.set_networks, plan.b.vcenter, vm.b_moref, vm.nics)
        return "done", {"moref": vm.b_moref, "networks": [c.network for c in changes],
                        "changed": sum(1 for c in changes if c.changed)}, None

    async def _finish(self) -> Outcome:
        report = self.report()
        return "done", {k: report[k] for k in ("vms", "group") if k in report}, None

    def report(self) -> dict[str, Any]:
        return forward_report(self)
