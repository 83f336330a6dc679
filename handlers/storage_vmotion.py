"""``vm.storage_vmotion``: move a protected VM onto its group's protection datastore."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from handlers.context import OperationContext
from handlers.errors import PermanentError
from handlers.types import Row, VCenterEndpoint

# A managed object id as vCenter and ESXi hand them out (vm-123, 42). pyVmomi writes it into
# the SOAP envelope unescaped, so anything else in a row must stop here, not reach the XML.
MOREF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,79}$")


class StorageMover(Protocol):
    def relocate(
        self, vcenter: VCenterEndpoint, vm_moref: str, datastore: str, stop: threading.Event
    ) -> bool:
        """Move the VM's configuration and every disk to ``datastore``. Blocking.

        Idempotent: returns False, starting no task, when the VM is already entirely on
        ``datastore``; True after a completed relocation. A relocation of this VM already
        running (left by an attempt that was stopped) is waited for, not started twice.
        ``stop`` (a ``StopSignal``): on 'cancel' the running task is cancelled and
        ``OperationCancelled`` raised; on 'stop' the task is left running and
        ``OperationStopped`` raised; once set, no new task is started. Raises
        ``PermanentError`` when the VM or the datastore does not exist (naming what does) and
        ``TransientError`` when the vCenter cannot be reached.
        """
        ...


class StorageVMotionHandler:
    kind = "vm.storage_vmotion"

    def __init__(self, backend: StorageMover) -> None:
        self._backend = backend

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        vm, group = payload.get("vm"), payload["group"]
        if not vm:
            raise PermanentError(
                "protected_vms.vm_id does not name a VM in vcenter_vms: sync the vCenter and fix vm_id"
            )
        datastore = group.get("protection_datastore")
        if not datastore:
            raise PermanentError(
                f"protection group {group['name']!r} has no protection_datastore: set "
                "protection_groups.protection_datastore to the datastore backed by source_dataset"
            )
        moref = vm.get("moref")
        if not isinstance(moref, str) or not MOREF.fullmatch(moref):
            raise PermanentError(
                f"vcenter_vms.moref {str(moref)[:100]!r} of VM {str(vm.get('name'))[:100]!r} is not a "
                "vCenter object id such as 'vm-123': sync the vCenter and fix protected_vms.vm_id"
            )
        vcenter = VCenterEndpoint.from_row(payload["vcenter"])
        moved = await asyncio.to_thread(
            self._backend.relocate, vcenter, moref, datastore, ctx.stop
        )
        return {"relocated": moved, "datastore": datastore}
