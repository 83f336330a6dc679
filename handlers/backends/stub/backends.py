"""Stub backends: deterministic and realistic, so the product can be tried with no vCenter or ZFS.

They converge rows exactly as the real backends do; only the outside world is imagined.
``seconds`` is how long each operation pretends to take (``ZERFAUX_STUB_SECONDS``), plus a random
extra of up to ``jitter`` seconds (``ZERFAUX_STUB_SECONDS_JITTER``) so many operations finish out
of order, as real ones do.

The imagined world lives in this process's memory, or, with a ``StubWorld``
(``ZERFAUX_STUB_WORLD``), in a directory shared by every listener process, where each effect is
journaled: a DR shell is created once and adopted after that, a VM's datastore is remembered, a
job's snapshot is made and received once. That is what lets tests count effects across crashes.

Stopping follows the ``StopSignal``: on 'cancel' a stub cleans up as the real backend does (a
partial receive is aborted, a relocation is not made) and raises ``OperationCancelled``; on 'stop'
(shutdown, lease lost) it keeps what a real one keeps (a partial receive stays resumable, a
started relocation task runs to its end) and raises ``OperationStopped``. In a shared world both
are journaled ('stopped', 'resumed'), so a test sees when and where a backend was told to stop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import NoReturn

from handlers.backends.stub.points import StubReplica
from handlers.backends.stub.world import StubWorld
from handlers.dr_shell import ShellResult, ShellSpec
from handlers.errors import HandlerError, OperationCancelled, OperationStopped
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


def _duration(seconds: float, jitter: float) -> float:
    return seconds + (random.uniform(0.0, jitter) if jitter > 0 else 0.0)


def _stopping(cancel: threading.Event) -> bool:
    """True when the engine stopped the attempt (keep state); a plain Event means cancel."""
    return getattr(cancel, "reason", None) == "stop"


def _interrupted(cancel: threading.Event, what: str) -> HandlerError:
    if _stopping(cancel):
        return OperationStopped(f"stopped ({getattr(cancel, 'why', 'stopped')}) {what}")
    return OperationCancelled(f"cancelled {what}")


def _pause(seconds: float, cancel: threading.Event | None = None) -> None:
    if seconds > 0 and cancel is not None and cancel.wait(seconds):
        raise _interrupted(cancel, "while running")
    if seconds > 0 and cancel is None:
        time.sleep(seconds)


class VCenterInventoryStub:
    def __init__(self, vm_count: int = 50, seconds: float = 0.0, jitter: float = 0.0,
                 world: StubWorld | None = None) -> None:
        self._vm_count = vm_count
        self._seconds = seconds
        self._jitter = jitter
        self._world = world

    def fetch(self, vcenter: VCenterEndpoint) -> Inventory:
        _pause(_duration(self._seconds, self._jitter))
        if self._world is not None:
            self._world.record("vcenter.sync", vcenter.id, "read", vms=self._vm_count)
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
    def __init__(self, seconds: float = 0.0, jitter: float = 0.0, world: StubWorld | None = None) -> None:
        self._seconds = seconds
        self._jitter = jitter
        self._world = world
        self._placed: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def relocate(
        self, vcenter: VCenterEndpoint, vm_moref: str, datastore: str, cancel: threading.Event
    ) -> bool:
        if self._world is not None:
            return self._relocate_in_world(self._world, vcenter, vm_moref, datastore, cancel)
        key = (vcenter.id, vm_moref)
        with self._lock:
            if self._placed.get(key) == datastore:
                return False
        if cancel.is_set():
            raise _interrupted(cancel, "before the relocation started")
        try:
            _pause(_duration(self._seconds, self._jitter), cancel)
        except OperationStopped:
            with self._lock:  # the vCenter task was left running: it ends there by itself
                self._placed[key] = datastore
            raise
        with self._lock:
            self._placed[key] = datastore
        return True

    def _relocate_in_world(
        self, world: StubWorld, vcenter: VCenterEndpoint, vm_moref: str, datastore: str,
        cancel: threading.Event,
    ) -> bool:
        subject = f"{vcenter.id}/{vm_moref}"
        # One task per VM at a time, as vCenter allows: a second mover waits, then finds the VM
        # already there. A mover killed mid-move leaves the VM where it was (the lock dies with it).
        with world.locked("placement", vcenter.id, vm_moref):
            if world.read("placement", vcenter.id, vm_moref) == datastore:
                world.record("vm.storage_vmotion", subject, "already-there", datastore=datastore)
                return False
            if cancel.is_set():
                raise _interrupted(cancel, "before the relocation started")
            try:
                _pause(_duration(self._seconds, self._jitter), cancel)
            except OperationStopped as exc:
                # A stopped worker leaves the running vCenter task alone: it ends by itself,
                # and the next attempt finds the VM already there.
                world.write("placement", vcenter.id, vm_moref, content=datastore)
                world.record("vm.storage_vmotion", subject, "stopped", datastore=datastore,
                             why=str(getattr(cancel, "why", "")), task="left running")
                raise exc
            world.write("placement", vcenter.id, vm_moref, content=datastore)
            world.record("vm.storage_vmotion", subject, "relocated", datastore=datastore)
        return True


class DRShellBuilderStub:
    def __init__(self, seconds: float = 0.0, jitter: float = 0.0, world: StubWorld | None = None) -> None:
        self._seconds = seconds
        self._jitter = jitter
        self._world = world
        self._shells: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1001)
        self._lock = threading.Lock()

    def ensure_shell(
        self, vcenter: VCenterEndpoint, spec: ShellSpec, stop: threading.Event | None = None
    ) -> ShellResult:
        # The stub's creation is one step, so there is no moment at which a stop could leave it half done.
        if self._world is not None:
            return self._ensure_in_world(self._world, vcenter, spec)
        key = (vcenter.id, spec.protected_vm_id)
        with self._lock:
            if key in self._shells:
                return ShellResult(moref=self._shells[key], adopted=True)
        _pause(_duration(self._seconds, self._jitter))
        with self._lock:
            moref = self._shells.setdefault(key, f"vm-{next(self._ids)}")
        return ShellResult(moref=moref, adopted=False)

    def made(self, vcenter: VCenterEndpoint) -> set[str]:
        """The morefs of the shells this process made at ``vcenter`` (no shared world)."""
        with self._lock:
            return {m for (vc, _), m in self._shells.items() if vc == vcenter.id}

    def _ensure_in_world(self, world: StubWorld, vcenter: VCenterEndpoint, spec: ShellSpec) -> ShellResult:
        subject = spec.protected_vm_id
        # CreateVM_Task registers the VM (carrying the protected VM's mark) at once and finishes
        # configuring it later: a worker that dies in between leaves a shell the next one adopts.
        moref = f"vm-{100000 + _digest(vcenter.id, subject) % 900000}"
        if world.create_once("shells", vcenter.id, subject, content=moref):
            world.record("vm.dr_shell", subject, "created", moref=moref, name=spec.name)
            # Made powered off with its disks, as the failover stubs see a VM (stub/failover.py).
            world.write("fo-vm", vcenter.id, moref, content=json.dumps({
                "state": "poweredOff", "tools": True, "obeys": True,
                "changed_at": datetime.now(timezone.utc).isoformat(),
                "disks": [d.file for d in spec.disks], "nics": []}))
            _pause(_duration(self._seconds, self._jitter))
            return ShellResult(moref=moref, adopted=False)
        existing = world.read("shells", vcenter.id, subject) or moref
        world.record("vm.dr_shell", subject, "adopted", moref=existing)
        return ShellResult(moref=existing, adopted=True)


class ZFSReplicationStub:
    """Pretends to send: a full stream of a few GiB, or about 2 % of it when incremental."""

    def __init__(self, seconds: float = 0.0, steps: int = 20, jitter: float = 0.0,
                 world: StubWorld | None = None) -> None:
        self._seconds = seconds
        self._steps = steps
        self._jitter = jitter
        self._world = world
        self._replica = StubReplica(world)

    def replicate(
        self, request: ReplicationRequest, progress: ProgressSink, cancel: threading.Event
    ) -> ReplicationOutcome:
        world = self._world
        snap = snapshot_name(request.job_id)
        if world is not None:
            # The job's snapshot is made once; a retry (here or in another process) reuses it.
            world.create_once("snapshots", request.job_id, content=snap)
            snap = world.read("snapshots", request.job_id) or snap
        base = request.last_snapshot
        full = (1 + _digest(request.source_dataset) % 8) * GIB
        size = full // 50 if base else full
        if world is not None and world.read("received", request.target_dataset, snap) is not None:
            world.record("replication.run", request.job_id, "already-there", snapshot=snap)
            return self._outcome(request, snap, base, size, size, None)
        first = 1
        if world is not None:
            # A receive stopped earlier left its resume token: continue from there.
            kept = world.read("partial", request.target_dataset, snap)
            if kept is not None:
                first = int(kept) + 1
                world.record("replication.run", request.job_id, "resumed", snapshot=snap,
                             bytes=size * int(kept) // self._steps)
        sent = size * (first - 1) // self._steps
        step_seconds = _duration(self._seconds, self._jitter) / self._steps
        for step in range(first, self._steps + 1):
            if (step_seconds > 0 and cancel.wait(step_seconds)) or cancel.is_set():
                self._stop_here(request, snap, step - 1, sent, size, cancel)
            sent = size * step // self._steps
            progress(ReplicationProgress(snap, base, sent, size))
        if world is not None:
            world.remove("partial", request.target_dataset, snap)
            # The receive commits once: a racing attempt that finishes second finds it there.
            effect = "sent" if world.create_once("received", request.target_dataset, snap,
                                                 content=request.job_id) else "already-there"
            world.record("replication.run", request.job_id, effect, snapshot=snap, bytes=sent)
        return self._outcome(request, snap, base, sent, size, sent)

    def _outcome(self, request: ReplicationRequest, snap: str, base: str | None, sent: int, size: int,
                 sent_bytes: int | None) -> ReplicationOutcome:
        points, pruned = self._replica.received(request, snap, sent_bytes)
        return ReplicationOutcome(snap, base, sent, size, ("stub backend: no data was copied",), points,
                                  pruned, pruned, not self._replica.complete)

    def _stop_here(self, request: ReplicationRequest, snap: str, steps_done: int, sent: int, size: int,
                   cancel: threading.Event) -> NoReturn:
        world = self._world
        if world is not None:
            if _stopping(cancel):
                # Keep the partial receive (its resume token), as `zfs receive -s` does.
                world.write("partial", request.target_dataset, snap, content=str(steps_done))
                world.record("replication.run", request.job_id, "stopped", snapshot=snap, bytes=sent,
                             why=str(getattr(cancel, "why", "")))
            else:
                world.remove("partial", request.target_dataset, snap)  # `zfs receive -A`
        raise _interrupted(cancel, f"after {sent} of {size} bytes")
