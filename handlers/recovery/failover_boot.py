"""Boot order at site B for a planned migration or a failover: per priority (lowest first) the VMs
are powered on together, then waited for together; the next priority starts when each is ready
or timed out, plus the priority's largest ``boot_delay_seconds`` (as a test's).

A planned migration's ``power_on`` first reads every VM of the priority at site A, together, once
per attempt: one that is not poweredOff (or cannot be read) fails every step of the priority, so
none of them is powered on and no VM runs in two places.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from handlers.errors import OperationCancelled, OperationStopped, PermanentError
from handlers.recovery.book import Outcome
from handlers.recovery.failover_backends import PowerState
from handlers.recovery.plan import Step
from handlers.recovery.runner import _seconds_since, readiness_outcome

if TYPE_CHECKING:
    from handlers.recovery.failover_runner import FailoverRunner


def where(plan: Any) -> str:
    return plan.a.vcenter.name if plan.a.vcenter else "site A"


class Boot:
    def __init__(self, runner: FailoverRunner) -> None:
        self.r = runner
        self.plan = runner.plan
        self._checks: dict[int, asyncio.Future[dict[str, PowerState | BaseException]]] = {}

    async def run(self) -> None:
        plan, ex = self.plan, self.r.ex
        priorities = sorted({s.priority for s in plan.steps if s.name == "power_on" and s.priority is not None})
        for i, priority in enumerate(priorities):
            ons = [s for s in plan.steps if s.name == "power_on" and s.priority == priority]
            waits = [s for s in plan.steps if s.name == "wait_ready" and s.priority == priority]
            await ex.batch(ons, self.power_on, len(ons))
            await ex.batch(waits, self.wait_ready, len(waits))
            if i + 1 < len(priorities):
                await self.boot_delay(priority, waits, priorities[i + 1])

    async def source_states(self, priority: int) -> dict[str, PowerState | BaseException]:
        """Site A's VMs of one priority, read together (one bulk read of ``runtime.powerState``)
        before any of them is powered on at B. A VM seen off takes its change time from vCenter's
        power-off event recorded by its ``shutdown_source`` step; one seen running (the run stops) is
        read once more on its own, for vCenter's time of its last power change."""
        plan = self.plan
        vms = [v for v in plan.vms if v.priority == priority]
        try:
            states = await self.r.call(self.r.compute.power_states, plan.a.vcenter, [str(v.a_moref) for v in vms])
        except (OperationStopped, OperationCancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - every VM of the priority fails with it
            return {v.protected_vm_id: exc for v in vms}
        got: dict[str, PowerState | BaseException] = {}
        for v in vms:
            state = states.get(str(v.a_moref))
            if state is None:
                got[v.protected_vm_id] = PermanentError(
                    f"VM {v.name!r} ({v.a_moref}) does not exist at site A ({where(plan)}): sync the vCenter; "
                    "nothing of its boot priority is powered on at B")
            elif state == "poweredOff":
                off_at = self.r.detail("shutdown_source", v.protected_vm_id).get("powered_off_at")
                got[v.protected_vm_id] = PowerState(state, off_at)
        running = [v for v in vms if states.get(str(v.a_moref)) not in (None, "poweredOff")]
        again = await asyncio.gather(*(self.r.call(self.r.compute.power_state, plan.a.vcenter, v.a_moref)
                                       for v in running), return_exceptions=True)
        for v, s in zip(running, again):
            # Off by now or not readable: still not off when it was read with the others, so it counts as on.
            seen = states[str(v.a_moref)]
            got[v.protected_vm_id] = PowerState(seen, None if isinstance(s, BaseException) else s.changed_at)
        return got

    async def power_on(self, step: Step) -> Outcome:
        plan, vm = self.plan, self.r.vm(step)
        detail: dict[str, Any] = {"moref": vm.b_moref}
        if plan.kind == "planned_migration":
            if step.priority not in self._checks:
                self._checks[int(step.priority or 0)] = asyncio.ensure_future(
                    self.source_states(int(step.priority or 0)))
            states = await self._checks[int(step.priority or 0)]
            mine = states[vm.protected_vm_id]
            if isinstance(mine, BaseException):
                raise mine
            on = [(v, states[v.protected_vm_id]) for v in plan.vms if v.priority == step.priority]
            unknown = [v.name for v, s in on if isinstance(s, BaseException)]
            if unknown:  # the others' steps raise their own errors; this VM waits for an answer for all
                raise PermanentError(f"not powered on: the power state at site A of {', '.join(unknown)} (same boot "
                                     "priority) could not be read, and a priority starts together or not at all")
            running = [f"{v.name!r} ({v.a_moref}) is {s.state} at site A since {s.changed_at}"  # type: ignore[union-attr]
                       for v, s in on if s.state != "poweredOff"]  # type: ignore[union-attr]
            if running:
                where = plan.a.vcenter.name if plan.a.vcenter else "site A"
                raise PermanentError(
                    f"VM {'; VM '.join(running)} ({where}): nothing of boot priority {step.priority} is powered on "
                    "at B, so no VM runs in two places. The run stops here: find out who started it, power it off "
                    "at site A, then insert a rollback run (it undoes this run) and a new planned migration")
            detail.update(source_state=mine.state, source_changed_at=mine.changed_at)
        else:
            fence = self.r.detail("fence_source", vm.protected_vm_id)
            detail.update(fenced=bool(fence.get("fenced")), fence_why=fence.get("why"))
        boot_time = await self.r.call(self.r.compute.power_on, plan.b.vcenter, vm.b_moref)
        return "done", {**detail, "boot_time": boot_time}, None

    async def wait_ready(self, step: Step) -> Outcome:
        plan, vm = self.plan, self.r.vm(step)
        boot_time = self.r.detail("power_on", vm.protected_vm_id).get("boot_time")
        timeout = float(vm.tools_timeout_seconds)
        if timeout > 0 and self.r.book.status(step.seq) == "running":
            timeout = max(1.0, timeout - _seconds_since(boot_time))  # a resumed wait keeps its deadline
        ready = await self.r.call(self.r.compute.wait_ready, plan.b.vcenter, vm.b_moref, timeout)
        return readiness_outcome(ready, str(vm.b_moref), boot_time, vm.tools_timeout_seconds)

    async def boot_delay(self, priority: int, waits: list[Step], next_priority: int) -> None:
        delay = max((v.boot_delay_seconds for v in self.plan.vms if v.priority == priority), default=0)
        first_next = next(s for s in self.plan.steps if s.name == "power_on" and s.priority == next_priority)
        if delay <= 0 or self.r.book.status(first_next.seq) != "pending":
            return
        ready_at = max((str(self.r.book.detail(s.seq).get("ready_at") or "") for s in waits), default="")
        await self.r.ex.sleep(max(0.0, delay - _seconds_since(ready_at)))
