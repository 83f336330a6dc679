"""Stub backends: deterministic and realistic, so the product can be tried with no vCenter or ZFS.

They converge rows exactly as the real backends do; only the outside world is imagined.
``seconds`` is how long each operation pretends to take (``ZERFAUX_STUB_SECONDS``).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
import uuid

from handlers.dr_shell import ShellResult, ShellSpec
from handlers.errors import OperationCancelled
from handlers.replication import (
    ProgressSink,
    ReplicationOutcome,
    ReplicationProgress,
    ReplicationRequest,
    snapshot_name,
)
from handlers.types import VCenterEndpoint
from handlers.vcenter_sync import DatastoreRecord, Disk, Inventory, VMRecord

GIB = 1024**3
STUB_DATASTORES = ("vsan-01", "nfs-01", "zfs-protect-01", "zfs-dr-01")
_GUESTS = (
    ("ubuntu64Guest", "Ubuntu Linux (64-bit)"),
    ("windows2019srv_64Guest", "Microsoft Windows Server 2019 (64-bit)"),
    ("rhel9_64Guest", "Red Hat Enterprise Linux 9 (64-bit)"),
)


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _pause(seconds: float, cancel: threading.Event | None = None) -> None:
    if seconds > 0 and cancel is not None and cancel.wait(seconds):
        raise OperationCancelled("cancelled while running")
    if seconds > 0 and cancel is None:
        time.sleep(seconds)


class VCenterInventoryStub:
    def __init__(self, vm_count: int = 50, seconds: float = 0.0) -> None:
        self._vm_count = vm_count
        self._seconds = seconds

    def fetch(self, vcenter: VCenterEndpoint) -> Inventory:
        _pause(self._seconds)
        prefix = vcenter.name.lower().replace(" ", "-")
        datastores = [
            DatastoreRecord(
                moref=f"datastore-{10 + i}",
                name=name,
                type="NFS" if name.startswith(("nfs", "zfs")) else "vsan",
                capacity_bytes=(4 + i) * 1024 * GIB,
                free_bytes=(4 + i) * 1024 * GIB * (30 + _digest(prefix, name) % 50) // 100,
            )
            for i, name in enumerate(STUB_DATASTORES)
        ]
        vms = []
        for i in range(self._vm_count):
            seed = _digest(prefix, i)
            cluster = f"cluster-{seed % 3 + 1:02d}"
            ds = STUB_DATASTORES[seed % 2]
            name = f"{prefix}-vm-{i + 1:04d}"
            guest_id, guest_name = _GUESTS[seed % len(_GUESTS)]
            disks = tuple(
                Disk(
                    file=f"[{ds}] {name}/{name}{'' if d == 0 else f'_{d}'}.vmdk",
                    capacity=(16 << d) * GIB,
                    datastore=ds,
                    controller="pvscsi",
                    bus=0,
                    unit=d,
                )
                for d in range(1 + seed % 3)
            )
            vms.append(
                VMRecord(
                    moref=f"vm-{100 + i}",
                    name=name,
                    instance_uuid=str(uuid.UUID(int=_digest(prefix, "uuid", i) << 64 | seed)),
                    cluster=cluster,
                    esx_host=f"esx-{seed % 3 + 1:02d}{seed % 2 + 1}.{prefix}.local",
                    power_state="poweredOn" if seed % 5 else "poweredOff",
                    datastore=ds,
                    datastores=(ds,),
                    guest_os=guest_name,
                    guest_id=guest_id,
                    firmware="efi" if seed % 2 else "bios",
                    num_cpu=2 ** (seed % 3),
                    memory_mb=1024 * 2 ** (seed % 4),
                    disks=disks,
                    networks=("VM Network",),
                )
            )
        return Inventory(vms=vms, datastores=datastores)


class StorageMoverStub:
    def __init__(self, seconds: float = 0.0) -> None:
        self._seconds = seconds
        self._placed: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def relocate(
        self, vcenter: VCenterEndpoint, vm_moref: str, datastore: str, cancel: threading.Event
    ) -> bool:
        key = (vcenter.id, vm_moref)
        with self._lock:
            if self._placed.get(key) == datastore:
                return False
        _pause(self._seconds, cancel)
        with self._lock:
            self._placed[key] = datastore
        return True


class DRShellBuilderStub:
    def __init__(self, seconds: float = 0.0) -> None:
        self._seconds = seconds
        self._shells: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1001)
        self._lock = threading.Lock()

    def ensure_shell(self, vcenter: VCenterEndpoint, spec: ShellSpec) -> ShellResult:
        key = (vcenter.id, spec.protected_vm_id)
        with self._lock:
            if key in self._shells:
                return ShellResult(moref=self._shells[key], adopted=True)
        _pause(self._seconds)
        with self._lock:
            moref = self._shells.setdefault(key, f"vm-{next(self._ids)}")
        return ShellResult(moref=moref, adopted=False)


class ZFSReplicationStub:
    """Pretends to send: a full stream of a few GiB, or about 2 % of it when incremental."""

    def __init__(self, seconds: float = 0.0, steps: int = 20) -> None:
        self._seconds = seconds
        self._steps = steps

    def replicate(
        self, request: ReplicationRequest, progress: ProgressSink, cancel: threading.Event
    ) -> ReplicationOutcome:
        snap = snapshot_name(request.job_id)
        base = request.last_snapshot
        full = (1 + _digest(request.source_dataset) % 8) * GIB
        size = full // 50 if base else full
        sent = 0
        for step in range(1, self._steps + 1):
            if self._seconds > 0 and cancel.wait(self._seconds / self._steps):
                raise OperationCancelled(f"cancelled after {sent} of {size} bytes")
            if cancel.is_set():
                raise OperationCancelled(f"cancelled after {sent} of {size} bytes")
            sent = size * step // self._steps
            progress(ReplicationProgress(snap, base, sent, size))
        return ReplicationOutcome(snap, base, sent, size, ("stub backend: no data was copied",))
