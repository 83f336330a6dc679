"""Commit, rollback and reprotect: the runs that act on a planned migration or failover (issue 14).

What the acted-on run made is read from its recorded steps (``acts_on_steps``): a step still
'pending' or 'skipped' had no effect, one 'running', 'failed', 'done' or 'warning' may have
(``book.ATTEMPTED``), so only those are undone. Every call converges, so a resumed attempt
simply does its step again; where a step is two effects in a row (the rollback of the replica),
it records what it measured before the first, so a resumed attempt reports the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from handlers.errors import OperationStopped, PermanentError
from handlers.recovery.book import ATTEMPTED, Outcome
from handlers.recovery.cleanup import placement_of
from handlers.recovery.failover_backends import pre_failover_snapshot
from handlers.recovery.failover_plan import FORWARD_KINDS, hex8
from handlers.recovery.plan import Step

if TYPE_CHECKING:
    from handlers.recovery.failover_runner import FailoverRunner

log = logging.getLogger(__name__)

VM_LIMIT = 16


def as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "_asdict"):
        return dict(value._asdict())
    return {"value": value}


class AfterSteps:
    def __init__(self, runner: FailoverRunner) -> None:
        self.r = runner
        self.plan = runner.plan
        self.ex = runner.ex
        self._acted = {(str(s.get("name")), None if s.get("protected_vm_id") is None else str(s["protected_vm_id"])): s
                       for s in self.plan.acts_on_steps}

    # ---- what the acted-on run did ---------------------------------------------------------------

    def attempted(self, name: str, pid: str | None = None) -> bool:
        return str((self._acted.get((name, pid)) or {}).get("status") or "pending") in ATTEMPTED

    def acted(self, name: str, pid: str | None = None) -> dict[str, Any]:
        return dict((self._acted.get((name, pid)) or {}).get("detail") or {})

    @property
    def acted_id(self) -> str:
        return self.plan.resource_run_id

    @property
    def older(self) -> bool:
        return bool(self.acted("validate").get("older"))

    def point(self) -> str | None:
        return (self.acted("validate").get("point") or self.acted("replicate_final").get("snapshot_name")
                or self.plan.point_snapshot)

    async def run(self) -> dict[str, Any]:
        plan, ex = self.plan, self.ex
        kind = plan.kind
        await ex.one(plan.step("validate"), self._validate)
        if kind == "commit":
            await ex.one(plan.step("replace_replica"), self._replace_replica)
        elif kind == "rollback":
            await ex.batch([s for s in plan.steps if s.name == "power_off"], self._power_off, VM_LIMIT)
            await ex.batch([s for s in plan.steps if s.name == "detach_disks"], self._detach, VM_LIMIT)
            for name, effect in (("unexport", self._unexport), ("remove_datastore", self._remove_datastore),
                                 ("rollback_replica", self._rollback_replica), ("destroy_clone", self._destroy_clone),
                                 ("set_readonly", self._set_readonly)):
                await ex.one(plan.step(name), effect)
        else:
            await ex.one(plan.step("check_source_changes"), self._check_changes)
            await ex.one(plan.step("keep_source_changes"), self._keep_changes)
            await ex.one(plan.step("replicate_reverse"), self._replicate_reverse)
        await ex.one(plan.step("finish"), lambda: self._finish())
        return self.report()

    async def _validate(self) -> Outcome:
        plan, acts = self.plan, self.plan.acts_on or {}
        kinds = ("failover",) if plan.kind == "commit" else FORWARD_KINDS
        if acts.get("kind") not in kinds:
            raise PermanentError(f"recovery_runs.acts_on_run_id names a {acts.get('kind')!r} run; a {plan.kind} acts "
                                 f"on a {' or '.join(kinds)} run")
        detail: dict[str, Any] = {"acts_on_run_id": self.acted_id, "acts_on_kind": acts.get("kind"),
                                  "direction": plan.direction}
        if plan.kind == "reprotect":
            detail.update(await self._site_a_off())
            detail.update(await self._common())
        else:
            detail.update(older=self.older, point=self.point())
        return "done", detail, None

    # ---- commit ------------------------------------------------------------------------------------

    async def _replace_replica(self) -> Outcome:
        plan = self.plan
        if not self.older or not self.attempted("clone_point"):
            return "skipped", {"why": "the failover brought up the newest point on the replica itself"}, None
        clone = str(self.acted("clone_point").get("dataset") or plan.clone_dataset)
        # The tag's hex names the superseded replica: <ds>_zerfaux_superseded_<8 hex of the failover's id>.
        done = await self.r.call(self.r.storage.replace_with_clone, plan.b.storage, plan.b.dataset, clone,
                                 self.acted_id)
        return "done", {"dataset": plan.b.dataset, "clone": clone, **as_dict(done)}, None

    # ---- rollback ----------------------------------------------------------------------------------

    async def _power_off(self, step: Step) -> Outcome:
        plan, pid = self.plan, step.protected_vm_id
        vm = plan.vm(pid)
        if vm is None or not vm.b_moref or not self.attempted("power_on", pid):
            return "skipped", {"why": "the run rolled back never powered it on"}, None
        done = await self.r.call(self.r.compute.shutdown_vm, plan.b.vcenter, vm.b_moref, 0.0, True)
        return "done", {"moref": vm.b_moref, "how": done.how, "powered_off_at": done.powered_off_at}, None

    async def _detach(self, step: Step) -> Outcome:
        plan, pid = self.plan, step.protected_vm_id
        vm = plan.vm(pid)
        if plan.direction == "reverse" and not self.older:
            return "skipped", {"why": "the original VMs keep their disks"}, None
        if vm is None or not vm.b_moref or not self.attempted("attach_disks", pid):
            return "skipped", {"why": "the run rolled back never attached its disks"}, None
        files = await self.r.call(self.r.compute.detach_disks, plan.b.vcenter, vm.b_moref)
        return "done", {"moref": vm.b_moref, "detached": list(files)}, None

    async def _unexport(self) -> Outcome:
        plan = self.plan
        export = self._acted.get(("export", None)) or {}
        if not self.attempted("export") or export.get("status") == "skipped":
            return "skipped", {"why": "the run rolled back exported nothing"}, None
        dataset = str(self.acted("export").get("dataset") or (plan.clone_dataset if self.older else plan.b.dataset))
        unshare = self.r.storage.unexport if self.older else self.r.storage.unexport_replica
        done = await self.r.call(unshare, plan.b.storage, dataset)
        return "done", {"dataset": dataset, "unexported_now": bool(done)}, None

    async def _remove_datastore(self) -> Outcome:
        plan = self.plan
        placement = placement_of(self.acted("validate"))
        if not self.older:
            return "skipped", {"why": f"{plan.b_datastore!r} is the DR datastore, kept for the next failover"}, None
        if not self.attempted("present_datastore") or placement is None:
            return "skipped", {"why": "the run rolled back never presented its clone"}, None
        warning = await self.r.call(self.r.compute.remove_datastore, plan.b.vcenter, placement, plan.tag)
        if warning:
            return "warning", {"datastore": plan.tag, "warning": warning}, warning
        return "done", {"datastore": plan.tag}, None

    async def _rollback_replica(self) -> Outcome:
        plan, r = self.plan, self.r
        step = plan.step("rollback_replica")
        if self.older:
            return "skipped", {"why": "an older point came up from a clone: the replica was never written"}, None
        if not self.attempted("pre_failover_snapshot"):
            return "skipped", {"why": "the run rolled back never wrote to the replica"}, None
        ds, point = plan.b.dataset, self.point()
        pre = str(self.acted("pre_failover_snapshot").get("name") or pre_failover_snapshot(self.acted_id))
        # Only this step's own keys from what an earlier attempt recorded: the detail also holds the
        # database's attempt, worker and previous_attempts, which a write of them would take back.
        mine = {k: v for k, v in self.r.book.detail(step.seq).items() if k in ("discarded", "destroying")}
        detail: dict[str, Any] = {"dataset": ds, "pre_failover_snapshot": f"{ds}@{pre}", "point": point, **mine}
        if await r.call(r.storage.snapshot_guid, plan.b.storage, f"{ds}@{pre}") is None:
            if not mine.get("destroying"):
                raise PermanentError(f"{ds}@{pre} is gone, so the replica cannot be returned to where it was before "
                                     "the failover: nothing was rolled back. Replicate the group again from scratch")
            await r.call(r.storage.rollback, plan.b.storage, ds, str(point))
            return "done", {**detail, "pre_failover_destroyed": True}, None
        if "discarded" not in detail:
            w = await r.call(r.storage.written_since, plan.b.storage, ds, pre)
            detail["discarded"] = {"bytes": w.bytes, "how": w.how, "note": w.note}
            await r.book.write([(step, ("running", {"discarded": detail["discarded"]}, None))])
        detail["rolled_back"] = list(await r.call(r.storage.rollback, plan.b.storage, ds, pre))
        beyond = await r.call(r.storage.written_since, plan.b.storage, ds, str(point)) if point else None
        detail["beyond_point"] = None if beyond is None else {"bytes": beyond.bytes, "how": beyond.how}
        if beyond is None or beyond.bytes != 0:
            why = ("the replica holds data beyond the recovery point " + (f"@{point} " if point else "")
                   + ("that this ZFS cannot measure" if beyond is None or beyond.bytes is None
                      else f"({beyond.bytes} bytes written before the failover)"))
            note = (f"kept {ds}@{pre}: {why}, so destroying it could lose data. The next forward replication will be "
                    f"refused (the replica's newest snapshot, @{pre}, is not on the source): look at it, then "
                    f"`zfs destroy {ds}@{pre}` and `zfs rollback {ds}@{point}` on the DR storage host")
            return "warning", {**detail, "pre_failover_destroyed": False, "note": note}, note
        await r.book.write([(step, ("running", {"destroying": True}, None))])
        destroyed = await r.call(r.storage.destroy_snapshot, plan.b.storage, f"{ds}@{pre}", self.acted_id)
        await r.call(r.storage.rollback, plan.b.storage, ds, str(point))
        return "done", {**detail, "pre_failover_destroyed": True, "destroyed_now": bool(destroyed)}, None

    async def _destroy_clone(self) -> Outcome:
        plan = self.plan
        if not self.older or not self.attempted("clone_point"):
            return "skipped", {"why": "the run rolled back made no clone"}, None
        clone = str(self.acted("clone_point").get("dataset") or plan.clone_dataset)
        done = await self.r.call(self.r.storage.destroy_clone, plan.b.storage, clone, self.acted_id)
        return "done", {"dataset": clone, "destroyed_now": bool(done)}, None

    async def _set_readonly(self) -> Outcome:
        plan = self.plan
        changed = await self.r.call(self.r.storage.set_readonly, plan.b.storage, plan.b.dataset, True)
        return "done", {"dataset": plan.b.dataset, "readonly": True, "changed_now": bool(changed)}, None

    # ---- reprotect ---------------------------------------------------------------------------------

    async def _site_a_off(self) -> dict[str, Any]:
        """Site A's VMs must be off before its dataset is replaced by what comes back from B: one
        seen running refuses the reprotect; a vCenter that does not answer is noted, not fatal
        (site A's storage may be back before its vCenter)."""
        plan, r = self.plan, self.r
        vms = [v for v in plan.vms if v.a_moref]
        if plan.a.vcenter is None or not vms:
            return {"site_a_states": {}}
        got = await asyncio.gather(*(r.call(r.compute.power_state, plan.a.vcenter, v.a_moref) for v in vms),
                                   return_exceptions=True)
        for error in got:
            if isinstance(error, OperationStopped):
                raise error
        on = [f"{v.name!r} ({v.a_moref}: {s.state})" for v, s in zip(vms, got)
              if not isinstance(s, BaseException) and s.state != "poweredOff"]
        if on:
            raise PermanentError(
                f"these VMs are running at site A ({plan.a.vcenter.name}) while their copies run at B: "
                f"{', '.join(on)}. A reprotect replaces site A's dataset with what B holds: power them off at "
                "site A (what they wrote is kept by the reprotect), then insert it again. Nothing was done")
        return {"site_a_states": {v.protected_vm_id: (f"unknown: {s}"[:300] if isinstance(s, BaseException)
                                                      else s.state) for v, s in zip(vms, got)}}

    async def _common(self) -> dict[str, Any]:
        """The newest snapshot of site A's dataset (the new target) that B's (the new source) also has."""
        plan, r = self.plan, self.r
        common = await r.call(r.storage.newest_common_snapshot, plan.a.storage, plan.a.dataset, plan.b.storage,
                              plan.b.dataset)
        if common is None:
            a_host = plan.a.storage.host if plan.a.storage else "the listener's machine"
            b_host = plan.b.storage.host if plan.b.storage else "the listener's machine"
            raise PermanentError(
                f"{plan.a.dataset} on {a_host} and {plan.b.dataset} on {b_host} share no snapshot (none with the "
                "same GUID), so the replication back cannot be incremental, and Zerfaux never overwrites a dataset "
                f"with a full stream. Nothing was done. To reprotect: on {a_host}, move the original dataset out of "
                f"the way (`zfs rename {plan.a.dataset} {plan.a.dataset}_old`: its data stays there; or destroy it "
                f"if nothing on it is needed), send the live dataset back in full (on {b_host}: `zfs snapshot "
                f"{plan.b.dataset}@zerfaux_reseed` and `zfs send {plan.b.dataset}@zerfaux_reseed | ssh {a_host} "
                f"zfs receive -u {plan.a.dataset}`), then insert the reprotect again: it starts from that snapshot")
        found = as_dict(common)
        return {"common": {k: None if found.get(k) is None else str(found[k]) for k in ("name", "guid", "created")}}

    def _common_name(self) -> str:
        name = (self.r.detail("validate").get("common") or {}).get("name")
        if not name:
            raise PermanentError("the validate step recorded no common snapshot: insert the reprotect again")
        return str(name)

    async def _check_changes(self) -> Outcome:
        plan, r = self.plan, self.r
        common = self._common_name()
        after = await r.call(r.storage.snapshots_after, plan.a.storage, plan.a.dataset, common)
        w = await r.call(r.storage.written_since, plan.a.storage, plan.a.dataset, common)
        changed = bool(after) or w.bytes is None or w.bytes > 0
        return "done", {"dataset": plan.a.dataset, "common": common, "snapshots_after": [str(s) for s in after],
                        "written_bytes": w.bytes, "how": w.how, "note": w.note, "changed": changed}, None

    async def _keep_changes(self) -> Outcome:
        plan, r = self.plan, self.r
        seen = r.detail("check_source_changes")
        common = self._common_name()
        if not seen.get("changed"):
            return "skipped", {"why": f"{plan.a.dataset} holds nothing beyond @{common}"}, None
        if plan.option("discard_source_changes", False):
            gone = await r.call(r.storage.discard_changes, plan.a.storage, plan.a.dataset, common)
            return "done", {"discarded": True, "dataset": plan.a.dataset, "common": common,
                            "destroyed_snapshots": [str(s) for s in gone],
                            "bytes": seen.get("written_bytes")}, None
        tag = "zerfaux-kept-" + hex8(plan.run_id)
        kept = as_dict(await r.call(r.storage.keep_changes, plan.a.storage, plan.a.dataset, common, tag, plan.run_id))
        return "done", {"discarded": False, "dataset": plan.a.dataset, "common": common, **kept}, None

    async def _replicate_reverse(self) -> Outcome:
        plan, r = self.plan, self.r
        # The new target takes no writes from now on: an incremental is received only into a
        # dataset unchanged since its base.
        changed = await r.call(r.storage.set_readonly, plan.a.storage, plan.a.dataset, True)
        direction = plan.reversed_direction
        request, outcome = await r.replicate("replicate_reverse", direction, self._common_name())
        return "done", {**r.replication_detail(request, outcome, direction), "readonly": plan.a.dataset,
                        "readonly_changed_now": bool(changed)}, None

    # ---- finish and report -------------------------------------------------------------------------

    async def _finish(self) -> Outcome:
        return "done", {k: v for k, v in self.report().items() if k not in ("run_id", "kind")}, None

    def report(self) -> dict[str, Any]:
        plan, r = self.plan, self.r
        out: dict[str, Any] = {"run_id": plan.run_id, "kind": plan.kind, "acts_on_run_id": self.acted_id,
                               "direction": plan.direction}
        if plan.kind == "commit":
            replaced = r.detail("replace_replica")
            out["replaced_replica"] = replaced or None
        elif plan.kind == "rollback":
            out.update(self._rollback_report())
        else:
            out.update(self._reprotect_report())
        out["warnings"] = [f"{row['name']}: {row.get('error')}" for row in r.book.rows.values()
                           if row.get("status") == "warning" and row.get("error")]
        return out

    def _rollback_report(self) -> dict[str, Any]:
        plan, r = self.plan, self.r
        replica, clone = r.detail("rollback_replica"), r.detail("destroy_clone")
        discarded: dict[str, Any]
        if clone.get("dataset"):
            discarded = {"bytes": None, "how": f"destroyed the clone {clone['dataset']} with everything the DR VMs "
                                               "wrote to it; the replica was never written"}
        elif replica.get("discarded"):
            d = replica["discarded"]
            discarded = {"bytes": d.get("bytes"), "how": f"rolled {plan.b.dataset} back to its pre-failover snapshot "
                                                         f"({d.get('how')}): what the DR VMs wrote since the failover"}
        else:
            discarded = {"bytes": 0, "how": "nothing had been written at site B"}
        out: dict[str, Any] = {"discarded": discarded,
                               "powered_off": [r.detail("power_off", v.protected_vm_id).get("moref") for v in plan.vms
                                               if r.detail("power_off", v.protected_vm_id).get("moref")],
                               "pre_failover_destroyed": replica.get("pre_failover_destroyed")}
        if replica.get("note"):
            out["note"] = replica["note"]
        if (plan.acts_on or {}).get("kind") == "planned_migration":
            out["site_a"] = (f"the planned migration shut site A's VMs down; they stay off: power them on at "
                             f"{plan.a.vcenter.name if plan.a.vcenter else 'site A'}")
        return out

    def _reprotect_report(self) -> dict[str, Any]:
        plan, r = self.plan, self.r
        seen, kept, sent = r.detail("check_source_changes"), r.detail("keep_source_changes"), r.detail("replicate_reverse")
        out: dict[str, Any] = {"new_direction": plan.reversed_direction, "common_snapshot": r.detail("validate").get("common"),
                               "source_changes": {"snapshots_after": seen.get("snapshots_after"),
                                                  "written_bytes": seen.get("written_bytes")},
                               "replication": {k: sent.get(k) for k in ("snapshot_name", "base_snapshot",
                                                                        "bytes_transferred", "source_dataset",
                                                                        "target_dataset")},
                               "readonly": sent.get("readonly")}
        if kept.get("discarded"):
            out["discarded"] = {"dataset": kept.get("dataset"), "snapshots": kept.get("destroyed_snapshots"),
                                "bytes": kept.get("bytes")}
        elif kept.get("kept_dataset"):
            out["kept"] = {k: kept.get(k) for k in ("kept_dataset", "kept_snapshot", "hold_tag", "clone")}
        return out
