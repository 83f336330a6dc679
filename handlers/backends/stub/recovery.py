"""Stub recovery backends: the DR storage host and the DR vCenter of a test failover, imagined.

They keep what makes the real ones idempotent (a hold is placed once, a clone carries the run's
mark, a test VM carrying the run's and the protected VM's marks is adopted, not made twice) in
the stub world: the shared, journaled one under ``ZERFAUX_STUB_WORLD`` (so a listener killed mid
step leaves what a real peer would, for the next one to adopt), else this process's memory.
Every effect is journaled (kind ``recovery.*``). Each effect takes ``seconds`` (+ jitter); a test
VM's Tools come up ``seconds`` after its power-on returned, so a ``tools_timeout_seconds`` shorter than
that times out as it would with a guest that has no Tools.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from handlers.backends.stub.backends import _digest, _duration, _interrupted, _pause
from handlers.backends.stub.points import fake_guid
from handlers.backends.stub.world import StubWorld
from handlers.errors import PermanentError
from handlers.recovery.backends import CloneInfo, Placement, Readiness, RecoveryVMSpec, SiteCheck, VMRef
from handlers.types import SSHEndpoint, VCenterEndpoint

TIB = 1024**4
STUB_DR_NETWORKS = ("VM Network", "dr-network", "test-network")
STUB_DR_HOSTS = ("esx-dr-01.stub.local", "esx-dr-02.stub.local")


class _MemoryWorld:
    """The part of StubWorld's interface the recovery stubs use, in this process only."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, ...], str] = {}
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, ...], threading.Lock] = {}

    def record(self, kind: str, subject: str, effect: str, **detail: Any) -> None:
        pass

    def create_once(self, *key: str, content: str) -> bool:
        with self._guard:
            if key in self._objects:
                return False
            self._objects[key] = content
            return True

    def read(self, *key: str) -> str | None:
        with self._guard:
            return self._objects.get(key)

    def write(self, *key: str, content: str) -> None:
        with self._guard:
            self._objects[key] = content

    def remove(self, *key: str) -> None:
        with self._guard:
            self._objects.pop(key, None)

    @contextlib.contextmanager
    def locked(self, *key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield


class _Stub:
    def __init__(self, seconds: float = 0.0, jitter: float = 0.0, world: StubWorld | None = None) -> None:
        self._seconds = seconds
        self._jitter = jitter
        self._shared = world is not None
        self._world: StubWorld | _MemoryWorld = world if world is not None else _MemoryWorld()

    def _begin(self, stop: threading.Event, what: str) -> None:
        if stop.is_set():
            raise _interrupted(stop, f"before {what}")

    def _take_time(self, stop: threading.Event) -> None:
        _pause(_duration(self._seconds, self._jitter), stop)


class RecoveryStorageStub(_Stub):
    """The DR storage host: holds, clones, NFS exports of the stub replica's snapshots."""

    def snapshot_guid(self, target: SSHEndpoint, snapshot: str, stop: threading.Event) -> str | None:
        dataset, _, snap = snapshot.partition("@")
        listing = self._world.read("replica", dataset)
        if self._shared:
            names = {str(e[0]) for e in json.loads(listing)} if listing else set()
            if snap not in names:
                return None
        # In memory the replica another process received is unknown: trust the point's name.
        return fake_guid(dataset, snap)

    def available_bytes(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> int:
        value = self._world.read("zfs-available", target.host, dataset)  # a test may make the pool full
        return int(value) if value is not None else 2 * TIB

    def hold(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        self._begin(stop, "the hold")
        placed = self._world.create_once("holds", snapshot, tag, content=tag)
        self._world.record("recovery.hold", snapshot, "held" if placed else "already-held", tag=tag)
        return placed

    def release(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        self._begin(stop, "the release")
        with self._world.locked("holds", snapshot, tag):
            there = self._world.read("holds", snapshot, tag) is not None
            self._world.remove("holds", snapshot, tag)
        self._world.record("recovery.hold", snapshot, "released" if there else "already-released", tag=tag)
        return there

    def clone(self, target: SSHEndpoint, snapshot: str, dataset: str, run_id: str,
              stop: threading.Event) -> CloneInfo:
        self._begin(stop, "the clone")
        mark = json.dumps({"origin": snapshot, "run_id": run_id})
        made = self._world.create_once("clones", dataset, content=mark)
        if not made:
            existing = json.loads(self._world.read("clones", dataset) or "{}")
            if existing != {"origin": snapshot, "run_id": run_id}:
                raise PermanentError(f"dataset {dataset!r} exists on the DR storage host and is not this run's "
                                     f"clone of {snapshot!r}: rename or destroy it by hand")
        self._world.record("recovery.clone", dataset, "cloned" if made else "adopted", origin=snapshot)
        if made:
            self._take_time(stop)
        return CloneInfo(dataset=dataset, origin=snapshot, mountpoint="/" + dataset, adopted=not made)

    def export(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> str:
        self._begin(stop, "the export")
        if self._world.read("clones", dataset) is None:
            raise PermanentError(f"dataset {dataset!r} does not exist on the DR storage host: nothing to export")
        made = self._world.create_once("exports", dataset, content="/" + dataset)
        self._world.record("recovery.export", dataset, "exported" if made else "already-exported")
        return "/" + dataset

    def unexport(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        self._begin(stop, "the unexport")
        there = self._world.read("exports", dataset) is not None
        self._world.remove("exports", dataset)
        self._world.record("recovery.export", dataset, "unexported" if there else "already-unexported")
        return there

    def destroy_clone(self, target: SSHEndpoint, dataset: str, run_id: str, stop: threading.Event) -> bool:
        self._begin(stop, "destroying the clone")
        with self._world.locked("clones", dataset):
            text = self._world.read("clones", dataset)
            if text is None:
                self._world.record("recovery.clone", dataset, "already-destroyed")
                return False
            if json.loads(text).get("run_id") != run_id:
                raise PermanentError(f"dataset {dataset!r} is not a clone of run {run_id}: left alone")
            self._world.remove("exports", dataset)
            self._world.remove("clones", dataset)
        self._world.record("recovery.clone", dataset, "destroyed")
        return True


class RecoveryComputeStub(_Stub):
    """The DR vCenter: two hosts in one cluster, NAS datastores, port groups, test VMs."""

    def check_site(self, vcenter: VCenterEndpoint, networks: Sequence[str], cluster: str | None,
                   stop: threading.Event) -> SiteCheck:
        self._begin(stop, "checking the DR site")
        missing = tuple(n for n in networks if n not in STUB_DR_NETWORKS
                        and self._world.read("port-groups", vcenter.id, n) is None)
        return SiteCheck(missing, Placement("dc-dr", cluster or "cluster-dr-01", STUB_DR_HOSTS))

    def present_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          remote_host: str, remote_path: str, stop: threading.Event) -> bool:
        self._begin(stop, "presenting the datastore")
        remote = f"{remote_host}:{remote_path}"
        made = self._world.create_once("datastores", vcenter.id, name, content=remote)
        if not made and self._world.read("datastores", vcenter.id, name) != remote:
            raise PermanentError(f"datastore {name!r} exists at the DR vCenter backed by something else: "
                                 "remove it there")
        self._world.record("recovery.datastore", name, "mounted" if made else "already-mounted", remote=remote,
                           hosts=len(placement.hosts))
        return made

    def remove_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                         stop: threading.Event) -> str | None:
        self._begin(stop, "removing the datastore")
        there = self._world.read("datastores", vcenter.id, name) is not None
        self._world.remove("datastores", vcenter.id, name)
        self._world.record("recovery.datastore", name, "unmounted" if there else "already-unmounted")
        return None

    def create_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        self._begin(stop, "creating the port group")
        made = self._world.create_once("port-groups", vcenter.id, name, content=json.dumps(list(placement.hosts)))
        self._world.record("recovery.port_group", name, "created" if made else "already-there")
        return made

    def remove_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        self._begin(stop, "removing the port group")
        there = self._world.read("port-groups", vcenter.id, name) is not None
        self._world.remove("port-groups", vcenter.id, name)
        self._world.record("recovery.port_group", name, "removed" if there else "already-removed")
        return there

    def _run_vms(self, vcenter: VCenterEndpoint, run_id: str) -> dict[str, Any]:
        return dict(json.loads(self._world.read("run-vms", vcenter.id, run_id) or "{}"))

    def create_vm(self, vcenter: VCenterEndpoint, placement: Placement, spec: RecoveryVMSpec,
                  stop: threading.Event) -> VMRef:
        self._begin(stop, f"creating {spec.name!r}")
        if self._world.read("datastores", vcenter.id, spec.datastore) is None:
            raise PermanentError(f"datastore {spec.datastore!r} is not mounted at the DR vCenter")
        for nic in spec.nics:
            if nic.network not in STUB_DR_NETWORKS and self._world.read("port-groups", vcenter.id, nic.network) is None:
                raise PermanentError(f"network {nic.network!r} does not exist at the DR vCenter")
        # CreateVM_Task registers the VM with its marks at once and configures it after: a
        # worker that dies in between leaves a VM the next attempt adopts.
        with self._world.locked("run-vms", vcenter.id, spec.run_id):
            vms = self._run_vms(vcenter, spec.run_id)
            if spec.protected_vm_id in vms:
                moref = str(vms[spec.protected_vm_id]["moref"])
                self._world.record("recovery.vm", spec.protected_vm_id, "adopted", moref=moref)
                return VMRef(moref, adopted=True)
            moref = f"vm-{200000 + _digest(vcenter.id, spec.run_id, spec.protected_vm_id) % 700000}"
            vms[spec.protected_vm_id] = {"moref": moref, "name": spec.name}
            self._world.write("run-vms", vcenter.id, spec.run_id, content=json.dumps(vms))
            self._world.write("vm-owner", vcenter.id, moref, content=spec.run_id)
        self._world.record("recovery.vm", spec.protected_vm_id, "created", moref=moref, name=spec.name[:200])
        self._take_time(stop)
        return VMRef(moref, adopted=False)

    def power_on(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
        self._begin(stop, f"powering on {moref}")
        boot = datetime.now(timezone.utc).isoformat()
        if self._world.create_once("power", vcenter.id, moref, content=boot):
            self._world.record("recovery.vm", moref, "powered-on", boot_time=boot)
            self._take_time(stop)
            return boot
        return self._world.read("power", vcenter.id, moref) or boot

    def wait_ready(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float,
                   stop: threading.Event) -> Readiness:
        if timeout_seconds <= 0:
            return Readiness(False, None, 0.0)
        started = time.monotonic()
        boot = datetime.fromisoformat(self._world.read("power", vcenter.id, moref) or
                                      datetime.now(timezone.utc).isoformat())
        tools_at = boot.timestamp() + 2 * self._seconds  # power-on takes `seconds`, the guest as long again
        wait = max(0.0, tools_at - time.time())
        if wait > timeout_seconds:
            _pause(timeout_seconds, stop)
            return Readiness(False, None, time.monotonic() - started)
        _pause(wait, stop)
        self._world.record("recovery.vm", moref, "ready", how="tools")
        return Readiness(True, "tools", time.monotonic() - started)

    def destroy_vm(self, vcenter: VCenterEndpoint, moref: str, run_id: str, stop: threading.Event) -> bool:
        self._begin(stop, f"destroying {moref}")
        owner = self._world.read("vm-owner", vcenter.id, moref)
        if owner is None:
            self._world.record("recovery.vm", moref, "already-destroyed")
            return False
        if owner != run_id:
            raise PermanentError(f"VM {moref} at the DR vCenter does not carry run {run_id}'s mark: left alone")
        with self._world.locked("run-vms", vcenter.id, run_id):
            vms = {k: v for k, v in self._run_vms(vcenter, run_id).items() if v.get("moref") != moref}
            self._world.write("run-vms", vcenter.id, run_id, content=json.dumps(vms))
            self._world.remove("power", vcenter.id, moref)
            self._world.remove("vm-owner", vcenter.id, moref)
        self._world.record("recovery.vm", moref, "destroyed")
        return True

    def find_run_vms(self, vcenter: VCenterEndpoint, run_id: str, stop: threading.Event) -> dict[str, str]:
        return {pid: str(v["moref"]) for pid, v in self._run_vms(vcenter, run_id).items()}
