"""Stub failover backends (issue 14 groundwork): the same contracts as the real ones, imagined.

State lives in the stub world (shared and journaled under ``ZERFAUX_STUB_WORLD``, else this
process's memory), so a retry converges as it would against a real peer. A VM the stub has not
seen is powered on with VMware Tools running; ``put_vm`` makes one that has no Tools or whose
guest ignores a shutdown. A dataset the stub has not seen takes the snapshots of the stub
replica (``replica`` in the world) or none; ``write_data`` plays a DR VM writing to it. Names are
checked like the real backend's, before anything else.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from handlers.backends.stub.backends import _pause
from handlers.backends.stub.points import fake_guid
from handlers.backends.stub.recovery import STUB_DR_NETWORKS, _Stub
from handlers.backends.zfs.validate import check_dataset, check_snapshot
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic
from handlers.recovery.failover_backends import (
    SUPERSEDED_PREFIX,
    AttachResult,
    CommonSnapshot,
    KeptChanges,
    NicChange,
    PowerState,
    ShutdownResult,
    SnapshotInfo,
    Written,
    kept_names,
)
from handlers.types import SSHEndpoint, VCenterEndpoint


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class FailoverComputeStub(_Stub):
    def _vm(self, vcenter: VCenterEndpoint, moref: str) -> dict[str, Any]:
        text = self._world.read("fo-vm", vcenter.id, moref)
        base = {"state": "poweredOn", "tools": True, "obeys": True, "changed_at": None, "disks": [], "nics": []}
        return {**base, **json.loads(text)} if text else base

    def _save(self, vcenter: VCenterEndpoint, moref: str, vm: dict[str, Any]) -> None:
        self._world.write("fo-vm", vcenter.id, moref, content=json.dumps(vm))

    def put_vm(self, vcenter: VCenterEndpoint, moref: str, state: str = "poweredOn", tools: bool = True,
               obeys: bool = True, nics: Sequence[str] = ()) -> None:
        """Make a VM: ``tools`` False has no VMware Tools, ``obeys`` False ignores a guest shutdown."""
        vm = self._vm(vcenter, moref)
        vm.update(state=state, tools=tools, obeys=obeys, changed_at=_now(), nics=list(nics))
        self._save(vcenter, moref, vm)

    def shutdown_vm(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float, force_power_off: bool,
                    stop: threading.Event) -> ShutdownResult:
        self._begin(stop, f"shutting down {moref}")
        started = time.monotonic()
        with self._world.locked("fo-vm", vcenter.id, moref):
            vm = self._vm(vcenter, moref)
            if vm["state"] == "poweredOff":
                return ShutdownResult("already_off", vm["changed_at"], 0.0)
            if vm["state"] == "poweredOn" and vm["tools"] and vm["obeys"]:
                self._take_time(stop)
                how = "guest"
            else:
                _pause(timeout_seconds, stop)
                if not force_power_off:
                    raise PermanentError(f"VM {moref} at the DR vCenter did not power off within {timeout_seconds:g} s: "
                                         "shut it down by hand or set options.force_power_off to true")
                how = "power_off"
            vm.update(state="poweredOff", changed_at=_now())
            self._save(vcenter, moref, vm)
        self._world.record("failover.vm", moref, "powered-off", how=how)
        return ShutdownResult(how, vm["changed_at"], round(time.monotonic() - started, 3))  # type: ignore[arg-type]

    def power_state(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> PowerState:
        self._begin(stop, f"reading {moref}'s power state")
        vm = self._vm(vcenter, moref)
        return PowerState(vm["state"], vm["changed_at"])

    def power_states(self, vcenter: VCenterEndpoint, morefs: Sequence[str], stop: threading.Event) -> dict[str, str]:
        self._begin(stop, f"reading {len(morefs)} VMs' power states")
        return {str(m): str(self._vm(vcenter, m)["state"]) for m in morefs}

    def attach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, disks: Sequence[RecoveryDisk],
                     stop: threading.Event) -> AttachResult:
        self._begin(stop, f"attaching disks to {shell_moref}")
        with self._world.locked("fo-vm", vcenter.id, shell_moref):
            vm = self._vm(vcenter, shell_moref)
            have = list(vm["disks"])
            todo = [d.file for d in disks if d.file not in have]
            for file in todo:
                store = file.split("]", 1)[0].lstrip("[")
                if self._world.read("datastores", vcenter.id, store) is None:
                    raise PermanentError(f"datastore {store!r} of {file} is not mounted at the DR vCenter: "
                                         "present the replica first")
            if todo:
                vm["disks"] = have + todo
                self._save(vcenter, shell_moref, vm)
                self._world.record("failover.disks", shell_moref, "attached", count=len(todo))
        return AttachResult(tuple(todo), tuple(d.file for d in disks if d.file in have))

    def detach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, stop: threading.Event) -> tuple[str, ...]:
        self._begin(stop, f"detaching disks from {shell_moref}")
        with self._world.locked("fo-vm", vcenter.id, shell_moref):
            vm = self._vm(vcenter, shell_moref)
            files = tuple(vm["disks"])
            if files and vm["state"] != "poweredOff":
                raise PermanentError(f"VM {shell_moref} is {vm['state']}: power it off before its disks are detached")
            if files:
                vm["disks"] = []
                self._save(vcenter, shell_moref, vm)
                self._world.record("failover.disks", shell_moref, "detached", count=len(files))
        return files

    def set_networks(self, vcenter: VCenterEndpoint, moref: str, nics: Sequence[RecoveryNic],
                     stop: threading.Event) -> tuple[NicChange, ...]:
        self._begin(stop, f"moving {moref}'s NICs")
        for nic in nics:
            if nic.network not in STUB_DR_NETWORKS and self._world.read("port-groups", vcenter.id, nic.network) is None:
                raise PermanentError(f"network {nic.network!r} does not exist at the DR vCenter: fix "
                                     f"network_mappings.recovery_network (for {nic.source_network!r})")
        with self._world.locked("fo-vm", vcenter.id, moref):
            vm = self._vm(vcenter, moref)
            current = list(vm["nics"])
            changes = []
            for i, nic in enumerate(nics):
                changed = i >= len(current) or current[i] != nic.network
                changes.append(NicChange(4000 + i if i < len(current) else -300 - i, nic.source_network,
                                         nic.network, changed))
                if i < len(current):
                    current[i] = nic.network
                else:
                    current.append(nic.network)
            if any(c.changed for c in changes):
                vm["nics"] = current
                self._save(vcenter, moref, vm)
                self._world.record("failover.nics", moref, "moved", networks=current[:8])
        return tuple(changes)


class FailoverStorageStub(_Stub):
    def _ds(self, target: SSHEndpoint, dataset: str) -> dict[str, Any] | None:
        text = self._world.read("fo-ds", target.host, dataset)
        if text:
            found = dict(json.loads(text))
            return None if found.get("gone") else found
        listing = self._world.read("replica", dataset)
        if listing is None:
            return None
        snaps = [[str(e[0]), fake_guid(dataset, str(e[0])), 0] for e in json.loads(listing)]
        return {"snapshots": snaps, "written": 0, "mounted": False, "readonly": False}

    def _put(self, target: SSHEndpoint, dataset: str, ds: dict[str, Any]) -> None:
        self._world.write("fo-ds", target.host, dataset, content=json.dumps(ds))

    def _need(self, target: SSHEndpoint, dataset: str) -> dict[str, Any]:
        ds = self._ds(target, dataset)
        if ds is None:
            raise PermanentError(f"{dataset} does not exist on the DR storage host")
        return ds

    def put_dataset(self, target: SSHEndpoint, dataset: str, snapshots: Sequence[str] = ()) -> None:
        check_dataset(dataset, "failover dataset")
        snaps = [[s, fake_guid(dataset, s), 0] for s in snapshots]
        self._put(target, dataset, {"snapshots": snaps, "written": 0, "mounted": False, "readonly": True})

    def write_data(self, target: SSHEndpoint, dataset: str, nbytes: int) -> None:
        """What a DR VM writing ``nbytes`` to the replica does to it."""
        with self._world.locked("fo-ds", target.host, dataset):
            ds = self._need(target, dataset)
            ds["written"] += nbytes
            self._put(target, dataset, ds)

    def snapshot(self, target: SSHEndpoint, dataset: str, name: str, stop: threading.Event,
                 run_id: str | None = None) -> SnapshotInfo:
        check_dataset(dataset, "failover dataset")
        check_snapshot(name, "snapshot name")
        self._begin(stop, f"snapshotting {dataset}@{name}")
        with self._world.locked("fo-ds", target.host, dataset):
            ds = self._need(target, dataset)
            hit = next((s for s in ds["snapshots"] if s[0] == name), None)
            if hit is not None:
                return SnapshotInfo(f"{dataset}@{name}", str(hit[1]), created=False)
            guid = fake_guid(dataset, name)
            ds["snapshots"].append([name, guid, ds["written"], _now()])
            if run_id is not None:
                ds.setdefault("marks", {})[name] = run_id
            self._put(target, dataset, ds)
        self._world.record("failover.snapshot", f"{dataset}@{name}", "created", guid=guid)
        return SnapshotInfo(f"{dataset}@{name}", guid, created=True)

    def rollback(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        check_dataset(dataset, "failover dataset")
        check_snapshot(snapshot, "rollback snapshot")
        self._begin(stop, f"rolling {dataset} back")
        with self._world.locked("fo-ds", target.host, dataset):
            ds = self._need(target, dataset)
            names = [s[0] for s in ds["snapshots"]]
            if snapshot not in names:
                raise PermanentError(f"{dataset} has no snapshot @{snapshot}: nothing was rolled back")
            newer = names[names.index(snapshot) + 1:]
            if newer:
                raise PermanentError(f"@{snapshot} is not the newest snapshot of {dataset}: newer are "
                                     f"{', '.join(dataset + '@' + n for n in newer)}. Nothing was rolled back")
            ds["written"] = ds["snapshots"][-1][2]
            self._put(target, dataset, ds)
        self._world.record("failover.rollback", f"{dataset}@{snapshot}", "rolled-back")
        return (dataset,)

    def promote_writable(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> str:
        check_dataset(dataset, "failover dataset")
        self._begin(stop, f"making {dataset} writable")
        with self._world.locked("fo-ds", target.host, dataset):
            ds = self._need(target, dataset)
            if not ds["mounted"] or ds["readonly"]:
                ds.update(mounted=True, readonly=False)
                self._put(target, dataset, ds)
                self._world.record("failover.mount", dataset, "mounted")
        return "/" + dataset

    def written_since(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> Written:
        check_dataset(dataset, "failover dataset")
        check_snapshot(snapshot, "snapshot")
        ds = self._need(target, dataset)
        hit = next((s for s in ds["snapshots"] if s[0] == snapshot), None)
        if hit is None:
            raise PermanentError(f"{dataset}@{snapshot} does not exist on the DR storage host")
        return Written(int(ds["written"]) - int(hit[2]), "written")

    def rename(self, target: SSHEndpoint, dataset: str, new_name: str, stop: threading.Event) -> bool:
        check_dataset(dataset, "failover dataset")
        check_dataset(new_name, "new dataset name")
        self._begin(stop, f"renaming {dataset}")
        with self._world.locked("fo-ds", target.host, dataset):
            ds, there = self._ds(target, dataset), self._ds(target, new_name)
            if there is not None:
                if ds is None and there.get("renamed_from") == dataset:
                    return False
                raise PermanentError(f"{new_name} exists on the DR storage host: Zerfaux never renames over a "
                                     f"dataset; {dataset} was left as it is")
            if ds is None:
                raise PermanentError(f"{dataset} does not exist on the DR storage host: nothing to rename")
            self._put(target, new_name, {**ds, "renamed_from": dataset})
            # A tombstone, not a removal: else the stub replica's listing would bring the old name back.
            self._put(target, dataset, {"gone": True})
        self._world.record("failover.rename", dataset, "renamed", to=new_name)
        return True

    # ---- reprotect (either site's host) ----

    def _snaps_of(self, target: SSHEndpoint, dataset: str, mirror: tuple[SSHEndpoint, str] | None = None
                  ) -> list[list[Any]]:
        ds = self._ds(target, dataset)
        if ds is None and mirror is not None and self._world.read("fo-ds", target.host, dataset) is None:
            other = self._ds(*mirror)  # a dataset the stub never saw holds what the other side holds
            if other is not None:
                self._put(target, dataset, {**other, "written": 0, "mounted": True, "readonly": False})
                ds = self._ds(target, dataset)
        if ds is None:
            raise PermanentError(f"{dataset} does not exist on {target.host}")
        return list(ds["snapshots"])

    def newest_common_snapshot(self, a: SSHEndpoint, a_ds: str, b: SSHEndpoint, b_ds: str,
                               stop: threading.Event) -> CommonSnapshot | None:
        check_dataset(a_ds, "dataset")
        check_dataset(b_ds, "dataset")
        self._begin(stop, f"matching {a_ds} and {b_ds}")
        b_snaps = self._snaps_of(b, b_ds, (a, a_ds))
        a_snaps = self._snaps_of(a, a_ds, (b, b_ds))
        guids = {str(s[1]) for s in b_snaps}
        for snap in reversed(a_snaps):
            if str(snap[1]) in guids:
                return CommonSnapshot(str(snap[0]), str(snap[1]), str(snap[3]) if len(snap) > 3 else _now())
        return None

    def snapshots_after(self, target: SSHEndpoint, ds: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        check_dataset(ds, "dataset")
        check_snapshot(snapshot, "snapshot")
        self._begin(stop, f"listing {ds}")
        names = [str(s[0]) for s in self._need(target, ds)["snapshots"]]
        if snapshot not in names:
            raise PermanentError(f"{ds}@{snapshot} does not exist on {target.host}")
        return tuple(names[names.index(snapshot) + 1:])

    def keep_changes(self, target: SSHEndpoint, ds: str, common: str, tag: str, run_id: str,
                     stop: threading.Event) -> KeptChanges:
        check_dataset(ds, "dataset")
        check_snapshot(common, "common snapshot")
        check_snapshot(tag, "hold tag")
        kept, snap = kept_names(ds, run_id)
        check_dataset(kept, "kept dataset")
        result = KeptChanges(kept, f"{kept}@{snap}", tag, ds)
        self._begin(stop, f"keeping what {ds} holds beyond @{common}")
        with self._world.locked("fo-ds", target.host, ds):
            there = self._ds(target, kept)
            if there is not None and there.get("renamed_from") == ds:
                return result  # an earlier call kept them
            if there is not None:
                raise PermanentError(f"{kept} exists on {target.host} and is not this run's: nothing was changed")
            cur = self._need(target, ds)
            names = [str(s[0]) for s in cur["snapshots"]]
            if common not in names:
                raise PermanentError(f"{ds}@{common} does not exist on {target.host}: nothing was changed")
            snaps = [*cur["snapshots"], [snap, fake_guid(kept, snap), cur["written"], _now()]]
            self._put(target, kept, {**cur, "snapshots": snaps, "renamed_from": ds, "holds": [tag]})
            upto = snaps[: names.index(common) + 1]
            self._put(target, ds, {"snapshots": upto, "written": upto[-1][2], "mounted": cur["mounted"],
                                   "readonly": cur["readonly"], "origin": f"{kept}@{common}"})
        self._world.record("failover.keep", ds, "kept", to=kept)
        return result

    def discard_changes(self, target: SSHEndpoint, ds: str, common: str, stop: threading.Event) -> tuple[str, ...]:
        check_dataset(ds, "dataset")
        check_snapshot(common, "common snapshot")
        self._begin(stop, f"rolling {ds} back to @{common}")
        with self._world.locked("fo-ds", target.host, ds):
            cur = self._need(target, ds)
            names = [str(s[0]) for s in cur["snapshots"]]
            if common not in names:
                raise PermanentError(f"{ds}@{common} does not exist on {target.host}: nothing was discarded")
            cut = names.index(common) + 1
            gone = tuple(f"{ds}@{n}" for n in names[cut:])
            cur["snapshots"] = cur["snapshots"][:cut]
            cur["written"] = cur["snapshots"][-1][2]
            self._put(target, ds, cur)
        self._world.record("failover.discard", ds, "rolled-back", destroyed=len(gone))
        return gone

    def load_key(self, target: SSHEndpoint, ds: str, key_secret: str, stop: threading.Event) -> bool:
        check_dataset(ds, "dataset")
        self._begin(stop, f"loading the key of {ds}")
        with self._world.locked("fo-ds", target.host, ds):
            cur = self._need(target, ds)
            if not cur.get("encrypted") or cur.get("key_loaded"):
                return False
            cur["key_loaded"] = True
            self._put(target, ds, cur)
        return True

    def set_readonly(self, target: SSHEndpoint, ds: str, on: bool, stop: threading.Event) -> bool:
        check_dataset(ds, "dataset")
        self._begin(stop, f"setting readonly on {ds}")
        with self._world.locked("fo-ds", target.host, ds):
            cur = self._need(target, ds)
            if bool(cur.get("readonly")) == on:
                return False
            cur["readonly"] = on
            self._put(target, ds, cur)
        return True

    def destroy_snapshot(self, target: SSHEndpoint, snapshot: str, run_id: str, stop: threading.Event) -> bool:
        ds, _, name = snapshot.partition("@")
        check_dataset(ds, "dataset")
        check_snapshot(name, "snapshot")
        self._begin(stop, f"destroying {snapshot}")
        with self._world.locked("fo-ds", target.host, ds):
            cur = self._need(target, ds)
            hit = next((s for s in cur["snapshots"] if s[0] == name), None)
            if hit is None:
                return False
            marks = cur.get("marks", {})
            if marks.get(name) not in (None, run_id):
                raise PermanentError(f"{snapshot} was not made by run {run_id}: Zerfaux does not destroy it")
            cur["snapshots"] = [s for s in cur["snapshots"] if s[0] != name]
            self._put(target, ds, cur)
        self._world.record("failover.snapshot", snapshot, "destroyed")
        return True

    def replace_with_clone(self, target: SSHEndpoint, ds: str, clone: str, tag: str,
                           stop: threading.Event) -> dict[str, str]:
        check_dataset(ds, "dataset")
        check_dataset(clone, "clone")
        superseded = f"{ds}_{SUPERSEDED_PREFIX}{tag.replace('-', '')[:8]}"
        check_dataset(superseded, "superseded dataset")
        self._begin(stop, f"replacing {ds} with {clone}")
        with self._world.locked("fo-ds", target.host, ds):
            old = self._ds(target, superseded)
            if old is not None and old.get("renamed_from") == ds:
                return {"dataset": ds, "superseded": superseded, "point": str(old.get("point", ""))}
            cur, new = self._need(target, ds), self._need(target, clone)
            point = str(new.get("origin", "")).rpartition("@")[2]
            self._put(target, superseded, {**cur, "renamed_from": ds, "point": point})
            self._put(target, ds, {**new, "renamed_from": clone})
            self._put(target, clone, {"gone": True})
        self._world.record("failover.replace", ds, "replaced", by=clone)
        return {"dataset": ds, "superseded": superseded, "point": point}

