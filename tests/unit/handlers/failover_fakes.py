"""In-memory fakes of both sites for the failover runner's unit tests: two storage hosts with ZFS-like
datasets (snapshots carry GUIDs and the dataset's write counter when they were taken, so
``written_since`` and incremental receives behave), two vCenters with VMs that have power states,
disks and NICs, and a replication that refuses what ``zfs receive`` would refuse.

``World`` builds the usual picture: a primary dataset and its replica sharing one snapshot, each
protected VM running at the primary with a powered-off DR shell whose disks are on the DR datastore.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from handlers.errors import PermanentError, TransientError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic, Readiness
from handlers.recovery.failover_backends import AttachResult, NicChange, PowerState, ShutdownResult, SnapshotInfo, Written
from handlers.replication import RecoveryPoint, ReplicationOutcome, ReplicationRequest
from handlers.types import SSHEndpoint, VCenterEndpoint
from tests.unit.handlers.recovery_fakes import FakeCompute, FakeStorage, Killed

RUN_ID = "1234abcd-0000-4000-8000-0000000000f1"
PRIMARY_HOST, DR_HOST = "10.0.0.5", "10.0.0.9"
SOURCE_DS, REPLICA_DS = "pool/vms/gold", "tank/replicas/gold"
DR_DATASTORE, PROTECTION_DS = "dr-ds", "protect-ds"
_guids = itertools.count(10**19)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def host_of(endpoint: SSHEndpoint | None) -> str:
    return endpoint.host if endpoint is not None else "local"


@dataclass
class Dataset:
    snaps: list[tuple[str, str, int]] = field(default_factory=list)  # name, guid, write counter then
    written: int = 0
    readonly: bool = True
    mounted: bool = True
    marks: dict[str, str] = field(default_factory=dict)  # snapshot -> zerfaux:recovery_run

    def names(self) -> list[str]:
        return [s[0] for s in self.snaps]

    def snap(self, name: str) -> tuple[str, str, int] | None:
        return next((s for s in self.snaps if s[0] == name), None)


class FakeFailoverStorage(FakeStorage):
    """Both storage hosts: datasets keyed by (host, name)."""

    def __init__(self) -> None:
        super().__init__()
        self.ds: dict[tuple[str, str], Dataset] = {}
        self.lock = threading.Lock()
        self.keys_loaded: list[str] = []

    def put(self, host: str, name: str, snaps: Sequence[tuple[str, str]] = (), written: int = 0,
            readonly: bool = True) -> Dataset:
        ds = Dataset([(n, g, 0) for n, g in snaps], written, readonly)
        self.ds[(host, name)] = ds
        return ds

    def get(self, target: SSHEndpoint | None, name: str) -> Dataset:
        ds = self.ds.get((host_of(target), name))
        if ds is None:
            raise PermanentError(f"{name} does not exist on {host_of(target)}")
        return ds

    def write(self, host: str, name: str, nbytes: int) -> None:
        self.ds[(host, name)].written += nbytes

    # RecoveryStorage

    def snapshot_guid(self, target: SSHEndpoint, snapshot: str, stop: threading.Event) -> str | None:
        name, _, snap = snapshot.partition("@")
        ds = self.ds.get((host_of(target), name))
        hit = ds.snap(snap) if ds else None
        return hit[1] if hit else None

    # FailoverStorage

    def export_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
                       clients: Sequence[str] | None = None) -> str:
        self.get(target, dataset)
        self.effects["export_replica"] += 1
        return self.export(target, dataset, stop, clients)

    def unexport_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        return self.unexport(target, dataset, stop)

    def snapshot(self, target: SSHEndpoint, dataset: str, name: str, stop: threading.Event,
                 run_id: str | None = None) -> SnapshotInfo:
        with self.lock:
            ds = self.get(target, dataset)
            hit = ds.snap(name)
            if hit:
                return SnapshotInfo(f"{dataset}@{name}", hit[1], created=False)
            guid = str(next(_guids))
            ds.snaps.append((name, guid, ds.written))
            if run_id:
                ds.marks[name] = run_id
            self.effects["snapshot"] += 1
        self._maybe_die("snapshot")
        return SnapshotInfo(f"{dataset}@{name}", guid, created=True)

    def rollback(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        ds = self.get(target, dataset)
        names = ds.names()
        if snapshot not in names:
            raise PermanentError(f"{dataset} has no snapshot @{snapshot}")
        if names[-1] != snapshot:
            raise PermanentError(f"@{snapshot} is not the newest snapshot of {dataset}: newer are {names[names.index(snapshot) + 1:]}")
        ds.written = ds.snaps[-1][2]
        self.effects["rollback"] += 1
        return (dataset,)

    def promote_writable(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> str:
        ds = self.get(target, dataset)
        ds.readonly, ds.mounted = False, True
        self.effects["writable"] += 1
        return "/" + dataset

    def written_since(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> Written:
        ds = self.get(target, dataset)
        hit = ds.snap(snapshot)
        if hit is None:
            raise PermanentError(f"{dataset}@{snapshot} does not exist")
        return Written(ds.written - hit[2], "written")

    def snapshots_after(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        names = self.get(target, dataset).names()
        return tuple(names[names.index(snapshot) + 1:]) if snapshot in names else ()

    def newest_common_snapshot(self, a: SSHEndpoint, a_ds: str, b: SSHEndpoint, b_ds: str,
                               stop: threading.Event) -> dict[str, Any] | None:
        theirs = {s[1] for s in self.get(b, b_ds).snaps}
        for name, guid, _ in reversed(self.get(a, a_ds).snaps):
            if guid in theirs:
                return {"name": name, "guid": guid, "created": _now()}
        return None

    def keep_changes(self, target: SSHEndpoint, dataset: str, common: str, tag: str, run_id: str,
                     stop: threading.Event) -> dict[str, Any]:
        suffix = "_zerfaux_kept_" + run_id.replace("-", "")[:8]
        kept_name = dataset + suffix
        with self.lock:
            key = (host_of(target), kept_name)
            if key not in self.ds:
                ds = self.get(target, dataset)
                snap = "zerfaux_kept_" + run_id.replace("-", "")[:8]
                ds.snaps.append((snap, str(next(_guids)), ds.written))
                self.holds.add((f"{kept_name}@{snap}", tag))
                self.ds[key] = ds
                base = ds.snap(common)
                assert base is not None
                clone = Dataset([base], base[2], ds.readonly)
                self.ds[(host_of(target), dataset)] = clone
                self.effects["keep"] += 1
        return {"kept_dataset": kept_name, "kept_snapshot": f"{kept_name}@zerfaux_kept_{run_id.replace('-', '')[:8]}",
                "hold_tag": tag, "clone": dataset}

    def discard_changes(self, target: SSHEndpoint, dataset: str, common: str, stop: threading.Event) -> tuple[str, ...]:
        ds = self.get(target, dataset)
        names = ds.names()
        gone = tuple(names[names.index(common) + 1:])
        ds.snaps = ds.snaps[:names.index(common) + 1]
        ds.written = ds.snaps[-1][2]
        self.effects["discard"] += 1
        return gone

    def load_key(self, target: SSHEndpoint, dataset: str, key_secret: str, stop: threading.Event) -> bool:
        self.keys_loaded.append(key_secret)
        return True

    def set_readonly(self, target: SSHEndpoint, dataset: str, on: bool, stop: threading.Event) -> bool:
        ds = self.get(target, dataset)
        changed = ds.readonly != on
        ds.readonly = on
        return changed

    def destroy_snapshot(self, target: SSHEndpoint, snapshot: str, run_id: str, stop: threading.Event) -> bool:
        name, _, snap = snapshot.partition("@")
        ds = self.get(target, name)
        if ds.snap(snap) is None:
            return False
        if ds.marks.get(snap) != run_id:
            raise PermanentError(f"{snapshot} is not run {run_id}'s")
        ds.snaps = [s for s in ds.snaps if s[0] != snap]
        self.effects["destroy_snapshot"] += 1
        return True

    def replace_with_clone(self, target: SSHEndpoint, dataset: str, clone: str, tag: str,
                           stop: threading.Event) -> dict[str, Any]:
        self.effects["replace"] += 1
        return {"superseded": dataset + "_zerfaux_superseded_" + tag.replace("-", "")[:8], "promoted": clone}


class FakeFailoverCompute(FakeCompute):
    """Both vCenters: VMs keyed by (vcenter id, moref)."""

    def __init__(self, networks: Sequence[str] = ("VM Network", "prod", "prod-b")) -> None:
        super().__init__(networks=networks)
        self.fvms: dict[tuple[str, str], dict[str, Any]] = {}
        self.stuck: set[str] = set()  # morefs whose guest ignores a shutdown
        self.unreachable: set[str] = set()  # vcenter ids that do not answer (TransientError)
        self.hang: set[str] = set()  # vcenter ids whose calls block until ``release`` is set
        self.release = threading.Event()
        self.log: list[tuple[str, str, str, float]] = []  # (what, vcenter id, moref, monotonic time)

    def put_vm(self, vc: str, moref: str, state: str, disks: Sequence[str] = (), nics: Sequence[str] = ()) -> None:
        self.fvms[(vc, moref)] = {"state": state, "changed_at": _now(), "disks": list(disks), "nics": list(nics)}

    def _get(self, vcenter: VCenterEndpoint, moref: str) -> dict[str, Any]:
        if vcenter.id in self.unreachable:
            raise TransientError(f"vCenter {vcenter.name} does not answer")
        if vcenter.id in self.hang:
            self.release.wait(10)
        vm = self.fvms.get((vcenter.id, moref))
        if vm is None:
            raise PermanentError(f"no VM {moref} at {vcenter.name}")
        return vm

    def shutdown_vm(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float, force_power_off: bool,
                    stop: threading.Event) -> ShutdownResult:
        vm = self._get(vcenter, moref)
        with self._lock:
            if vm["state"] == "poweredOff":
                return ShutdownResult("already_off", vm["changed_at"], 0.0)
            how = "guest"
            if moref in self.stuck:
                if not force_power_off:
                    raise PermanentError(f"VM {moref} did not power off within {timeout_seconds:g} s: shut it down "
                                         "by hand or set options.force_power_off to true")
                how = "power_off"
            vm.update(state="poweredOff", changed_at=_now())
            self.effects["shutdown"] += 1
            self.log.append(("off", vcenter.id, moref, time.monotonic()))
        self._maybe_die("shutdown_vm")
        return ShutdownResult(how, vm["changed_at"], 0.0)  # type: ignore[arg-type]

    def power_state(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> PowerState:
        vm = self._get(vcenter, moref)
        return PowerState(vm["state"], vm["changed_at"])

    def power_states(self, vcenter: VCenterEndpoint, morefs: Sequence[str], stop: threading.Event) -> dict[str, str]:
        if vcenter.id in self.unreachable:
            raise TransientError(f"vCenter {vcenter.name} does not answer")
        if vcenter.id in self.hang:
            self.release.wait(10)
        # One read for all; a moref with no VM is absent, as from vCenter.
        return {str(m): str(self.fvms[(vcenter.id, str(m))]["state"]) for m in morefs if (vcenter.id, str(m)) in self.fvms}

    def attach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, disks: Sequence[RecoveryDisk],
                     stop: threading.Event) -> AttachResult:
        vm = self._get(vcenter, shell_moref)
        for d in disks:
            store = d.file.split("]", 1)[0].lstrip("[")
            if store not in self.datastores:
                raise PermanentError(f"datastore {store!r} is not mounted at {vcenter.name}")
        todo = [d.file for d in disks if d.file not in vm["disks"]]
        vm["disks"] += todo
        self.effects["attach"] += len(todo)
        return AttachResult(tuple(todo), tuple(d.file for d in disks if d.file not in todo))

    def detach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, stop: threading.Event) -> tuple[str, ...]:
        vm = self._get(vcenter, shell_moref)
        if vm["disks"] and vm["state"] != "poweredOff":
            raise PermanentError(f"VM {shell_moref} is on: its disks stay")
        files, vm["disks"] = tuple(vm["disks"]), []
        self.effects["detach"] += len(files)
        return files

    def set_networks(self, vcenter: VCenterEndpoint, moref: str, nics: Sequence[RecoveryNic],
                     stop: threading.Event) -> tuple[NicChange, ...]:
        for nic in nics:
            if nic.network not in self.networks:
                raise PermanentError(f"network {nic.network!r} does not exist: fix network_mappings.recovery_network")
        vm = self._get(vcenter, moref)
        changes = tuple(NicChange(4000 + i, n.source_network, n.network, i >= len(vm["nics"]) or vm["nics"][i] != n.network)
                        for i, n in enumerate(nics))
        vm["nics"] = [n.network for n in nics]
        return changes

    def power_on(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
        with self._lock:
            vm = self._get(vcenter, moref)
            if vm["state"] != "poweredOn":
                vm.update(state="poweredOn", changed_at=_now())
                self.effects["power_on"] += 1
                self.log.append(("on", vcenter.id, moref, time.monotonic()))
        self._maybe_die("power_on")
        return str(vm["changed_at"])

    def wait_ready(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float,
                   stop: threading.Event) -> Readiness:
        if timeout_seconds <= 0:
            return Readiness(False, None, 0.0)
        return Readiness(True, "tools", 0.0)


class FakeReplication:
    """``zfs send | zfs receive`` between the fake storage's datasets: the job's snapshot is made once
    (a retry reuses it), the target must be unchanged since its newest snapshot, which the source
    must have with the same GUID, else the receive is refused as ZFS would (no -F)."""

    def __init__(self, storage: FakeFailoverStorage) -> None:
        self.storage = storage
        self.requests: list[ReplicationRequest] = []
        self.effects: Counter[str] = Counter()
        self.kill_in: str | None = None

    def replicate(self, request: ReplicationRequest, progress: Any, cancel: threading.Event) -> ReplicationOutcome:
        self.requests.append(request)
        s = self.storage
        with s.lock:
            src = s.get(request.source, request.source_dataset)
            name = "zerfaux_" + request.job_id.replace("-", "")[:12]
            hit = src.snap(name)
            if hit is None:
                hit = (name, str(next(_guids)), src.written)
                src.snaps.append(hit)
                self.effects["snapshot"] += 1
            key = (host_of(request.target), request.target_dataset)
            dst = s.ds.get(key)
            base = None
            if dst is None:
                s.ds[key] = dst = Dataset([hit], hit[2], True)
                sent = hit[2]
                self.effects["full"] += 1
            elif dst.snap(name) is None:
                newest = dst.snaps[-1]
                if src.snap(newest[0]) is None or src.snap(newest[0])[1] != newest[1]:  # type: ignore[index]
                    raise PermanentError(f"{request.target_dataset}'s newest snapshot @{newest[0]} is not on the source: "
                                         "refused (diverged)")
                if dst.written != newest[2]:
                    raise PermanentError(f"{request.target_dataset} was modified since @{newest[0]}: refused")
                base = newest[0]
                sent = hit[2] - src.snap(base)[2]  # type: ignore[index]
                dst.snaps.append(hit)
                dst.written = hit[2]
                self.effects["send"] += 1
            else:
                sent = 0
        if self.kill_in == "replicate":
            self.kill_in = None
            raise Killed()
        point = RecoveryPoint(name, hit[1], _now(), sent, True, True)
        return ReplicationOutcome(name, base, sent, sent, (), (point,))


def vm_entry(pid: str, name: str, priority: int = 3, networks: Sequence[str] = ("VM Network",),
             shutdown: int | None = None) -> dict[str, Any]:
    return {
        "protected_vm": {"id": pid, "boot_priority": priority, "boot_delay_seconds": 0, "tools_timeout_seconds": 300,
                         "dr_shell_vm_id": f"vm-dr-{pid}", "shutdown_timeout_seconds": shutdown},
        "vm": {"moref": f"vm-src-{pid}", "name": name, "num_cpu": 2, "memory_mb": 2048, "networks": list(networks),
               "disks": [{"file": f"[{PROTECTION_DS}] {name}/{name}.vmdk", "capacity": 16 * 1024**3,
                          "controller": "pvscsi"}]},
    }


def three_vms() -> list[dict[str, Any]]:
    return [vm_entry("p1", "db", priority=1), vm_entry("p2", "app", priority=2), vm_entry("p3", "web", priority=2)]


def payload(kind: str, vms: Sequence[Mapping[str, Any]] | None = None, run_id: str = RUN_ID,
            direction: str = "forward", options: Mapping[str, Any] | None = None,
            point: Mapping[str, Any] | None = None, acts_on_run: Mapping[str, Any] | None = None,
            acts_on_steps: Sequence[Mapping[str, Any]] = (), key_secret: str | None = None) -> dict[str, Any]:
    return {
        "run": {"id": run_id, "kind": kind, "options": dict(options or {}),
                "acts_on_run_id": acts_on_run["id"] if acts_on_run else None},
        "group": {"id": "g1", "name": "gold", "direction": direction, "protection_datastore": PROTECTION_DS,
                  "source_dataset": SOURCE_DS, "replica_name": "gold", "dr_cluster": None,
                  "encryption_key_secret": key_secret, "source_ssh_host": PRIMARY_HOST, "source_ssh_user": "zerfaux",
                  "source_ssh_key_secret": "src-key", "source_ssh_host_key": "src-hostkey"},
        "target": {"id": "t1", "name": "dr-zfs", "ssh_host": DR_HOST, "ssh_user": "zerfaux", "target_root": "tank/replicas",
                   "dr_datastore": DR_DATASTORE, "nfs_host_effective": "10.0.1.9"},
        "dr_vcenter": {"id": "vc-dr", "name": "vc-dr", "host": "vc-dr.local"},
        "source_vcenter": {"id": "vc-src", "name": "vc-src", "host": "vc.local"},
        "recovery_point": dict(point) if point else None,
        "replica_dataset": REPLICA_DS,
        "vms": list(three_vms() if vms is None else vms),
        "network_mappings": [{"source_network": "VM Network", "recovery_network": "prod", "test_network": None}],
        "steps": [],
        "acts_on_run": dict(acts_on_run) if acts_on_run else None,
        "acts_on_steps": list(acts_on_steps),
    }


class World:
    """Both sites as a run finds them before a forward planned migration or failover."""

    def __init__(self, vms: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.storage = FakeFailoverStorage()
        self.compute = FakeFailoverCompute()
        self.replication = FakeReplication(self.storage)
        self.vms = list(three_vms() if vms is None else vms)
        self.storage.put(PRIMARY_HOST, SOURCE_DS, [("zerfaux_s1", "111")], readonly=False)
        self.storage.put(DR_HOST, REPLICA_DS, [("zerfaux_s1", "111")])
        self.compute.datastores.add(DR_DATASTORE)
        self.compute.datastores.add(PROTECTION_DS)
        for entry in self.vms:
            vm, pv = entry["vm"], entry["protected_vm"]
            disk = vm["disks"][0]["file"].replace(f"[{PROTECTION_DS}]", f"[{DR_DATASTORE}]")
            self.compute.put_vm("vc-src", vm["moref"], "poweredOn", [vm["disks"][0]["file"]], vm["networks"])
            self.compute.put_vm("vc-dr", pv["dr_shell_vm_id"], "poweredOff", [disk], ["VM Network"])

    def state(self, vc: str, moref: str) -> str:
        return str(self.compute.fvms[(vc, moref)]["state"])
