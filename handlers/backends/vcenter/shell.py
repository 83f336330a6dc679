"""``DRShellBuilderReal``: a powered-off VM at the DR vCenter whose disks are the replicated VMDKs.

The shell carries ``zerfaux.protected_vm_id`` in its extraConfig. That mark, not the name, is its
identity: a second run (a retry after a crash between CreateVM and the row update, a flag
flipped twice) finds the marked VM and adopts it instead of creating a twin, even if somebody
renamed it. The disks are attached with no ``fileOperation``: they already exist (the ZFS replica)
and must never be created or destroyed here.

The shell's own files (.vmx, nvram, logs) go to the target's placeholder datastore, which no
replica backs; only its disks point into ``dr_datastore``, attached as they are. So creating or
adopting a shell writes nothing into a replica, and the next incremental receive still applies.

Creation is safe across processes (a listener that lost its lease and its successor may both
try): the shell's configuration goes to a path of its own, ``[placeholder_datastore]
zerfaux-<protected_vm_id>/<name>.vmx``, so only one ``CreateVM_Task`` can succeed; the other gets
``FileAlreadyExists`` (or ``DuplicateName`` for the name in the folder), finds the winner's VM
by its mark and adopts it. After a creation the mark is read again, and twins a server let
through are settled (``_settle``). docs/reliability.md tells the whole argument.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from handlers.backends.vcenter.placement import (
    by_visibility,
    computes,
    datacenters,
    network_backing,
    resource_pool,
    vm_folder,
)
from handlers.backends.vcenter.query import Props, check_stop, collect, properties, wait_for_task
from handlers.backends.vcenter.session import VCenterSessions, name_list, where
from handlers.dr_shell import ShellResult, ShellSpec, config_datastore
from handlers.errors import PermanentError
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

MARK_KEY = "zerfaux.protected_vm_id"
# A recovery run's VMs carry MARK_KEY too, beside this one: they are never a DR shell (module recovery_vm).
RUN_MARK_KEY = "zerfaux.recovery_run_id"
_dev = vim.vm.device
CONTROLLERS: dict[str, tuple[type, list[int]]] = {
    # SCSI unit 7 is the controller itself.
    "pvscsi": (_dev.ParaVirtualSCSIController, [u for u in range(16) if u != 7]),
    "lsilogic": (_dev.VirtualLsiLogicController, [u for u in range(16) if u != 7]),
    "lsilogic-sas": (_dev.VirtualLsiLogicSASController, [u for u in range(16) if u != 7]),
    "buslogic": (_dev.VirtualBusLogicController, [u for u in range(16) if u != 7]),
    "nvme": (_dev.VirtualNVMEController, list(range(15))),
    "sata": (_dev.VirtualAHCIController, list(range(30))),
    "ide": (_dev.VirtualIDEController, [0, 1]),
}
_NOT_AN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROLLER_KEY = -100  # negative keys name devices that do not exist yet, within one spec
_IDE0_KEY = 200
_MOREF_NUMBER = re.compile(r"-(\d+)$")
_TWIN_PATHS = ("name", "config.annotation", "runtime.powerState", "config.hardware.device")
AWAIT_SECONDS = 30.0  # for another listener's creation to show its mark
AWAIT_STEP = 0.5
SLOTS = 5  # directories tried in turn when an earlier one holds a .vmx with no VM


@dataclass(frozen=True)
class Placement:
    datastore: Any  # the disks' (dr_datastore)
    pool: Any
    folder: Any
    network: Any | None  # a backing for the network card, or None for no card


def shell_dir(spec: ShellSpec, slot: int = 1) -> str:
    """The shell's own directory on the placeholder datastore, per protected VM: the creation lock.

    ``slot`` 2, 3... are the next ones, used only when the earlier ones hold a ``.vmx`` that no
    VM carries (a failed creation, a shell removed from the inventory). Every creator walks the
    same sequence, so each directory is still a lock.
    """
    base = f"zerfaux-{spec.protected_vm_id}"
    return base if slot == 1 else f"{base}-{slot}"


def shell_vmx_path(spec: ShellSpec, slot: int = 1) -> str:
    return f"[{config_datastore(spec)}] {shell_dir(spec, slot)}/{vsphere_name(spec.name)}.vmx"


def moref_order(moref: str) -> tuple[int, int, str]:
    """``vm-9`` before ``vm-10``: vCenter numbers objects in the order it made them."""
    match = _MOREF_NUMBER.search(moref)
    return (0, int(match.group(1)), moref) if match else (1, 0, moref)


def twin_refusal(props: Props, protected_vm_id: str, own_disks: set[str]) -> str | None:
    """Why a second VM marked for this protected VM must not be unregistered; None when it may."""
    if not str(props.get("config.annotation") or "").startswith(annotation(protected_vm_id)):
        return "not annotated as Zerfaux's DR shell"
    if str(props.get("runtime.powerState")) != "poweredOff":
        return f"power state {props.get('runtime.powerState')}"
    foreign = [
        str(getattr(d.backing, "fileName", "") or "")
        for d in props.get("config.hardware.device") or ()
        if isinstance(d, vim.vm.device.VirtualDisk)
        and str(getattr(d.backing, "fileName", "") or "") not in own_disks
    ]
    return f"disk {foreign[0]} is not one of the replica's" if foreign else None


def annotation(protected_vm_id: str) -> str:
    return f"Zerfaux DR shell of protected VM {protected_vm_id}"


def find_marked(si: Any, protected_vm_id: str) -> list[tuple[Any, Props]]:
    """DR shells carrying this protected VM's mark (one bulk read of every VM).

    A test or recovery VM of a run carries the same mark and ``RUN_MARK_KEY``: it is left out,
    so a DR shell job during a test neither adopts it nor takes it for a twin to remove.
    """
    found = []
    for obj, props in collect(si, vim.VirtualMachine, ["name", "config.extraConfig"]):
        marks = {o.key: str(o.value) for o in props.get("config.extraConfig") or ()}
        if marks.get(MARK_KEY) == protected_vm_id and RUN_MARK_KEY not in marks:
            found.append((obj, props))
    return found


class DRShellBuilderReal:
    def __init__(self, sessions: VCenterSessions, await_seconds: float = AWAIT_SECONDS) -> None:
        self._sessions = sessions
        self._await_seconds = await_seconds
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def ensure_shell(
        self, vcenter: VCenterEndpoint, spec: ShellSpec, stop: threading.Event | None = None
    ) -> ShellResult:
        # Across processes the shell's configuration path is the lock (module docstring); this
        # lock only spares threads of one process the round trips of losing that race.
        with self._guard:
            lock = self._locks.setdefault((vcenter.id, spec.protected_vm_id), threading.Lock())
        with lock:
            return self._sessions.run(vcenter, lambda si: self._ensure(si, vcenter, spec, stop))

    def _ensure(self, si: Any, vcenter: VCenterEndpoint, spec: ShellSpec, stop: threading.Event | None) -> ShellResult:
        keeper = self._settle(si, vcenter, spec, find_marked(si, spec.protected_vm_id), stop)
        if keeper is not None:
            log.debug("%s: adopting DR shell %s", where(vcenter), keeper)
            return self._result(si, keeper, adopted=True)
        config_datastore(spec)  # refuse before any lookup when there is nowhere to put the files
        place = self._placement(si, vcenter, spec)
        leftovers: list[str] = []
        for slot in range(1, SLOTS + 1):
            config = build_config(spec, place, slot)
            log.info(
                "%s: creating DR shell %s with %d disks at %s",
                where(vcenter), spec.name, len(spec.disks), shell_vmx_path(spec, slot),
            )
            check_stop(stop, "before the DR shell was created")
            try:
                vm = wait_for_task(si, place.folder.CreateVM_Task(config=config, pool=place.pool), stop)
            except (vim.fault.DuplicateName, vim.fault.FileAlreadyExists) as exc:
                # Another listener (a fenced one, or its successor) may have got there first: adopt its VM.
                log.info("%s: DR shell %s exists already (%s); looking for it by its mark",
                         where(vcenter), spec.name, type(exc).__name__)
                keeper = self._await_mark(si, vcenter, spec, stop)
                if keeper is not None:
                    return self._result(si, keeper, adopted=True)
                if isinstance(exc, vim.fault.DuplicateName):
                    raise PermanentError(
                        f"a VM named {spec.name!r} already exists in the DR shell's folder at {where(vcenter)} "
                        f"and is not the DR shell of protected VM {spec.protected_vm_id} (it has no {MARK_KEY} "
                        "mark): rename that VM, or change protection_groups.dr_vm_suffix or dr_folder"
                    ) from exc
                leftovers.append(shell_vmx_path(spec, slot))
                log.info("%s: %s is left over with no VM; trying the next directory", where(vcenter), leftovers[-1])
                continue
            # A server that checks neither name nor path would have let a twin through: settle now.
            keeper = self._settle(si, vcenter, spec, find_marked(si, spec.protected_vm_id), stop) or vm._moId
            return self._result(si, keeper, adopted=keeper != vm._moId)
        raise PermanentError(
            f"{name_list(leftovers)} exist at {where(vcenter)} but no VM there carries the mark {MARK_KEY} = "
            f"{spec.protected_vm_id}: DR shells removed from the inventory (or creations that failed) left them. "
            f"Register one of those .vmx files again, or delete the folders {shell_dir(spec)!r}... from datastore "
            f"{config_datastore(spec)!r}; then set needs_dr_shell again"
        )

    def _result(self, si: Any, moref: str, adopted: bool) -> ShellResult:
        """The shell's moref and where vSphere keeps its .vmx (read back, not assumed)."""
        vm = vim.VirtualMachine(moref, si._stub)
        path = properties(si, vm, ["config.files.vmPathName"]).get("config.files.vmPathName")
        return ShellResult(moref=moref, adopted=adopted, config_path=str(path) if path else None)

    def _await_mark(
        self, si: Any, vcenter: VCenterEndpoint, spec: ShellSpec, stop: threading.Event | None
    ) -> str | None:
        """The moref of the shell another creator made, once its mark shows, or None.

        The other creation may still be running (its files exist before the VM is listed with
        its configuration), so the mark is looked for during ``await_seconds``.
        """
        deadline = time.monotonic() + self._await_seconds
        while True:
            keeper = self._settle(si, vcenter, spec, find_marked(si, spec.protected_vm_id), stop)
            if keeper is not None or time.monotonic() >= deadline:
                return keeper
            if stop is None:
                time.sleep(AWAIT_STEP)
            elif stop.wait(AWAIT_STEP):
                check_stop(stop, "while waiting for another listener's DR shell")

    def _settle(
        self,
        si: Any,
        vcenter: VCenterEndpoint,
        spec: ShellSpec,
        marked: list[tuple[Any, Props]],
        stop: threading.Event | None,
    ) -> str | None:
        """The one shell to keep among VMs marked for this protected VM (None when there is none).

        Twins come only from a server that refused neither the second name nor the second
        path, or from versions before the path lock. The keeper is the oldest (lowest moref),
        the same for every listener that looks. An extra is removed from the inventory, never
        destroyed (``Destroy_Task`` deletes the VM's directory, and a DR shell's disks are the
        replica's files), and only when it is plainly a twin: Zerfaux's annotation with this
        mark, powered off, no disk but this shell's replica disks. Anything else stops in words.
        """
        if len(marked) <= 1:
            return marked[0][0]._moId if marked else None
        ordered = sorted(marked, key=lambda row: moref_order(row[0]._moId))
        keeper, extras = ordered[0][0], [obj for obj, _ in ordered[1:]]
        own_disks = {d.file for d in spec.disks}
        refusals = []
        for obj in extras:
            why = twin_refusal(properties(si, obj, _TWIN_PATHS), spec.protected_vm_id, own_disks)
            if why:
                refusals.append(f"{obj._moId} ({why})")
        if refusals:
            names = [f"{p.get('name')} ({o._moId})" for o, p in ordered]
            raise PermanentError(
                f"{len(marked)} VMs at {where(vcenter)} are marked as the DR shell of protected VM "
                f"{spec.protected_vm_id}: {name_list(names)}; Zerfaux keeps {keeper._moId} and removes a "
                f"twin only when it is powered off with no disks but the replica's, not {', '.join(refusals)}: "
                "delete all but one"
            )
        for obj in extras:
            check_stop(stop, "before a twin DR shell was removed from the inventory")
            log.info("%s: removing twin DR shell %s of protected VM %s from the inventory (files kept); keeping %s",
                     where(vcenter), obj._moId, spec.protected_vm_id, keeper._moId)
            obj.UnregisterVM()
        return str(keeper._moId)

    def _placement(self, si: Any, vcenter: VCenterEndpoint, spec: ShellSpec) -> Placement:
        datastores = collect(si, vim.Datastore, ["name"])
        found: dict[str, Any] = {}
        for column, name in (("dr_datastore", spec.datastore), ("placeholder_datastore", config_datastore(spec))):
            hit = next((o for o, p in datastores if p.get("name") == name), None)
            if hit is None:
                raise PermanentError(
                    f"datastore {name!r} does not exist at {where(vcenter)}: fix "
                    f"replication_targets.{column}; datastores there: "
                    f"{name_list(sorted({str(p.get('name')) for _, p in datastores}))}"
                )
            found[column] = hit
        ds, placeholder = found["dr_datastore"], found["placeholder_datastore"]
        dc = next((p for p in datacenters(si) if any(r._moId == ds._moId for r in p.get("datastore") or ())), None)
        if dc is None:
            raise PermanentError(f"datastore {spec.datastore!r} at {where(vcenter)} belongs to no datacenter")
        if not any(r._moId == placeholder._moId for r in dc.get("datastore") or ()):
            raise PermanentError(
                f"placeholder datastore {config_datastore(spec)!r} is not in datacenter {dc.get('name')!r} of "
                f"{spec.datastore!r} at {where(vcenter)}: fix replication_targets.placeholder_datastore"
            )
        found_computes = computes(si, dc)
        if not found_computes:
            raise PermanentError(
                f"datacenter {dc.get('name')!r} at {where(vcenter)} has no cluster or host to run a VM"
            )
        # Only where a host mounts both the disks' and the configuration's datastore (module placement).
        needed = {spec.datastore: ds, config_datastore(spec): placeholder}
        eligible = by_visibility(vcenter, dc, found_computes, needed, spec.cluster)
        log.debug("%s: DR shell %s goes to %s", where(vcenter), spec.name, eligible[0].name)
        return Placement(
            datastore=ds,
            pool=resource_pool(si, vcenter, dc, eligible, spec.resource_pool),
            folder=vm_folder(si, vcenter, spec.folder, dc),
            network=network_backing(si, vcenter, spec.network, dc) if spec.network else None,
        )


def vsphere_name(name: str) -> str:
    """A name as vSphere wants it in a ConfigSpec: '%' that starts no escape, '/' and '\\' escaped.

    vCenter itself lists names that way ('a/b' is 'a%2fb'), so a name read by the inventory
    sync passes through unchanged, and a raw '/' typed into a row is not taken for a path
    (vcsim drops the connection on one, which would look like an outage and be retried).
    """
    return _NOT_AN_ESCAPE.sub("%25", name).replace("/", "%2f").replace("\\", "%5c")


def controller_change(kind: str, key: int, bus: int = 0) -> tuple[Any | None, int, list[int]]:
    """The device change adding a ``kind`` controller (None for IDE), the key disks use, its free units.

    Every VM gets its two IDE controllers (keys 200 and 201) from vSphere itself; a third cannot
    be added, so IDE disks go on the first of those.
    """
    if kind not in CONTROLLERS:
        raise PermanentError(
            f"disk controller {kind!r} is not one of {', '.join(CONTROLLERS)}: fix the VM's disks in vcenter_vms"
        )
    cls, units = CONTROLLERS[kind]
    if kind == "ide":
        return None, _IDE0_KEY, list(units)
    controller = cls(key=key, busNumber=bus)
    if isinstance(controller, _dev.VirtualSCSIController):
        controller.sharedBus = _dev.VirtualSCSIController.Sharing.noSharing
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    return vim.vm.device.VirtualDeviceSpec(operation=add, device=controller), key, list(units)


def disk_change(index: int, controller_key: int, unit: int, file: str, capacity: int, datastore: Any) -> Any:
    """Attach the existing disk ``file``: no ``fileOperation``, so it is never created or replaced."""
    backing = _dev.VirtualDisk.FlatVer2BackingInfo(fileName=file, diskMode="persistent", datastore=datastore)
    # Capacity is left out when unknown: vSphere then reads it from the existing descriptor.
    sizes = {"capacityInBytes": capacity, "capacityInKB": capacity // 1024} if capacity > 0 else {}
    disk = _dev.VirtualDisk(key=-(101 + index), controllerKey=controller_key, unitNumber=unit, backing=backing, **sizes)
    return vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.add, device=disk)


def nic_change(key: int, backing: Any) -> Any:
    nic = _dev.VirtualVmxnet3(
        key=key,
        backing=backing,
        addressType="generated",
        connectable=_dev.VirtualDevice.ConnectInfo(startConnected=True, allowGuestControl=True, connected=False),
    )
    return vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.add, device=nic)


def build_config(spec: ShellSpec, place: Placement, slot: int = 1) -> Any:
    controller, controller_key, units = controller_change(spec.controller, _CONTROLLER_KEY)
    if len(spec.disks) > len(units):
        raise PermanentError(
            f"{len(spec.disks)} disks do not fit on one {spec.controller} controller ({len(units)} slots): "
            "check vcenter_vms.disks (sync the vCenter)"
        )
    changes = [controller] if controller is not None else []
    changes += [
        disk_change(i, controller_key, unit, disk.file, disk.capacity, place.datastore)
        for i, (disk, unit) in enumerate(zip(spec.disks, units))
    ]
    if place.network is not None:
        changes.append(nic_change(-300, place.network))
    return vim.vm.ConfigSpec(
        name=vsphere_name(spec.name),
        guestId=spec.guest_id,
        numCPUs=spec.num_cpu,
        memoryMB=spec.memory_mb,
        firmware=spec.firmware,
        annotation=annotation(spec.protected_vm_id),
        # A path of the shell's own (not "[ds]", which lets vSphere pick a free directory): a
        # second creator gets FileAlreadyExists, so two listeners cannot both make a shell.
        files=vim.vm.FileInfo(vmPathName=shell_vmx_path(spec, slot)),
        extraConfig=[vim.option.OptionValue(key=MARK_KEY, value=spec.protected_vm_id)],
        deviceChange=changes,
    )
