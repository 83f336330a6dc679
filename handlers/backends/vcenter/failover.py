"""``FailoverComputeReal``: shut down and fence VMs, give DR shells their disks and networks (issue 14).

Implements ``handlers.recovery.failover_backends.FailoverCompute`` on the shared sessions
(``session``), bulk reads and task waits (``query``) and the device changes DR shells are made
with (``shell``). Not used by any run yet (docs/recovery.md, "Failover groundwork").

Power off is judged by ``runtime.powerState`` alone, watched with ``WaitForUpdatesEx``:
``ShutdownGuest`` returns before the guest is down on a real vCenter (and raises
``ToolsUnavailable`` without Tools), while vcsim 0.24 powers the VM off at once and never checks
Tools (FACTS.md). When it went off is read from vCenter's own events (``VmPoweredOffEvent``),
so a fencing check compares vCenter's clocks, not ours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from pyVmomi import vim, vmodl

from handlers.backends.vcenter import failover_devices as devices
from handlers.backends.vcenter.query import check_stop, properties, retrieve_many, wait_for_task
from handlers.backends.vcenter.recovery import RecoveryComputeReal
from handlers.backends.vcenter.session import where
from handlers.backends.vcenter.watch import watch
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic
from handlers.recovery.failover_backends import AttachResult, NicChange, PowerState, ShutdownResult
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

OFF, ON, SUSPENDED = "poweredOff", "poweredOn", "suspended"
TOOLS_RUNNING = "guestToolsRunning"
POWER_EVENTS = ["VmPoweredOffEvent", "VmPoweredOnEvent", "VmSuspendedEvent", "VmResumingEvent"]


class FailoverComputeReal(RecoveryComputeReal):
    """Both vCenters for a failover run: the test failover's calls (``RecoveryComputeReal``: site
    check, datastores, power on, readiness) and the failover's own, on the same sessions."""

    def shutdown_vm(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float, force_power_off: bool,
                    stop: threading.Event) -> ShutdownResult:
        return self._sessions.run(
            vcenter, lambda si: _shutdown(si, vcenter, moref, timeout_seconds, force_power_off, stop))

    def power_state(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> PowerState:
        check_stop(stop, f"before reading VM {moref}'s power state")
        return self._sessions.run(vcenter, lambda si: _power_state(si, moref))

    def power_states(self, vcenter: VCenterEndpoint, morefs: Sequence[str], stop: threading.Event) -> dict[str, str]:
        check_stop(stop, f"before reading {len(morefs)} VMs' power states")
        return self._sessions.run(vcenter, lambda si: _power_states(si, morefs))

    def attach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, disks: Sequence[RecoveryDisk],
                     stop: threading.Event) -> AttachResult:
        return self._sessions.run(vcenter, lambda si: devices.attach(si, vcenter, shell_moref, disks, stop))

    def detach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, stop: threading.Event) -> tuple[str, ...]:
        return self._sessions.run(vcenter, lambda si: devices.detach(si, vcenter, shell_moref, stop))

    def set_networks(self, vcenter: VCenterEndpoint, moref: str, nics: Sequence[RecoveryNic],
                     stop: threading.Event) -> tuple[NicChange, ...]:
        return self._sessions.run(vcenter, lambda si: devices.set_networks(si, vcenter, moref, nics, stop))


# ---- power -----------------------------------------------------------------------------------------


def _vm(si: Any, moref: str) -> Any:
    return vim.VirtualMachine(moref, si._stub)


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def last_power_event(si: Any, vm: Any, kinds: Sequence[str] = POWER_EVENTS) -> Any | None:
    """The newest of the VM's power events vCenter still keeps (None: none in its history)."""
    spec = vim.event.EventFilterSpec(
        entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"), eventTypeId=list(kinds))
    events = si.content.eventManager.QueryEvents(spec) or []
    return max(events, key=lambda e: (e.createdTime, e.key), default=None)


def _power_state(si: Any, moref: str) -> PowerState:
    vm = _vm(si, moref)
    props = properties(si, vm, ["runtime.powerState", "summary.runtime.bootTime"])
    state = str(props.get("runtime.powerState"))
    event = last_power_event(si, vm)
    changed = _iso(event.createdTime) if event is not None else None
    if changed is None and state == ON:
        changed = _iso(props.get("summary.runtime.bootTime"))
    return PowerState(state=state, changed_at=changed)


def _power_states(si: Any, morefs: Sequence[str]) -> dict[str, str]:
    """One ``RetrievePropertiesEx`` of ``runtime.powerState`` for all the VMs; one that is gone is
    left out (and the rest read again), as a single read of it would find nothing."""
    refs = list(dict.fromkeys(str(m) for m in morefs))
    while refs:
        try:
            rows = retrieve_many(si, [_vm(si, m) for m in refs], vim.VirtualMachine, ["runtime.powerState"])
            return {str(o._moId): str(p.get("runtime.powerState")) for o, p in rows if "runtime.powerState" in p}
        except vmodl.fault.ManagedObjectNotFound as exc:
            gone = getattr(getattr(exc, "obj", None), "_moId", None)
            if gone is None or gone not in refs:
                raise
            refs.remove(gone)
    return {}


def _wait_off(si: Any, vm: Any, timeout_seconds: float, stop: threading.Event, started: float) -> bool:
    """Long-poll ``runtime.powerState`` until poweredOff (True) or ``timeout_seconds`` since ``started``."""
    off = watch(si, vm, ["runtime.powerState"], timeout_seconds, stop,
                lambda values: True if str(values.get("runtime.powerState")) == OFF else None,
                f"VM {vm._moId} to power off", started)
    return bool(off)


def _off_result(si: Any, vm: Any, how: str, started: float) -> ShutdownResult:
    event = last_power_event(si, vm, ["VmPoweredOffEvent"])
    at = _iso(event.createdTime) if event is not None else None
    return ShutdownResult(how=how, powered_off_at=at, waited_seconds=round(time.monotonic() - started, 3))  # type: ignore[arg-type]


def _shutdown(si: Any, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float, force: bool,
              stop: threading.Event) -> ShutdownResult:
    if timeout_seconds < 0:
        raise PermanentError(f"protected_vms.shutdown_timeout_seconds {timeout_seconds} must be 0 or more")
    started = time.monotonic()
    vm = _vm(si, moref)
    props = properties(si, vm, ["name", "runtime.powerState", "guest.toolsRunningStatus"])
    if not props:
        raise PermanentError(f"VM {moref} does not exist at {where(vcenter)}: sync the vCenter")
    name, state = props.get("name"), str(props.get("runtime.powerState"))
    label = f"VM {name!r} ({moref}) at {where(vcenter)}"
    if state == OFF:
        event = last_power_event(si, vm, ["VmPoweredOffEvent"])
        return ShutdownResult("already_off", _iso(event.createdTime) if event is not None else None, 0.0)
    how = "power_off"
    if state == ON and str(props.get("guest.toolsRunningStatus")) == TOOLS_RUNNING:
        check_stop(stop, f"before {label} was shut down")
        try:
            vm.ShutdownGuest()
            how = "guest"
            log.info("%s: guest shutdown asked", label)
        except vim.fault.ToolsUnavailable:
            log.info("%s: Tools unavailable for a guest shutdown; waiting for it to stop", label)
        except vim.fault.InvalidPowerState:
            pass  # went off meanwhile: the wait below sees it at once
    if state == ON and _wait_off(si, vm, timeout_seconds, stop, started):
        return _off_result(si, vm, "guest", started)  # by our ShutdownGuest, or by the guest itself
    if not force:
        still = "suspended" if state == SUSPENDED else f"still running {timeout_seconds:g} s later"
        raise PermanentError(
            f"{label} did not power off ({still}; VMware Tools "
            f"{'running' if how == 'guest' else 'not running'}): shut it down by hand, raise "
            "protected_vms.shutdown_timeout_seconds, or set options.force_power_off to true to power it off"
        )
    check_stop(stop, f"before {label} was powered off")
    log.info("%s: powering off (options.force_power_off)", label)
    try:
        wait_for_task(si, vm.PowerOffVM_Task(), stop)
    except vim.fault.InvalidPowerState:
        log.info("%s: powered off meanwhile", label)
    return _off_result(si, vm, "power_off", started)
