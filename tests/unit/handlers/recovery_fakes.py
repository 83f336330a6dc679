"""In-memory fakes of the recovery Protocols and of the engine's context, for the runner's unit tests.

``FakeDB`` keeps a run's steps as ``zerfaux.progress_recovery_run`` would (a plan inserts missing
seqs as 'pending'; a step update merges its detail). ``FakeCtx.kill_at`` simulates SIGKILL: the
n-th record call (or, with ``after=True``, the moment after it landed) raises ``Killed`` and every
later one too, so nothing more is written by that attempt, as with a dead process.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from handlers.context import StopSignal
from handlers.errors import OperationStopped, TransientError
from handlers.recovery.backends import CloneInfo, Placement, Readiness, RecoveryVMSpec, SiteCheck, VMRef
from handlers.types import SSHEndpoint, VCenterEndpoint

RUN_ID = "1234abcd-0000-4000-8000-000000000001"
GUID = "18446744073709551557"


class Killed(BaseException):
    """The process died here: nothing after it runs, nothing is recorded."""


class FakeDB:
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}
        self.writes: list[Mapping[str, Any]] = []

    def apply(self, progress: Mapping[str, Any]) -> None:
        self.writes.append(progress)
        for entry in progress.get("plan", []):
            self.steps.setdefault(entry["seq"], {**entry, "status": "pending", "detail": {}, "error": None})
        for entry in progress.get("steps", []):
            row = self.steps[entry["seq"]]
            row["status"] = entry["status"]
            row["detail"] = {**row["detail"], **entry.get("detail", {})}
            row["error"] = entry.get("error")
            if entry["status"] in ("done", "warning", "failed", "skipped"):
                row["finished_at"] = time.monotonic()
            if entry["status"] == "running":
                row["started_at"] = time.monotonic()

    def rows(self) -> list[dict[str, Any]]:
        return [dict(r, detail=dict(r["detail"])) for _, r in sorted(self.steps.items())]

    def by_name(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r["name"] == name]


class FakeCtx:
    def __init__(self, db: FakeDB, kill_at: int | None = None, after: bool = False,
                 cancel_at: int | None = None) -> None:
        self.operation_id = uuid.uuid4()
        self.kind = "recovery.run"
        self.attempt = 1
        self.stop = StopSignal()
        self.cancel = self.stop
        self.db = db
        self.calls = 0
        self.kill_at, self.after, self.cancel_at = kill_at, after, cancel_at
        self.dead = False
        self.store_down = 0  # this many record calls fail as an unavailable store would

    async def record(self, progress: Mapping[str, Any]) -> None:
        if self.dead:
            raise Killed()
        self.calls += 1
        if self.store_down:
            self.store_down -= 1
            raise TransientError("the store is unavailable")
        if self.kill_at == self.calls and not self.after:
            self.dead = True
            raise Killed()
        self.db.apply(progress)
        if self.kill_at == self.calls and self.after:
            self.dead = True
            raise Killed()
        if self.cancel_at == self.calls:
            self.stop.cancel()

    async def report(self, progress: Mapping[str, Any]) -> None:
        raise AssertionError("the runner must use record, not report")


class FakeStorage:
    def __init__(self, guid: str | None = GUID, available: int = 10 * 1024**4) -> None:
        self.guid, self.available = guid, available
        self.holds: set[tuple[str, str]] = set()
        self.clones: dict[str, tuple[str, str]] = {}
        self.exports: set[str] = set()
        self.effects: Counter[str] = Counter()
        self.kill_in: str | None = None  # die in this method, after its effect

    def _maybe_die(self, what: str) -> None:
        if self.kill_in == what:
            self.kill_in = None
            raise Killed()

    def snapshot_guid(self, target: SSHEndpoint, snapshot: str, stop: threading.Event) -> str | None:
        return self.guid

    def available_bytes(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> int:
        return self.available

    def hold(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        placed = (snapshot, tag) not in self.holds
        self.holds.add((snapshot, tag))
        self.effects["hold"] += placed
        self._maybe_die("hold")
        return placed

    def release(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        there = (snapshot, tag) in self.holds
        self.holds.discard((snapshot, tag))
        return there

    def clone(self, target: SSHEndpoint, snapshot: str, dataset: str, run_id: str,
              stop: threading.Event) -> CloneInfo:
        made = dataset not in self.clones
        if made:
            self.clones[dataset] = (snapshot, run_id)
            self.effects["clone"] += 1
        self._maybe_die("clone")
        return CloneInfo(dataset, snapshot, "/" + dataset, adopted=not made)

    def export(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> str:
        self.exports.add(dataset)
        self._maybe_die("export")
        return "/" + dataset

    def unexport(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        there = dataset in self.exports
        self.exports.discard(dataset)
        return there

    def destroy_clone(self, target: SSHEndpoint, dataset: str, run_id: str, stop: threading.Event) -> bool:
        return self.clones.pop(dataset, None) is not None


class FakeCompute:
    def __init__(self, networks: Sequence[str] = ("VM Network", "lab-net"), ready: bool = True,
                 not_ready: Sequence[str] = ()) -> None:
        self.networks = set(networks)
        self.datastores: set[str] = set()
        self.port_groups: set[str] = set()
        self.vms: dict[str, dict[str, Any]] = {}  # moref -> {run_id, protected_vm_id, spec, on}
        self.effects: Counter[str] = Counter()
        self.events: list[tuple[str, str, float]] = []  # (what, vm name, monotonic time)
        self.not_ready = set(not_ready)  # source VM names whose Tools never come up
        self.kill_in: str | None = None
        self.ready_delay = 0.05
        self._lock = threading.Lock()
        self._ids = iter(range(1000, 100000))

    def _maybe_die(self, what: str) -> None:
        if self.kill_in == what:
            self.kill_in = None
            raise Killed()

    def check_site(self, vcenter: VCenterEndpoint, networks: Sequence[str], cluster: str | None,
                   stop: threading.Event) -> SiteCheck:
        missing = tuple(n for n in networks if n not in self.networks)
        return SiteCheck(missing, Placement("dc", cluster or "cluster-1", ("esx-1", "esx-2")))

    def present_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str, remote_host: str,
                          remote_path: str, stop: threading.Event) -> bool:
        made = name not in self.datastores
        self.datastores.add(name)
        self.effects["datastore"] += made
        self._maybe_die("present_datastore")
        return made

    def remove_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                         stop: threading.Event) -> str | None:
        self.datastores.discard(name)
        return None

    def create_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        made = name not in self.port_groups
        self.port_groups.add(name)
        self.networks.add(name)
        self.effects["port_group"] += made
        return made

    def remove_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        there = name in self.port_groups
        self.port_groups.discard(name)
        return there

    def create_vm(self, vcenter: VCenterEndpoint, placement: Placement, spec: RecoveryVMSpec,
                  stop: threading.Event) -> VMRef:
        with self._lock:
            for moref, vm in self.vms.items():
                if (vm["run_id"], vm["protected_vm_id"]) == (spec.run_id, spec.protected_vm_id):
                    return VMRef(moref, adopted=True)
            moref = f"vm-{next(self._ids)}"
            self.vms[moref] = {"run_id": spec.run_id, "protected_vm_id": spec.protected_vm_id, "spec": spec,
                               "on": False}
            self.effects["vm"] += 1
        self._maybe_die("create_vm")
        return VMRef(moref, adopted=False)

    def power_on(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
        vm = self.vms[moref]
        if not vm["on"]:
            vm["on"] = True
            vm["boot"] = datetime.now(timezone.utc).isoformat()
            self.effects["power_on"] += 1
            self.events.append(("power_on", vm["spec"].name, time.monotonic()))
        self._maybe_die("power_on")
        return str(vm["boot"])

    def wait_ready(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float,
                   stop: threading.Event) -> Readiness:
        vm = self.vms[moref]
        source = vm["spec"].name.rsplit("-test-", 1)[0]
        if timeout_seconds <= 0:
            return Readiness(False, None, 0.0)
        if source in self.not_ready:
            stop.wait(min(timeout_seconds, 0.2))
            return Readiness(False, None, timeout_seconds)
        stop.wait(self.ready_delay)
        if stop.is_set():
            raise OperationStopped("stopped") if getattr(stop, "reason", "") == "stop" else Killed()
        self.events.append(("ready", vm["spec"].name, time.monotonic()))
        return Readiness(True, "tools", self.ready_delay)

    def destroy_vm(self, vcenter: VCenterEndpoint, moref: str, run_id: str, stop: threading.Event) -> bool:
        vm = self.vms.pop(moref, None)
        return vm is not None

    def find_run_vms(self, vcenter: VCenterEndpoint, run_id: str, stop: threading.Event) -> dict[str, str]:
        return {vm["protected_vm_id"]: m for m, vm in self.vms.items() if vm["run_id"] == run_id}


def vm_entry(pid: str, name: str, priority: int = 3, networks: Sequence[str] = ("VM Network",),
             delay: int = 0, timeout: int = 300) -> dict[str, Any]:
    return {
        "protected_vm": {"id": pid, "boot_priority": priority, "boot_delay_seconds": delay,
                         "tools_timeout_seconds": timeout},
        "vm": {"name": name, "num_cpu": 2, "memory_mb": 2048, "guest_id": "ubuntu64Guest", "firmware": "efi",
               "networks": list(networks),
               "disks": [{"file": f"[protect-ds] {name}/{name}.vmdk", "capacity": 16 * 1024**3,
                          "controller": "pvscsi"}]},
    }


def payload(vms: Sequence[Mapping[str, Any]], kind: str = "test", run_id: str = RUN_ID,
            mappings: Sequence[Mapping[str, Any]] | None = None, steps: Sequence[Mapping[str, Any]] = (),
            test_steps: Sequence[Mapping[str, Any]] = (), test_run_id: str | None = None) -> dict[str, Any]:
    return {
        "run": {"id": run_id, "kind": kind, "test_run_id": test_run_id},
        "group": {"id": "g1", "name": "gold", "protection_datastore": "protect-ds", "dr_cluster": None},
        "target": {"id": "t1", "name": "dr-zfs", "ssh_host": "10.0.0.9", "ssh_user": "zerfaux",
                   "target_root": "tank/replicas", "nfs_host_effective": "10.0.1.9"},
        "dr_vcenter": {"id": "vc-dr", "name": "vc-dr", "host": "vc-dr.local"},
        "source_vcenter": {"id": "vc-src", "name": "vc-src", "host": "vc.local"},
        "recovery_point": {"id": "rp1", "snapshot_name": "zerfaux-20261201", "guid": GUID},
        "replica_dataset": "tank/replicas/gold",
        "vms": list(vms),
        "network_mappings": list(mappings if mappings is not None else
                                 [{"source_network": "VM Network", "recovery_network": "prod",
                                   "test_network": None}]),
        "steps": list(steps),
        "test_run": {"id": test_run_id, "kind": "test", "status": "active"} if test_run_id else None,
        "test_steps": list(test_steps),
    }
