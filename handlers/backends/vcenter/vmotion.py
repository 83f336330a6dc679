"""``StorageMoverReal``: storage vMotion of a VM's configuration and every disk to one datastore."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pyVmomi import vim, vmodl

from handlers.backends.vcenter.query import check_stop, collect, properties, running_tasks, wait_for_task
from handlers.backends.vcenter.session import VCenterSessions, name_list, where
from handlers.datastore_paths import datastore_of_path
from handlers.errors import PermanentError
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

_VM_PATHS = (
    "name", "datastore", "config.files.vmPathName", "config.hardware.device", "runtime.host", "recentTask",
)
# A relocation task's info.descriptionId (vCenter's, then vcsim's) and its method's wsdlName.
_RELOCATE = ("VirtualMachine.relocate", "VirtualMachine.relocateVm", "RelocateVM_Task")


def already_there(
    props: dict[str, Any], target_ref: str, datastore_names: dict[str, str], target: str
) -> bool:
    """True when the VM needs no relocation to ``target``.

    ``datastore`` is vCenter's own list of the datastores holding the VM's files, so it must
    name the target, and no other datastore in it may hold the configuration or a disk. (A
    mounted ISO on a library datastore is fine.) vcsim moves only ``datastore`` on relocation,
    leaving file paths behind; the rule holds for it too because the old datastore leaves the list.
    """
    listed = {ref._moId for ref in props.get("datastore") or ()}
    if target_ref not in listed:
        return False
    holding = {datastore_of_path(props.get("config.files.vmPathName"))}
    for device in props.get("config.hardware.device") or ():
        if isinstance(device, vim.vm.device.VirtualDisk):
            ds = getattr(device.backing, "datastore", None)
            holding.add(datastore_names.get(ds._moId) if ds is not None else None)
            holding.add(datastore_of_path(getattr(device.backing, "fileName", None)))
    listed_names = {datastore_names.get(ref, ref) for ref in listed}
    return not ((holding - {None, target}) & listed_names)


class StorageMoverReal:
    def __init__(self, sessions: VCenterSessions) -> None:
        self._sessions = sessions

    def relocate(
        self, vcenter: VCenterEndpoint, vm_moref: str, datastore: str, stop: threading.Event
    ) -> bool:
        return self._sessions.run(
            vcenter, lambda si: self._relocate(si, vcenter, vm_moref, datastore, stop)
        )

    def _relocate(
        self, si: Any, vcenter: VCenterEndpoint, vm_moref: str, datastore: str, stop: threading.Event
    ) -> bool:
        vm = vim.VirtualMachine(vm_moref, si._stub)
        try:
            props = properties(si, vm, _VM_PATHS)
        except vmodl.fault.ManagedObjectNotFound as exc:
            vms = collect(si, vim.VirtualMachine, ["name"])
            names = sorted(f"{p.get('name')} ({o._moId})" for o, p in vms)
            raise PermanentError(
                f"VM {vm_moref} does not exist at {where(vcenter)}: sync the vCenter and fix "
                f"protected_vms.vm_id; VMs there: {name_list(names)}"
            ) from exc
        name = props.get("name", vm_moref)
        running = running_tasks(si, vm, _RELOCATE, props.get("recentTask") or ())
        adopted = bool(running)
        if running:
            # An earlier attempt (a listener stopped or fenced mid-move) left its relocation
            # running: wait for that one instead of starting a second.
            log.info("%s: VM %s is already being relocated (task %s); waiting for it",
                     where(vcenter), name, running[0]._moId)
            wait_for_task(si, running[0], stop)
            props = properties(si, vm, _VM_PATHS)
        host = props.get("runtime.host")
        host_props = properties(si, host, ["name", "datastore"]) if host is not None else {}
        mounted = {ref._moId: ref for ref in host_props.get("datastore") or ()}
        all_names = {o._moId: p.get("name", o._moId) for o, p in collect(si, vim.Datastore, ["name"])}
        matches = [ref for ref_id, ref in mounted.items() if all_names.get(ref_id) == datastore]
        if not matches:
            self._missing(vcenter, datastore, name, host_props.get("name"), mounted, all_names)
        target = matches[0]
        if already_there(props, target._moId, all_names, datastore):
            log.debug("%s: VM %s already on %s", where(vcenter), name, datastore)
            return adopted  # True when the relocation that put it there was this operation's
        disks = [
            vim.vm.RelocateSpec.DiskLocator(diskId=d.key, datastore=target)
            for d in props.get("config.hardware.device") or ()
            if isinstance(d, vim.vm.device.VirtualDisk)
        ]
        # No host and no pool: a storage-only move, the VM keeps running where it is.
        spec = vim.vm.RelocateSpec(datastore=target, disk=disks)
        log.info(
            "%s: relocating VM %s (%s) and %d disks to %s",
            where(vcenter), name, vm_moref, len(disks), datastore,
        )
        check_stop(stop, "before the relocation started")
        wait_for_task(si, vm.RelocateVM_Task(spec), stop)
        return True

    @staticmethod
    def _missing(
        vcenter: VCenterEndpoint,
        datastore: str,
        vm_name: str,
        host_name: str | None,
        mounted: dict[str, Any],
        all_names: dict[str, str],
    ) -> None:
        on_host = sorted(all_names.get(ref, ref) for ref in mounted)
        if datastore in all_names.values():
            raise PermanentError(
                f"datastore {datastore!r} exists at {where(vcenter)} but is not mounted on host "
                f"{host_name!r} where VM {vm_name!r} runs: mount it there; datastores on that host: "
                f"{name_list(on_host)}"
            )
        raise PermanentError(
            f"datastore {datastore!r} does not exist at {where(vcenter)}: fix "
            "protection_groups.protection_datastore; datastores there: "
            f"{name_list(sorted(set(all_names.values())))}"
        )
