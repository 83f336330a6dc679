"""A DR shell's devices at a failover: existing disks attached and detached as they are, NICs re-pointed.

Each function reads the VM once, decides every change, checks ``stop``, and makes one
``ReconfigVM_Task``: a second call finds the changes made and does nothing. Disks are attached
and removed with no ``fileOperation``: the replica's files are never created, replaced or
deleted here (a removed disk stays on the datastore). Only VMs carrying Zerfaux's
``zerfaux.protected_vm_id`` mark (DR shells, recovery VMs) have their disks touched.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from pyVmomi import vim

from handlers.backends.vcenter.placement import datacenters, network_backing
from handlers.backends.vcenter.query import Props, check_stop, properties, wait_for_task
from handlers.backends.vcenter.session import name_list, where
from handlers.backends.vcenter.shell import CONTROLLERS, MARK_KEY, controller_change, disk_change, nic_change
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic
from handlers.recovery.failover_backends import AttachResult, NicChange

log = logging.getLogger(__name__)

_dev = vim.vm.device
_Op = vim.vm.device.VirtualDeviceSpec.Operation
_PATHS = ["name", "config.extraConfig", "config.hardware.device", "runtime.host", "runtime.powerState"]
_NET_PATHS = [*_PATHS, "parent"]
_DS_PATH = re.compile(r"^\[([^\]]+)\]\s*(.+)$")
_SCSI = ("pvscsi", "lsilogic", "lsilogic-sas", "buslogic")


def _norm(file: str) -> str:
    """``[ds]  dir/disk.vmdk`` and ``[ds] dir/disk.vmdk`` are one file."""
    hit = _DS_PATH.match(file.strip())
    return f"[{hit.group(1)}] {hit.group(2).strip()}" if hit else file.strip()


def _read(si: Any, vcenter: Any, moref: str, doing: str, marked: bool = True,
          paths: Sequence[str] = _PATHS) -> tuple[Any, Props, str]:
    vm = vim.VirtualMachine(moref, si._stub)
    props = properties(si, vm, paths)
    if not props:
        raise PermanentError(f"VM {moref} does not exist at {where(vcenter)}: sync the vCenter and build its DR shell")
    label = f"VM {props.get('name')!r} ({moref}) at {where(vcenter)}"
    if marked and not any(o.key == MARK_KEY for o in props.get("config.extraConfig") or ()):
        raise PermanentError(f"{label} does not carry {MARK_KEY}: it is not a DR shell Zerfaux made, so its disks "
                             f"are not {doing} (check protected_vms' DR shell moref)")
    return vm, props, label


def _devices(props: Props) -> list[Any]:
    return list(props.get("config.hardware.device") or ())


def _kind(device: Any) -> str | None:
    for kind, (cls, _) in CONTROLLERS.items():
        if type(device) is cls:  # exact: the SCSI kinds share a base class
            return kind
    return None


def _host_datastores(si: Any, host: Any) -> dict[str, Any]:
    refs = properties(si, host, ["datastore"]).get("datastore") or []
    return {str(properties(si, ds, ["name"]).get("name")): ds for ds in refs}


def attach(si: Any, vcenter: Any, moref: str, disks: Sequence[RecoveryDisk], stop: threading.Event) -> AttachResult:
    vm, props, label = _read(si, vcenter, moref, "attached")
    devices = _devices(props)
    present = {_norm(str(getattr(d.backing, "fileName", None))) for d in devices
               if isinstance(d, _dev.VirtualDisk) and getattr(d.backing, "fileName", None)}
    todo = [d for d in dict.fromkeys(disks) if _norm(d.file) not in present]
    already = tuple(d.file for d in disks if _norm(d.file) in present)
    if not todo:
        return AttachResult(attached=(), already=already)
    # Every datastore the disks name must be mounted on the shell's host: refuse before any change.
    host = props.get("runtime.host")
    mounted = _host_datastores(si, host) if host is not None else {}
    stores: dict[str, Any] = {}
    for disk in todo:
        hit = _DS_PATH.match(disk.file.strip())
        if hit is None:
            raise PermanentError(f"disk file {disk.file!r} is not a datastore path '[datastore] dir/disk.vmdk': "
                                 "fix vcenter_vms.disks")
        name = hit.group(1)
        if name not in mounted:
            raise PermanentError(
                f"datastore {name!r} of {disk.file} is not mounted on {label}'s host: present the replica first "
                f"(replication_targets.dr_datastore); that host mounts {name_list(sorted(mounted))}")
        stores[disk.file] = mounted[name]
    changes = _disk_changes(devices, todo, stores, label)
    check_stop(stop, f"before disks were attached to {label}")
    log.info("%s: attaching %s", label, name_list([d.file for d in todo]))
    wait_for_task(si, vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)), stop)
    return AttachResult(attached=tuple(d.file for d in todo), already=already)


def _disk_changes(devices: list[Any], todo: Sequence[RecoveryDisk], stores: dict[str, Any], label: str) -> list[Any]:
    """Disk changes onto free units of the shell's controllers, adding a controller where none is free."""
    used: dict[int, set[int]] = {}
    for d in devices:
        if getattr(d, "controllerKey", None) is not None and d.unitNumber is not None:
            used.setdefault(d.controllerKey, set()).add(d.unitNumber)
    free: dict[str, list[tuple[int, list[int]]]] = {}
    scsi_buses = set()
    for d in devices:
        kind = _kind(d)
        if kind is None:
            continue
        if kind in _SCSI:
            scsi_buses.add(d.busNumber)
        units = [u for u in CONTROLLERS[kind][1] if u not in used.get(d.key, set())]
        free.setdefault(kind, []).append((d.key, units))
    changes: list[Any] = []
    for i, disk in enumerate(todo):
        slots = [s for s in free.get(disk.controller, []) if s[1]]
        if not slots:
            bus = min(set(range(4)) - scsi_buses, default=None) if disk.controller in _SCSI else 0
            if bus is None:
                raise PermanentError(f"{label} has no free SCSI bus for another {disk.controller} controller")
            change, key, units = controller_change(disk.controller, -1000 - i, bus)
            if change is not None:
                changes.append(change)
                scsi_buses.add(bus)
            free.setdefault(disk.controller, []).append((key, [u for u in units if u not in used.get(key, set())]))
            slots = [s for s in free[disk.controller] if s[1]]
            if not slots:
                raise PermanentError(f"{label}: no free unit on its {disk.controller} controllers for {disk.file}")
        key, units = slots[0]
        changes.append(disk_change(i, key, units.pop(0), disk.file, disk.capacity, stores[disk.file]))
    return changes


def detach(si: Any, vcenter: Any, moref: str, stop: threading.Event) -> tuple[str, ...]:
    vm, props, label = _read(si, vcenter, moref, "detached")
    disks = [d for d in _devices(props) if isinstance(d, _dev.VirtualDisk)]
    if not disks:
        return ()
    if str(props.get("runtime.powerState")) != "poweredOff":
        raise PermanentError(f"{label} is {props.get('runtime.powerState')}: power it off before its disks are "
                             "detached")
    # No fileOperation: 'destroy' would delete the replica's files; unset, they stay on the datastore.
    changes = [vim.vm.device.VirtualDeviceSpec(operation=_Op.remove, device=d) for d in disks]
    files = tuple(str(getattr(d.backing, "fileName", "")) for d in disks)
    check_stop(stop, f"before disks were detached from {label}")
    log.info("%s: detaching %s (files kept)", label, name_list(list(files)))
    wait_for_task(si, vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)), stop)
    return files


# ---- networks --------------------------------------------------------------------------------------


# Datacenters and networks change rarely and a failover asks the same for every VM: each answer is
# kept on the session for a short while. A stale network reference fails the reconfigure with
# vCenter's own fault, so a cached answer can cost an attempt, never a wrong NIC.
MEMO_SECONDS = 60.0


def _memo(si: Any, key: Any, make: Any) -> Any:
    memo = getattr(si, "memo", None)
    return make() if memo is None else memo(key, MEMO_SECONDS, make)  # a plain ServiceInstance: no cache


def _datacenter(si: Any, vcenter: Any, vm: Any, props: Props) -> Props:
    """The datacenter holding the VM, by its folder chain (or its host's, for a VM in a vApp)."""
    by_id = {d["self"]._moId: d for d in _memo(si, ("datacenters",), lambda: datacenters(si))}
    start = props.get("parent") or props.get("runtime.host")
    if start is None:
        raise PermanentError(f"the datacenter of VM {vm._moId} at {where(vcenter)} cannot be found")

    def walk() -> Props:
        obj = start
        for _ in range(64):  # folders nest, but not forever
            if obj is None:
                break
            if obj._moId in by_id:
                return by_id[obj._moId]
            obj = properties(si, obj, ["parent"]).get("parent")
        raise PermanentError(f"the datacenter of VM {vm._moId} at {where(vcenter)} cannot be found")

    return _memo(si, ("datacenter-of", type(start).__name__, start._moId), walk)


def _same(current: Any, wanted: Any) -> bool:
    if isinstance(current, _dev.VirtualEthernetCard.NetworkBackingInfo) and \
            isinstance(wanted, _dev.VirtualEthernetCard.NetworkBackingInfo):
        return bool(current.deviceName == wanted.deviceName)
    if isinstance(current, _dev.VirtualEthernetCard.DistributedVirtualPortBackingInfo) and \
            isinstance(wanted, _dev.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        return bool(current.port.portgroupKey == wanted.port.portgroupKey
                    and current.port.switchUuid == wanted.port.switchUuid)
    return False


def set_networks(si: Any, vcenter: Any, moref: str, nics: Sequence[RecoveryNic],
                 stop: threading.Event) -> tuple[NicChange, ...]:
    vm, props, label = _read(si, vcenter, moref, "changed", marked=False, paths=_NET_PATHS)
    dc = _datacenter(si, vcenter, vm, props)

    def backing(nic: RecoveryNic) -> Any:
        return _memo(si, ("network", dc["self"]._moId, nic.network), lambda: network_backing(
            si, vcenter, nic.network, dc, field=f"network_mappings.recovery_network (for {nic.source_network!r})"))

    # A cached backing is shared by VMs' specs: only read (serialized), never changed.
    backings = [backing(n) for n in nics]
    cards = sorted((d for d in _devices(props) if isinstance(d, _dev.VirtualEthernetCard)), key=lambda d: d.key)
    changes, result = [], []
    for i, (nic, backing) in enumerate(zip(nics, backings)):
        if i < len(cards):
            card = cards[i]
            done = _same(card.backing, backing)
            if not done:
                card.backing = backing
                changes.append(vim.vm.device.VirtualDeviceSpec(operation=_Op.edit, device=card))
            result.append(NicChange(card.key, nic.source_network, nic.network, changed=not done))
        else:
            changes.append(nic_change(-300 - i, backing))
            result.append(NicChange(-300 - i, nic.source_network, nic.network, changed=True))
    if changes:
        check_stop(stop, f"before {label}'s NICs were moved")
        log.info("%s: NICs onto %s", label, name_list([n.network for n in nics]))
        wait_for_task(si, vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=changes)), stop)
    return tuple(result)
