"""``DRShellBuilderReal``: a powered-off VM at the DR vCenter whose disks are the replicated VMDKs.

The shell carries ``zerfaux.protected_vm_id`` in its extraConfig. That mark, not the name, is its
identity: a second run (a retry after a crash between CreateVM and the row update, a flag
flipped twice) finds the marked VM and adopts it instead of creating a twin, even if somebody
renamed it. The disks are attached with no ``fileOperation``: they already exist (the ZFS replica)
and must never be created or destroyed here.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from handlers.backends.vcenter.query import Props, collect, properties, wait_for_task
from handlers.backends.vcenter.session import VCenterSessions, name_list, where
from handlers.dr_shell import ShellResult, ShellSpec
from handlers.errors import PermanentError
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

MARK_KEY = "zerfaux.protected_vm_id"
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


@dataclass(frozen=True)
class Placement:
    datastore: Any
    pool: Any
    folder: Any
    network: Any | None  # a backing for the network card, or None for no card


def find_marked(si: Any, protected_vm_id: str) -> list[tuple[Any, Props]]:
    """VMs whose extraConfig carries this protected VM's mark (one bulk read of every VM)."""
    found = []
    for obj, props in collect(si, vim.VirtualMachine, ["name", "config.extraConfig"]):
        for option in props.get("config.extraConfig") or ():
            if option.key == MARK_KEY and str(option.value) == protected_vm_id:
                found.append((obj, props))
    return found


class DRShellBuilderReal:
    def __init__(self, sessions: VCenterSessions) -> None:
        self._sessions = sessions
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def ensure_shell(self, vcenter: VCenterEndpoint, spec: ShellSpec) -> ShellResult:
        # The dispatcher runs one operation per subject; this lock also covers direct callers.
        with self._guard:
            lock = self._locks.setdefault((vcenter.id, spec.protected_vm_id), threading.Lock())
        with lock:
            return self._sessions.run(vcenter, lambda si: self._ensure(si, vcenter, spec))

    def _ensure(self, si: Any, vcenter: VCenterEndpoint, spec: ShellSpec) -> ShellResult:
        marked = find_marked(si, spec.protected_vm_id)
        if len(marked) > 1:
            twins = [f"{p.get('name')} ({o._moId})" for o, p in marked]
            raise PermanentError(
                f"{len(marked)} VMs at {where(vcenter)} are marked as the DR shell of protected VM "
                f"{spec.protected_vm_id}: {name_list(twins)}; delete all but one"
            )
        if marked:
            obj, props = marked[0]
            log.debug("%s: adopting DR shell %s (%s)", where(vcenter), props.get("name"), obj._moId)
            return ShellResult(moref=obj._moId, adopted=True)
        place = self._placement(si, vcenter, spec)
        config = build_config(spec, place)
        log.info(
            "%s: creating DR shell %s with %d disks on %s",
            where(vcenter), spec.name, len(spec.disks), spec.datastore,
        )
        vm = wait_for_task(si, place.folder.CreateVM_Task(config=config, pool=place.pool))
        return ShellResult(moref=vm._moId, adopted=False)

    def _placement(self, si: Any, vcenter: VCenterEndpoint, spec: ShellSpec) -> Placement:
        datastores = collect(si, vim.Datastore, ["name"])
        ds = next((o for o, p in datastores if p.get("name") == spec.datastore), None)
        if ds is None:
            raise PermanentError(
                f"datastore {spec.datastore!r} does not exist at {where(vcenter)}: fix "
                "replication_targets.dr_datastore; datastores there: "
                f"{name_list(sorted({str(p.get('name')) for _, p in datastores}))}"
            )
        dcs = collect(si, vim.Datacenter, ["name", "datastore", "vmFolder", "hostFolder"])
        dc = next(
            ({**p, "self": o} for o, p in dcs if any(r._moId == ds._moId for r in p.get("datastore") or ())),
            None,
        )
        if dc is None:
            raise PermanentError(f"datastore {spec.datastore!r} at {where(vcenter)} belongs to no datacenter")
        return Placement(
            datastore=ds,
            pool=_pool(si, vcenter, spec, dc),
            folder=_folder(si, vcenter, spec, dc),
            network=_network_backing(si, vcenter, spec.network, dc) if spec.network else None,
        )


def _pool(si: Any, vcenter: VCenterEndpoint, spec: ShellSpec, dc: Props) -> Any:
    computes = collect(si, vim.ComputeResource, ["name", "resourcePool"], root=dc["hostFolder"])
    if spec.resource_pool:
        pools = collect(si, vim.ResourcePool, ["name", "owner"], root=dc["hostFolder"])
        owners = {o._moId: p.get("name") for o, p in computes}
        hits = [
            o
            for o, p in pools
            if p.get("name") == spec.resource_pool
            and (not spec.cluster or owners.get(p["owner"]._moId) == spec.cluster)
        ]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise PermanentError(
                f"{len(hits)} resource pools are named {spec.resource_pool!r} at {where(vcenter)}: "
                "set protection_groups.dr_cluster to say which cluster's pool to use"
            )
        names = sorted({f"{p.get('name')} ({owners.get(p['owner']._moId)})" for _, p in pools})
        raise PermanentError(
            f"resource pool {spec.resource_pool!r} does not exist at {where(vcenter)} in datacenter "
            f"{dc.get('name')!r}: fix protection_groups.dr_resource_pool; pools there: {name_list(names)}"
        )
    # Clusters before standalone hosts, each by name, so "the first" is stable between runs.
    ordered = sorted(
        computes, key=lambda r: (not isinstance(r[0], vim.ClusterComputeResource), str(r[1].get("name")))
    )
    if spec.cluster:
        ordered = [r for r in ordered if r[1].get("name") == spec.cluster]
        if not ordered:
            names = sorted(str(p.get("name")) for _, p in computes)
            raise PermanentError(
                f"cluster {spec.cluster!r} does not exist at {where(vcenter)} in datacenter "
                f"{dc.get('name')!r}: fix protection_groups.dr_cluster; clusters and hosts there: "
                f"{name_list(names)}"
            )
    if not ordered:
        raise PermanentError(
            f"datacenter {dc.get('name')!r} at {where(vcenter)} has no cluster or host to run a VM"
        )
    return ordered[0][1]["resourcePool"]


def _folder(si: Any, vcenter: VCenterEndpoint, spec: ShellSpec, dc: Props) -> Any:
    if not spec.folder or spec.folder.strip("/") in ("vm", f"{dc.get('name')}/vm"):
        return dc["vmFolder"]
    folders = collect(si, vim.Folder, ["name"], root=dc["vmFolder"])
    wanted = spec.folder.strip("/").split("/")[-1]
    hit = next((o for o, p in folders if p.get("name") == wanted), None)
    if hit is None:
        names = sorted(str(p.get("name")) for _, p in folders)
        raise PermanentError(
            f"VM folder {spec.folder!r} does not exist at {where(vcenter)} in datacenter {dc.get('name')!r}: "
            f"fix protection_groups.dr_folder; folders below its root 'vm' folder: {name_list(names)}"
        )
    return hit


def _network_backing(si: Any, vcenter: VCenterEndpoint, network: str, dc: Props) -> Any:
    nets = collect(si, vim.Network, ["name"], root=dc["self"])
    hit = next((o for o, p in nets if p.get("name") == network), None)
    if hit is None:
        names = sorted({str(p.get("name")) for _, p in nets})
        raise PermanentError(
            f"network {network!r} does not exist at {where(vcenter)}: fix protection_groups.dr_network; "
            f"networks there: {name_list(names)}"
        )
    if isinstance(hit, vim.dvs.DistributedVirtualPortgroup):
        pg = properties(si, hit, ["key", "config.distributedVirtualSwitch"])
        switch = properties(si, pg["config.distributedVirtualSwitch"], ["uuid"])
        port = vim.dvs.PortConnection(portgroupKey=pg["key"], switchUuid=switch["uuid"])
        return _dev.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    if isinstance(hit, vim.OpaqueNetwork):
        raise PermanentError(
            f"network {network!r} is an NSX opaque network, which DR shells do not support yet"
        )
    return _dev.VirtualEthernetCard.NetworkBackingInfo(deviceName=network, network=hit)


def vsphere_name(name: str) -> str:
    """A name as vSphere wants it in a ConfigSpec: '%' that starts no escape, '/' and '\\' escaped.

    vCenter itself lists names that way ('a/b' is 'a%2fb'), so a name read by the inventory
    sync passes through unchanged, and a raw '/' typed into a row is not taken for a path
    (vcsim drops the connection on one, which would look like an outage and be retried).
    """
    return _NOT_AN_ESCAPE.sub("%25", name).replace("/", "%2f").replace("\\", "%5c")


def build_config(spec: ShellSpec, place: Placement) -> Any:
    kind = spec.controller if spec.controller in CONTROLLERS else None
    if kind is None:
        raise PermanentError(
            f"disk controller {spec.controller!r} is not one of {', '.join(CONTROLLERS)}: "
            "fix the VM's disks in vcenter_vms"
        )
    cls, units = CONTROLLERS[kind]
    if len(spec.disks) > len(units):
        raise PermanentError(
            f"{len(spec.disks)} disks do not fit on one {kind} controller ({len(units)} slots): "
            "check vcenter_vms.disks (sync the vCenter)"
        )
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    changes = []
    if kind == "ide":
        # Every VM gets its two IDE controllers (keys 200 and 201) from vSphere itself; a third
        # cannot be added, so IDE disks go on the first of those.
        controller_key = _IDE0_KEY
    else:
        controller = cls(key=_CONTROLLER_KEY, busNumber=0)
        if isinstance(controller, _dev.VirtualSCSIController):
            controller.sharedBus = _dev.VirtualSCSIController.Sharing.noSharing
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=controller))
        controller_key = _CONTROLLER_KEY
    changes += [
        # No fileOperation: attach the existing replica, never create or replace it.
        vim.vm.device.VirtualDeviceSpec(
            operation=add, device=_disk(i, controller_key, unit, disk.file, disk.capacity, place)
        )
        for i, (disk, unit) in enumerate(zip(spec.disks, units))
    ]
    if place.network is not None:
        nic = _dev.VirtualVmxnet3(
            key=-300,
            backing=place.network,
            addressType="generated",
            connectable=_dev.VirtualDevice.ConnectInfo(
                startConnected=True, allowGuestControl=True, connected=False
            ),
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=nic))
    return vim.vm.ConfigSpec(
        name=vsphere_name(spec.name),
        guestId=spec.guest_id,
        numCPUs=spec.num_cpu,
        memoryMB=spec.memory_mb,
        firmware=spec.firmware,
        annotation=f"Zerfaux DR shell of protected VM {spec.protected_vm_id}",
        files=vim.vm.FileInfo(vmPathName=f"[{spec.datastore}]"),
        extraConfig=[vim.option.OptionValue(key=MARK_KEY, value=spec.protected_vm_id)],
        deviceChange=changes,
    )


def _disk(index: int, controller_key: int, unit: int, file: str, capacity: int, place: Placement) -> Any:
    backing = _dev.VirtualDisk.FlatVer2BackingInfo(
        fileName=file, diskMode="persistent", datastore=place.datastore
    )
    # Capacity is left out when unknown: vSphere then reads it from the existing descriptor.
    sizes = {"capacityInBytes": capacity, "capacityInKB": capacity // 1024} if capacity > 0 else {}
    return _dev.VirtualDisk(
        key=-(101 + index), controllerKey=controller_key, unitNumber=unit, backing=backing, **sizes
    )
