"""``VCenterInventoryReal``: every VM and datastore of a vCenter in a handful of bulk reads.

Five bulk reads, whatever the number of VMs: VMs, hosts, clusters, datastores, networks, each
``RetrievePropertiesEx`` over a container view (paged when the server pages; VMs in pages of
1,000, one call each). Names of the
objects VMs point at (host, cluster, datastore, network) are joined here from those reads.
VMs are read last, a page at a time (``collect_pages``), and each page becomes ``VMRecord``s
before the next arrives: the raw pyVmomi objects of 10,000 VMs would take about 180 MB at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pyVmomi import vim

from handlers.backends.vcenter.query import Props, collect, collect_pages
from handlers.backends.vcenter.session import VCenterSessions, where
from handlers.datastore_paths import datastore_of_path
from handlers.types import VCenterEndpoint
from handlers.vcenter_sync import DatastoreRecord, Disk, Inventory, VMRecord

log = logging.getLogger(__name__)

VM_PATHS = (
    "name",
    "config.instanceUuid",
    "config.files.vmPathName",
    "config.guestFullName",
    "config.guestId",
    "config.firmware",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "runtime.host",
    "runtime.powerState",
    "datastore",
    "network",
)
DATASTORE_PATHS = ("name", "summary.type", "summary.capacity", "summary.freeSpace")

# Most specific first: the SAS and parallel LSI Logic controllers are siblings, SATA is AHCI.
CONTROLLER_TYPES: tuple[tuple[type, str], ...] = (
    (vim.vm.device.ParaVirtualSCSIController, "pvscsi"),
    (vim.vm.device.VirtualLsiLogicSASController, "lsilogic-sas"),
    (vim.vm.device.VirtualLsiLogicController, "lsilogic"),
    (vim.vm.device.VirtualBusLogicController, "buslogic"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
    (vim.vm.device.VirtualSATAController, "sata"),
    (vim.vm.device.VirtualIDEController, "ide"),
)


def controller_type(device: Any) -> str | None:
    for cls, name in CONTROLLER_TYPES:
        if isinstance(device, cls):
            return name
    return None


def disks_of(devices: Any, datastore_names: Mapping[str, str]) -> tuple[Disk, ...]:
    controllers = {
        d.key: (kind, int(d.busNumber or 0))
        for d in devices or ()
        if (kind := controller_type(d)) is not None
    }
    disks = []
    for device in devices or ():
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        backing = device.backing
        file_name = getattr(backing, "fileName", None) or ""
        ds_ref = getattr(backing, "datastore", None)
        datastore = (datastore_names.get(ds_ref._moId) if ds_ref is not None else None) or (
            datastore_of_path(file_name) or ""
        )
        capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
        kind, bus = controllers.get(device.controllerKey, ("unknown", 0))
        disks.append(
            Disk(
                file=file_name,
                capacity=int(capacity),
                datastore=datastore,
                controller=kind,
                bus=bus,
                unit=int(device.unitNumber or 0),
            )
        )
    return tuple(disks)


def _names(rows: list[tuple[Any, Props]]) -> dict[str, str]:
    return {obj._moId: props.get("name", obj._moId) for obj, props in rows}


def _ref_names(refs: Any, names: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(names.get(r._moId, r._moId) for r in refs or ())


class VCenterInventoryReal:
    def __init__(self, sessions: VCenterSessions) -> None:
        self._sessions = sessions

    def fetch(self, vcenter: VCenterEndpoint) -> Inventory:
        inventory = self._sessions.run(vcenter, read_inventory)
        log.debug("%s: %d VMs, %d datastores", where(vcenter), len(inventory.vms), len(inventory.datastores))
        return inventory


def read_inventory(si: Any) -> Inventory:
    """The whole inventory from an open session (also used by the benchmark)."""
    datastore_rows = collect(si, vim.Datastore, DATASTORE_PATHS)
    clusters = _names(collect(si, vim.ClusterComputeResource, ["name"]))
    host_rows = collect(si, vim.HostSystem, ["name", "parent"])
    networks = _names(collect(si, vim.Network, ["name"]))

    datastore_names = _names(datastore_rows)
    hosts = {obj._moId: props.get("name", obj._moId) for obj, props in host_rows}
    host_cluster = {
        obj._moId: clusters.get(props["parent"]._moId) if props.get("parent") is not None else None
        for obj, props in host_rows
    }
    datastores = [
        DatastoreRecord(
            moref=obj._moId,
            name=props.get("name", obj._moId),
            type=props.get("summary.type"),
            capacity_bytes=props.get("summary.capacity"),
            free_bytes=props.get("summary.freeSpace"),
        )
        for obj, props in datastore_rows
    ]
    vms: list[VMRecord] = []
    for page in collect_pages(si, vim.VirtualMachine, VM_PATHS):
        vms.extend(_vm_record(obj, p, hosts, host_cluster, datastore_names, networks) for obj, p in page)
        del page  # before the next page is read
    return Inventory(vms=vms, datastores=datastores)


def _vm_record(
    obj: Any,
    props: Props,
    hosts: Mapping[str, str],
    host_cluster: Mapping[str, str | None],
    datastore_names: Mapping[str, str],
    networks: Mapping[str, str],
) -> VMRecord:
    host_ref = props.get("runtime.host")
    host_id = host_ref._moId if host_ref is not None else None
    all_datastores = _ref_names(props.get("datastore"), datastore_names)
    power = props.get("runtime.powerState")
    memory = props.get("config.hardware.memoryMB")
    cpus = props.get("config.hardware.numCPU")
    return VMRecord(
        moref=obj._moId,
        name=props.get("name", obj._moId),
        instance_uuid=props.get("config.instanceUuid"),
        cluster=host_cluster.get(host_id) if host_id else None,
        esx_host=hosts.get(host_id) if host_id else None,
        power_state=str(power) if power is not None else None,
        # Where the .vmx lives; a VM with no readable config falls back to its first datastore.
        datastore=datastore_of_path(props.get("config.files.vmPathName"))
        or (all_datastores[0] if all_datastores else None),
        datastores=all_datastores,
        guest_os=props.get("config.guestFullName"),
        guest_id=props.get("config.guestId"),
        firmware=props.get("config.firmware"),
        num_cpu=int(cpus) if cpus is not None else None,
        memory_mb=int(memory) if memory is not None else None,
        disks=disks_of(props.get("config.hardware.device"), datastore_names),
        networks=_ref_names(props.get("network"), networks),
    )
