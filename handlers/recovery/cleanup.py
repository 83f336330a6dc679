"""The cleanup steps: remove what a test made, found from its recorded steps and from the peers.

A test step still 'pending' (or 'skipped') never had its effect, so its cleanup step is skipped;
one that is 'running', 'failed', 'done' or 'warning' may have, so its cleanup runs (every
backend call converges: already gone is no error). Test VMs are also looked up by the run's mark
at the DR vCenter (``find_run_vms``): a VM a killed attempt created before it could record the
moref is found and destroyed, never leaked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from handlers.recovery.backends import Placement, RecoveryCompute, RecoveryStorage
from handlers.recovery.book import ATTEMPTED, Executor, Outcome
from handlers.recovery.plan import RunPlan, Step

log = logging.getLogger(__name__)

DESTROY_LIMIT = 8


def placement_of(detail: Mapping[str, Any]) -> Placement | None:
    raw = detail.get("placement")
    if not isinstance(raw, Mapping) or not raw.get("compute_resource"):
        return None
    return Placement(datacenter=str(raw.get("datacenter") or ""), compute_resource=str(raw["compute_resource"]),
                     hosts=tuple(str(h) for h in raw.get("hosts") or ()), resource_pool=raw.get("resource_pool"),
                     folder=raw.get("folder"))


class Cleanup:
    def __init__(self, plan: RunPlan, storage: RecoveryStorage, compute: RecoveryCompute, ex: Executor,
                 test_rows: Sequence[Mapping[str, Any]]) -> None:
        self.plan = plan
        self.storage = storage
        self.compute = compute
        self.ex = ex
        self._test = {(str(r.get("name")), None if r.get("protected_vm_id") is None else str(r["protected_vm_id"])): r
                      for r in test_rows}
        self._found: dict[str, str] | None = None
        self.destroyed: list[str] = []
        self.warnings: list[str] = []

    def attempted(self, name: str, pid: str | None = None) -> bool:
        return str((self._test.get((name, pid)) or {}).get("status") or "pending") in ATTEMPTED

    def test_detail(self, name: str, pid: str | None = None) -> dict[str, Any]:
        return dict((self._test.get((name, pid)) or {}).get("detail") or {})

    def any_vm_attempted(self) -> bool:
        return any(name == "create_vm" and self.attempted(name, pid) for name, pid in self._test)

    async def found(self, again: bool = False) -> dict[str, str]:
        if self._found is None or again:
            self._found = dict(await self.ex.call(self.compute.find_run_vms, self.plan.vcenter,
                                                  self.plan.resource_run_id, self.ex.stop))
        return self._found

    async def run(self, steps: Sequence[Step]) -> dict[str, Any]:
        destroys = [s for s in steps if s.name == "destroy_vm"]
        await self.ex.batch(destroys, self._destroy_vm, DESTROY_LIMIT)
        effects = {"remove_datastore": self._remove_datastore, "remove_port_group": self._remove_port_group,
                   "unexport_clone": self._unexport, "destroy_clone": self._destroy_clone,
                   "release_hold": self._release, "mark_tested": self._mark_tested}
        for step in steps:
            if step.name in effects:
                await self.ex.one(step, effects[step.name])
        warnings = [str(r.get("error")) for r in self.ex.book.rows.values()
                    if r.get("status") == "warning" and r.get("name") in effects and r.get("error")]
        return {"destroyed_vms": self.destroyed, "warnings": warnings}

    async def _destroy_vm(self, step: Step) -> Outcome:
        pid = step.protected_vm_id
        morefs: list[str] = []
        recorded = self.test_detail("create_vm", pid).get("moref")
        if recorded:
            morefs.append(str(recorded))
        if self.attempted("create_vm", pid):
            extra = (await self.found()).get(str(pid))
            if extra and extra not in morefs:
                morefs.append(extra)
        if not morefs:
            why = "no test VM of it was found" if self.attempted("create_vm", pid) else "the test never created it"
            return "skipped", {"why": why}, None
        return "done", await self._destroy(morefs), None

    async def _destroy(self, morefs: Sequence[str]) -> dict[str, Any]:
        now = []
        for moref in morefs:
            if await self.ex.call(self.compute.destroy_vm, self.plan.vcenter, moref, self.plan.resource_run_id,
                                  self.ex.stop):
                now.append(moref)
        self.destroyed.extend(now)
        return {"morefs": list(morefs), "destroyed_now": now}

    def _placement(self) -> Placement | None:
        return placement_of(self.test_detail("validate"))

    async def _remove_datastore(self) -> Outcome:
        detail: dict[str, Any] = {"datastore": self.plan.tag}
        if self.any_vm_attempted():
            # A VM carrying the run's mark that no destroy_vm step knew of (its protected VM left
            # the group, or it was adopted under another moref) goes before its datastore.
            strays = sorted(set((await self.found(again=True)).values()))
            if strays:
                detail["strays"] = (await self._destroy(strays))["morefs"]
        placement = self._placement()
        if not self.attempted("present_datastore") or placement is None:
            return "skipped", {**detail, "why": "the test never presented the datastore"}, None
        warning = await self.ex.call(self.compute.remove_datastore, self.plan.vcenter, placement, self.plan.tag,
                                     self.ex.stop)
        if warning:
            return "warning", {**detail, "warning": warning}, warning
        return "done", detail, None

    async def _remove_port_group(self) -> Outcome:
        placement = self._placement()
        if not self.attempted("create_port_group") or placement is None:
            return "skipped", {"why": "the test made no port group"}, None
        gone = await self.ex.call(self.compute.remove_port_group, self.plan.vcenter, placement, self.plan.tag,
                                  self.ex.stop)
        return "done", {"port_group": self.plan.tag, "removed_now": bool(gone)}, None

    def _clone_dataset(self) -> str:
        return str(self.test_detail("clone_snapshot").get("dataset") or self.plan.clone_dataset)

    async def _unexport(self) -> Outcome:
        if not self.attempted("export_clone"):
            return "skipped", {"why": "the test never exported the clone"}, None
        dataset = self._clone_dataset()
        done = await self.ex.call(self.storage.unexport, self.plan.target, dataset, self.ex.stop)
        return "done", {"dataset": dataset, "unexported_now": bool(done)}, None

    async def _destroy_clone(self) -> Outcome:
        if not self.attempted("clone_snapshot"):
            return "skipped", {"why": "the test never cloned the recovery point"}, None
        dataset = self._clone_dataset()
        done = await self.ex.call(self.storage.destroy_clone, self.plan.target, dataset, self.plan.resource_run_id,
                                  self.ex.stop)
        return "done", {"dataset": dataset, "destroyed_now": bool(done)}, None

    async def _release(self) -> Outcome:
        if not self.attempted("hold_snapshot"):
            return "skipped", {"why": "the test never held the snapshot"}, None
        snapshot = str(self.test_detail("hold_snapshot").get("snapshot") or self.plan.snapshot)
        done = await self.ex.call(self.storage.release, self.plan.target, snapshot, self.plan.tag, self.ex.stop)
        return "done", {"snapshot": snapshot, "tag": self.plan.tag, "released_now": bool(done)}, None

    async def _mark_tested(self) -> Outcome:
        return "done", {"recovery_point": self.plan.snapshot}, None
