"""A recovery run's VMs at the DR vCenter: create (or adopt), power on, wait for Tools, destroy, find.

Identity is the pair of marks in extraConfig, ``zerfaux.recovery_run_id`` and
``zerfaux.protected_vm_id``, never the name. A creation is also a lock across processes: the VM's
``.vmx`` goes to a path of its own on the run's datastore, ``[<datastore>] <vm name>/<vm name>.vmx``,
so a second creator (a listener that lost its lease and its successor) gets ``FileAlreadyExists``
or ``DuplicateName``, finds the first one's VM by its marks and adopts it.

Every function takes a logged-in ``ServiceInstance``; ``recovery.RecoveryComputeReal`` runs them
on the shared session (threads of one process share it: pyVmomi's stub keeps a locked pool of
connections and opens another when every pooled one is busy, so a priority's VMs can be powered
on and waited for at once).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pyVmomi import vim, vmodl

from handlers.backends.vcenter.placement import computes, datacenters, network_backing, resource_pool, vm_folder
from handlers.backends.vcenter.query import Props, check_stop, collect, properties, wait_for_task
from handlers.backends.vcenter.session import name_list, where
from handlers.backends.vcenter.watch import watch
from handlers.backends.vcenter.shell import (
    MARK_KEY,
    RUN_MARK_KEY,
    controller_change,
    disk_change,
    moref_order,
    nic_change,
    vsphere_name,
)
from handlers.errors import PermanentError, TransientError
from handlers.recovery.backends import Placement, Readiness, RecoveryVMSpec, VMRef
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

AWAIT_SECONDS = 30.0  # for another creator's VM to show its marks
AWAIT_STEP = 0.5
TOOLS_RUNNING = "guestToolsRunning"
HEARTBEAT_GREEN = "green"
_READY_PATHS = ["guest.toolsRunningStatus", "summary.quickStats.guestHeartbeatStatus"]


def marks(props: Props) -> dict[str, str]:
    return {o.key: str(o.value) for o in props.get("config.extraConfig") or ()}


def run_vms(si: Any, run_id: str) -> list[tuple[Any, dict[str, str]]]:
    """(VM, its marks) of every VM carrying this run's mark, oldest first (one bulk read)."""
    found = [
        (obj, m)
        for obj, props in collect(si, vim.VirtualMachine, ["config.extraConfig"])
        if (m := marks(props)).get(RUN_MARK_KEY) == run_id
    ]
    return sorted(found, key=lambda row: moref_order(row[0]._moId))


def find_vm(si: Any, run_id: str, protected_vm_id: str) -> Any | None:
    """The oldest VM marked for this run and protected VM (the one every creator adopts)."""
    return next((obj for obj, m in run_vms(si, run_id) if m.get(MARK_KEY) == protected_vm_id), None)


def vmx_path(spec: RecoveryVMSpec) -> str:
    name = vsphere_name(spec.name)
    return f"[{spec.datastore}] {name}/{name}.vmx"


class Lookups:
    """What the VMs of one placement share, looked up once: the datacenter, datastore, pool, folder
    and NIC backings. A run creates many VMs in one place; without this each creation would repeat
    about fifteen reads (over a WAN, most of the step). Entries are tied to the session's stub, so
    a new login looks again, and ``forget`` drops them when vCenter no longer knows an object.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._guard = threading.Lock()

    def get(self, si: Any, key: tuple[Any, ...], make: Any) -> Any:
        with self._guard:
            hit = self._entries.get(key)
        if hit is not None and hit[0] is si._stub:
            return hit[1]
        value = make()
        with self._guard:
            self._entries[key] = (si._stub, value)
        return value

    def forget(self) -> None:
        with self._guard:
            self._entries.clear()


def build_config(si: Any, vcenter: VCenterEndpoint, dc: Props, datastore: Any, spec: RecoveryVMSpec,
                 lookups: Lookups | None = None) -> Any:
    """The ConfigSpec: one controller per kind the disks name, disks attached as they are, one NIC each."""
    changes: list[Any] = []
    slots: dict[str, tuple[int, list[int]]] = {}
    scsi_bus = 0
    for kind in dict.fromkeys(d.controller for d in spec.disks):
        is_scsi = kind in ("pvscsi", "lsilogic", "lsilogic-sas", "buslogic")
        change, key, units = controller_change(kind, -90 - len(slots), scsi_bus if is_scsi else 0)
        scsi_bus += is_scsi
        if change is not None:
            changes.append(change)
        slots[kind] = (key, units)
    for i, disk in enumerate(spec.disks):
        key, units = slots[disk.controller]
        if not units:
            raise PermanentError(
                f"VM {spec.name!r}: more disks on its {disk.controller} controller than it has slots: "
                "check vcenter_vms.disks (sync the vCenter)"
            )
        changes.append(disk_change(i, key, units.pop(0), disk.file, disk.capacity, datastore))
    for i, nic in enumerate(spec.nics):
        field = f"network_mappings (for {nic.source_network!r})"
        look = lookups or Lookups()
        backing = look.get(si, ("net", vcenter.id, dc.get("name"), nic.network),
                           lambda n=nic.network, f=field: network_backing(si, vcenter, n, dc, field=f))
        changes.append(nic_change(-300 - i, backing))
    return vim.vm.ConfigSpec(
        name=vsphere_name(spec.name),
        guestId=spec.guest_id,
        numCPUs=spec.num_cpu,
        memoryMB=spec.memory_mb,
        firmware=spec.firmware,
        annotation=f"Zerfaux recovery run {spec.run_id}, protected VM {spec.protected_vm_id}",
        files=vim.vm.FileInfo(vmPathName=vmx_path(spec)),
        extraConfig=[
            vim.option.OptionValue(key=RUN_MARK_KEY, value=spec.run_id),
            vim.option.OptionValue(key=MARK_KEY, value=spec.protected_vm_id),
        ],
        deviceChange=changes,
    )


def resolve(si: Any, vcenter: VCenterEndpoint, placement: Placement, datastore: str) -> tuple[Props, Any, Any, Any]:
    """The placement's names as objects: (datacenter, datastore, pool, folder)."""
    dc = next((p for p in datacenters(si) if p.get("name") == placement.datacenter), None)
    if dc is None:
        raise PermanentError(f"datacenter {placement.datacenter!r} no longer exists at {where(vcenter)}")
    found = [c for c in computes(si, dc) if c.name == placement.compute_resource]
    if not found:
        raise PermanentError(
            f"compute resource {placement.compute_resource!r} no longer exists at {where(vcenter)}: run again"
        )
    stores = collect(si, vim.Datastore, ["name"], root=dc["self"])
    ds = next((o for o, p in stores if p.get("name") == datastore), None)
    seen = ds is not None and found[0].seeing([ds._moId])
    if not seen:
        raise PermanentError(
            f"datastore {datastore!r} is not mounted on any connected host of {placement.compute_resource!r} at "
            f"{where(vcenter)}: present it first (step present_datastore)"
        )
    pool = resource_pool(si, vcenter, dc, found, placement.resource_pool)
    return dc, ds, pool, vm_folder(si, vcenter, placement.folder, dc)


def create_vm(si: Any, vcenter: VCenterEndpoint, placement: Placement, spec: RecoveryVMSpec,
              stop: threading.Event, await_seconds: float = AWAIT_SECONDS, lookups: Lookups | None = None) -> VMRef:
    # No read before the creation: the .vmx path is the lock (a second CreateVM_Task at it fails
    # with FileAlreadyExists and the VM is then found by its marks), and a read of every VM's
    # extraConfig per creation grew with the DR vCenter's inventory (bench/recovery.py).
    look = lookups or Lookups()
    try:
        return _create(si, vcenter, placement, spec, stop, await_seconds, look)
    except vmodl.fault.ManagedObjectNotFound:
        if lookups is None:
            raise
        log.info("%s: an object looked up earlier is gone; looking again", where(vcenter))
        look.forget()
        return _create(si, vcenter, placement, spec, stop, await_seconds, look)


def _create(si: Any, vcenter: VCenterEndpoint, placement: Placement, spec: RecoveryVMSpec,
            stop: threading.Event, await_seconds: float, look: Lookups) -> VMRef:
    dc, ds, pool, folder = look.get(si, ("place", vcenter.id, placement, spec.datastore),
                                    lambda: resolve(si, vcenter, placement, spec.datastore))
    config = build_config(si, vcenter, dc, ds, spec, look)
    check_stop(stop, f"before VM {spec.name} was created")
    log.info("%s: creating VM %s (%d disks, %d NICs) at %s", where(vcenter), spec.name, len(spec.disks),
             len(spec.nics), vmx_path(spec))
    try:
        vm = wait_for_task(si, folder.CreateVM_Task(config=config, pool=pool), stop)
    except (vim.fault.DuplicateName, vim.fault.FileAlreadyExists) as exc:
        log.info("%s: VM %s exists already (%s); looking for it by its marks", where(vcenter), spec.name,
                 type(exc).__name__)
        deadline = time.monotonic() + await_seconds
        while (found := find_vm(si, spec.run_id, spec.protected_vm_id)) is None and time.monotonic() < deadline:
            if stop.wait(AWAIT_STEP):
                check_stop(stop, f"while waiting for another listener's VM {spec.name}")
        if found is not None:
            return VMRef(moref=found._moId, adopted=True)
        raise PermanentError(
            f"{vmx_path(spec)} or a VM named {spec.name!r} exists at {where(vcenter)} without the marks "
            f"{RUN_MARK_KEY} = {spec.run_id} and {MARK_KEY} = {spec.protected_vm_id} ({type(exc).__name__}): "
            "remove that VM or folder, then resume the run"
        ) from exc
    # No second read for twins: vCenter and vcsim refuse a second VM at the same .vmx path
    # (FileAlreadyExists, above), so the path is the lock; find_run_vms would name a twin.
    return VMRef(moref=str(vm._moId), adopted=False)


def _vm(si: Any, moref: str) -> Any:
    return vim.VirtualMachine(moref, si._stub)


def power_on(si: Any, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
    vm = _vm(si, moref)
    state = str(properties(si, vm, ["runtime.powerState"]).get("runtime.powerState"))
    if state != "poweredOn":
        check_stop(stop, f"before VM {moref} was powered on")
        try:
            wait_for_task(si, vm.PowerOnVM_Task(), stop)
        except vim.fault.InvalidPowerState:
            log.info("%s: VM %s was powered on meanwhile", where(vcenter), moref)
    # vCenter sets the boot time with the power state; a moment late on a busy server at most.
    for _ in range(10):
        boot = properties(si, vm, ["summary.runtime.bootTime"]).get("summary.runtime.bootTime")
        if boot is not None:
            return str(boot.isoformat())
        if stop.wait(0.5):
            check_stop(stop, f"while reading VM {moref}'s boot time")
    raise TransientError(f"VM {moref} at {where(vcenter)} is powered on but reports no summary.runtime.bootTime yet")


def _readiness(values: Props) -> str | None:
    if str(values.get("guest.toolsRunningStatus")) == TOOLS_RUNNING:
        return "tools"
    if str(values.get("summary.quickStats.guestHeartbeatStatus")) == HEARTBEAT_GREEN:
        return "heartbeat"
    return None


def wait_ready(si: Any, moref: str, timeout_seconds: float, stop: threading.Event) -> Readiness:
    """A long poll (``WaitForUpdatesEx``) on the two properties, at most ``timeout_seconds``."""
    started = time.monotonic()
    if timeout_seconds <= 0:
        return Readiness(ready=False, how=None, waited_seconds=0.0)
    how = watch(si, _vm(si, moref), _READY_PATHS, timeout_seconds, stop, _readiness,
                f"VM {moref} to be ready", started)
    waited = round(time.monotonic() - started, 3)
    return Readiness(ready=how is not None, how=how, waited_seconds=waited)


def destroy_vm(si: Any, vcenter: VCenterEndpoint, moref: str, run_id: str, stop: threading.Event) -> bool:
    vm = _vm(si, moref)
    try:
        props = properties(si, vm, ["name", "config.extraConfig", "runtime.powerState", "config.hardware.device"])
    except vmodl.fault.ManagedObjectNotFound:
        return False
    if not props:
        return False
    if marks(props).get(RUN_MARK_KEY) != run_id:
        raise PermanentError(
            f"VM {props.get('name')!r} ({moref}) at {where(vcenter)} does not carry {RUN_MARK_KEY} = {run_id}: "
            "Zerfaux destroys only the VMs its run made; it was left alone"
        )
    try:
        if str(props.get("runtime.powerState")) != "poweredOff":
            check_stop(stop, f"before VM {moref} was powered off")
            try:
                wait_for_task(si, vm.PowerOffVM_Task(), stop)
            except vim.fault.InvalidPowerState:
                pass  # powered off meanwhile
        # Destroy_Task deletes every disk of the VM; these are the clone's (or, after a failover, the
        # replica's) files, never the VM's to delete: detach them first, as they are.
        disks = [d for d in props.get("config.hardware.device") or () if isinstance(d, vim.vm.device.VirtualDisk)]
        if disks:
            remove = vim.vm.device.VirtualDeviceSpec.Operation.remove
            detach = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation=remove, device=d)
                                                     for d in disks])
            check_stop(stop, f"before VM {moref}'s disks were detached")
            wait_for_task(si, vm.ReconfigVM_Task(spec=detach), stop)
        check_stop(stop, f"before VM {moref} was destroyed")
        log.info("%s: destroying VM %s (%s) of run %s", where(vcenter), props.get("name"), moref, run_id)
        wait_for_task(si, vm.Destroy_Task(), stop)
    except vmodl.fault.ManagedObjectNotFound:
        return False  # destroyed by another attempt meanwhile
    return True


def find_run_vms(si: Any, vcenter: VCenterEndpoint, run_id: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for obj, m in run_vms(si, run_id):
        pv = m.get(MARK_KEY, "")
        if pv in found:
            log.warning("%s: VMs %s carry run %s's mark for protected VM %s; cleanup takes the oldest",
                        where(vcenter), name_list([found[pv], obj._moId]), run_id, pv)
            continue
        found[pv] = obj._moId
    return found
