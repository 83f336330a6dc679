"""The stub sites a failover run works on: one storage stub and one compute stub that each carry the
test failover's calls (``recovery``) and the failover's (``failover``), and the engine's
replication stub seen through them.

The stubs keep their state in separate places of the stub world (the replication stub a replica's
listing, the failover stubs each host's datasets and each vCenter's VMs); what is stitched here
is what a run reads across them: a snapshot the replication stub "sent" exists on both hosts with
one GUID, a replica can be exported like a clone, a DR shell powered on by a run is on for the
fencing checks too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from handlers.backends.stub.failover import FailoverComputeStub, FailoverStorageStub
from handlers.backends.stub.points import fake_guid
from handlers.backends.stub.recovery import RecoveryComputeStub, RecoveryStorageStub
from handlers.backends.stub.world import StubWorld
from handlers.errors import PermanentError
from handlers.recovery.failover_backends import ShutdownResult
from handlers.replication import ProgressSink, ReplicationOutcome, ReplicationRequest, ZFSReplication
from handlers.types import SSHEndpoint, VCenterEndpoint


class SiteStorageStub(RecoveryStorageStub, FailoverStorageStub):
    def snapshot_guid(self, target: SSHEndpoint, snapshot: str, stop: threading.Event) -> str | None:
        dataset, _, snap = snapshot.partition("@")
        ds = self._ds(target, dataset)
        if ds is not None:
            hit = next((s for s in ds["snapshots"] if s[0] == snap), None)
            return None if hit is None else str(hit[1])
        return super().snapshot_guid(target, snapshot, stop)

    def export(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
               clients: Sequence[str] | None = None) -> str:
        if self._world.read("clones", dataset) is not None:
            return super().export(target, dataset, stop, clients)
        self._begin(stop, "the export")
        if self._ds(target, dataset) is None:
            raise PermanentError(f"dataset {dataset!r} does not exist on {target.host}: nothing to export")
        made = self._world.create_once("exports", dataset, content="/" + dataset)
        self._world.record("recovery.export", dataset, "exported" if made else "already-exported")
        return "/" + dataset

    def export_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
                       clients: Sequence[str] | None = None) -> str:
        return self.export(target, dataset, stop, clients)

    def unexport_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        return self.unexport(target, dataset, stop)

    def received(self, endpoint: SSHEndpoint, dataset: str, snapshot: str, guid: str, readonly: bool) -> None:
        """What the replication stub did, as the failover stubs see a host: ``dataset@snapshot``."""
        with self._world.locked("fo-ds", endpoint.host, dataset):
            ds = self._ds(endpoint, dataset) or {"snapshots": [], "written": 0, "mounted": True, "readonly": readonly}
            if all(s[0] != snapshot for s in ds["snapshots"]):
                ds["snapshots"].append([snapshot, guid, ds["written"], datetime.now(timezone.utc).isoformat()])
                self._put(endpoint, dataset, ds)


class SiteComputeStub(RecoveryComputeStub, FailoverComputeStub):
    def __init__(self, seconds: float = 0.0, jitter: float = 0.0, world: StubWorld | None = None,
                 shells: Callable[[VCenterEndpoint], set[str]] | None = None) -> None:
        """``shells``: without a shared world, the DR shell stub's shells (made powered off there)."""
        super().__init__(seconds, jitter, world)
        self._shells = shells

    def _vm(self, vcenter: VCenterEndpoint, moref: str) -> dict[str, Any]:
        vm = super()._vm(vcenter, moref)
        if self._shells is not None and self._world.read("fo-vm", vcenter.id, moref) is None \
                and moref in self._shells(vcenter):
            vm["state"] = "poweredOff"
        return vm

    def power_on(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
        boot = super().power_on(vcenter, moref, stop)
        with self._world.locked("fo-vm", vcenter.id, moref):
            vm = self._vm(vcenter, moref)
            if vm["state"] != "poweredOn":
                vm.update(state="poweredOn", changed_at=boot)
                self._save(vcenter, moref, vm)
        return boot

    def shutdown_vm(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float, force_power_off: bool,
                    stop: threading.Event) -> ShutdownResult:
        done = super().shutdown_vm(vcenter, moref, timeout_seconds, force_power_off, stop)
        self._world.remove("power", vcenter.id, moref)  # a later power-on boots it again
        return done


class SiteReplicationStub:
    """The engine's replication stub for a run's own replications, keeping the failover stubs'
    view of both hosts in step (the snapshot on both, one GUID: the replica listing's)."""

    def __init__(self, inner: ZFSReplication, storage: SiteStorageStub) -> None:
        self._inner = inner
        self._storage = storage

    def replicate(self, request: ReplicationRequest, progress: ProgressSink,
                  cancel: threading.Event) -> ReplicationOutcome:
        outcome = self._inner.replicate(request, progress, cancel)
        replica = request.source_dataset if request.direction == "reverse" else request.target_dataset
        guid = fake_guid(replica, outcome.snapshot_name)
        if request.source is not None:
            self._storage.received(request.source, request.source_dataset, outcome.snapshot_name, guid, False)
        self._storage.received(request.target, request.target_dataset, outcome.snapshot_name, guid, True)
        return outcome
