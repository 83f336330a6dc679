"""``vcenter.sync``: read a vCenter's VMs and datastores; the engine upserts them in one go."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from handlers.context import OperationContext
from handlers.types import Row, VCenterEndpoint


@dataclass(frozen=True)
class Disk:
    file: str  # "[datastore] dir/name.vmdk"
    capacity: int  # bytes
    datastore: str
    controller: str  # controller type: pvscsi, lsilogic, lsilogic-sas, buslogic, nvme, sata, ide
    bus: int = 0
    unit: int = 0


@dataclass(frozen=True)
class VMRecord:
    moref: str
    name: str
    instance_uuid: str | None
    cluster: str | None
    esx_host: str | None
    power_state: str | None
    datastore: str | None  # where the VM's configuration lives
    datastores: tuple[str, ...] = ()
    guest_os: str | None = None  # full name, for people
    guest_id: str | None = None  # for CreateVM
    firmware: str | None = None  # bios | efi
    num_cpu: int | None = None
    memory_mb: int | None = None
    disks: tuple[Disk, ...] = ()
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatastoreRecord:
    moref: str
    name: str
    type: str | None
    capacity_bytes: int | None
    free_bytes: int | None


@dataclass(frozen=True)
class Inventory:
    vms: list[VMRecord] = field(default_factory=list)
    datastores: list[DatastoreRecord] = field(default_factory=list)

    def as_result(self) -> dict[str, Any]:
        """What ``asdict`` gives, built directly: ``asdict`` deep-copies every field through a
        recursive walk, which made it the largest Python cost of a sync after pyVmomi's parsing
        (bench/inventory.py --profile)."""
        return {
            "vms": [{**vm.__dict__, "disks": [dict(d.__dict__) for d in vm.disks]} for vm in self.vms],
            "datastores": [dict(ds.__dict__) for ds in self.datastores],
        }


class VCenterInventory(Protocol):
    def fetch(self, vcenter: VCenterEndpoint) -> Inventory:
        """Read every VM and datastore the vCenter shows. Blocking (run it in a thread).

        Read-only on the vCenter, so always safe to repeat. Raises ``PermanentError`` when
        retrying cannot help (authentication, TLS verification) and ``TransientError`` when
        the vCenter is unreachable or timed out.
        """
        ...


class VCenterSyncHandler:
    kind = "vcenter.sync"

    def __init__(self, backend: VCenterInventory) -> None:
        self._backend = backend

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        vcenter = VCenterEndpoint.from_row(payload["vcenter"])
        inventory = await asyncio.to_thread(self._backend.fetch, vcenter)
        return inventory.as_result()
