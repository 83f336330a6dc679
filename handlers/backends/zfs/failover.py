"""``FailoverStorageReal``: the replica before and after a failover, the original site at a reprotect.

Implements ``handlers.recovery.failover_backends.FailoverStorage`` over the recovery storage's
SSH machinery (``RecoveryStorageReal``'s pinned, kept paramiko sessions and quoted argument
lists). Every name is checked by zfs/validate.py before any command runs. Not used by any run
yet (docs/recovery.md, "Failover groundwork").

Nothing here destroys data: no ``-r``/``-R``/``-F`` anywhere, a rollback goes to the newest
snapshot only, a rename never replaces. The one thing destroyed is the temporary
``zerfaux_probe_<hex>`` snapshot ``written_since`` makes on a ZFS without ``written``, by its
full name and only when it carries ``zerfaux:probe``.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import Sequence

from handlers.backends.zfs import ops
from handlers.backends.zfs.clones import MARK, Dataset, parse_props, props_argv
from handlers.backends.zfs.exec import ParamikoRunner, Result, Runner, check, zfs_error
from handlers.backends.zfs.nfs import check_clients
from handlers.backends.zfs.pipe import ChannelEnd
from handlers.backends.zfs.recovery import RecoveryStorageReal, _halt
from handlers.backends.zfs.recovery_names import check_run_id
from handlers.backends.zfs.reprotect import ReprotectStorage
from handlers.backends.zfs.stream_count import StreamCounter, StreamError
from handlers.backends.zfs.validate import check_dataset, check_snapshot
from handlers.errors import PermanentError, TransientError
from handlers.recovery.failover_backends import SnapshotInfo, Written
from handlers.types import SSHEndpoint

log = logging.getLogger(__name__)

PROBE_PREFIX = "zerfaux_probe_"
PROBE_MARK = "zerfaux:probe"
RENAMED_FROM = "zerfaux:renamed_from"
FIELD = "failover dataset"


def _tree_snapshots(runner: Runner, dataset: str) -> dict[str, list[tuple[int, str]]] | None:
    """{dataset of the tree: [(createtxg, snapshot name)] oldest first}; None when ``dataset`` is gone."""
    result = runner.run(["zfs", "get", "-H", "-p", "-r", "-o", "name,value", "createtxg", dataset])
    if not result.ok and "does not exist" in result.err:
        return None
    check(result, runner.label, f"listing the snapshots of {dataset}")
    tree: dict[str, list[tuple[int, str]]] = {}
    for line in result.out.splitlines():
        name, _, txg = line.partition("\t")
        base, _, snap = name.partition("@")
        if base != dataset and not base.startswith(dataset + "/"):
            continue
        tree.setdefault(base, [])
        if snap and txg.strip().isdigit():
            tree[base].append((int(txg), snap))
    for snaps in tree.values():
        snaps.sort()
    return tree


def _guid(runner: Runner, snapshot: str) -> str | None:
    result = runner.run(ops.get_argv(snapshot, "guid"))
    if not result.ok and "does not exist" in result.err:
        return None
    return check(result, runner.label, f"reading the GUID of {snapshot}").out.strip()


class FailoverStorageReal(ReprotectStorage, RecoveryStorageReal):
    """Shares the recovery storage's sessions and runner; adds the failover operations only."""

    def snapshot(self, target: SSHEndpoint, dataset: str, name: str, stop: threading.Event,
                 run_id: str | None = None) -> SnapshotInfo:
        check_dataset(dataset, FIELD)
        check_snapshot(name, "snapshot name")
        if run_id is not None:
            check_run_id(run_id)
        snapshot = f"{dataset}@{name}"
        _halt(stop, f"snapshotting {snapshot}")
        with self._runner(target) as runner:
            guid = _guid(runner, snapshot)
            if guid is not None:
                return SnapshotInfo(snapshot, guid, created=False)
            tree = _tree_snapshots(runner, dataset)
            if tree is None:
                raise PermanentError(f"{dataset} does not exist on {runner.label}: nothing to snapshot")
            marks = ["-o", f"{MARK}={run_id}"] if run_id else []
            # -r where the replica is a tree: one atomic snapshot of every child with it.
            made = runner.run(["zfs", "snapshot", *(["-r"] if len(tree) > 1 else []), *marks, snapshot])
            if not made.ok and "already exists" not in made.err:  # else a racing attempt made it
                raise zfs_error(made, runner.label, f"creating {snapshot}")
            guid = _guid(runner, snapshot)
            if guid is None:
                raise TransientError(f"{snapshot} on {runner.label} was created but has no GUID yet")
            log.info("snapshot %s on %s (guid %s)", snapshot, runner.label, guid)
            return SnapshotInfo(snapshot, guid, created=made.ok)

    def rollback(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        check_dataset(dataset, FIELD)
        check_snapshot(snapshot, "rollback snapshot")
        _halt(stop, f"rolling {dataset} back to @{snapshot}")
        with self._runner(target) as runner:
            tree = _tree_snapshots(runner, dataset)
            if tree is None:
                raise PermanentError(f"{dataset} does not exist on {runner.label}: nothing to roll back")
            lacking = [d for d, snaps in tree.items() if snapshot not in {s for _, s in snaps}]
            if lacking:
                raise PermanentError(f"{', '.join(sorted(lacking))} on {runner.label} has no snapshot @{snapshot}: "
                                     "nothing was rolled back")
            newer = []
            for name, snaps in sorted(tree.items()):
                names = [s for _, s in snaps]
                newer += [f"{name}@{s}" for s in names[names.index(snapshot) + 1:]]
            if newer:
                raise PermanentError(
                    f"@{snapshot} is not the newest snapshot of {dataset} on {runner.label}: newer are "
                    f"{', '.join(newer)}. Zerfaux rolls back to the newest snapshot only and never destroys one; "
                    "bring an older point up from a clone instead. Nothing was rolled back")
            done = []
            for name in sorted(tree, key=lambda d: d.count("/")):
                _halt(stop, f"rolling {name} back to @{snapshot}")
                # Plain rollback: with @snapshot the newest, it discards only what was written since.
                check(runner.run(["zfs", "rollback", f"{name}@{snapshot}"]), runner.label,
                      f"rolling {name} back to @{snapshot}")
                log.info("rolled %s back to @%s on %s", name, snapshot, runner.label)
                done.append(name)
            return tuple(done)

    def promote_writable(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> str:
        check_dataset(dataset, FIELD)
        _halt(stop, f"making {dataset} writable")
        with self._runner(target) as runner:
            argv = ["zfs", "get", "-H", "-p", "-r", "-o", "name,property,value",
                    "type,readonly,mounted,mountpoint,canmount", dataset]
            found = self._props(runner, argv, dataset)
            for name in sorted(found, key=lambda d: d.count("/")):  # parents mount first
                values = found[name]
                if values.get("mountpoint") in (None, "none", "legacy", "-"):
                    raise PermanentError(f"{name} on {runner.label} has no mountpoint ({values.get('mountpoint')}): "
                                         "set one (zfs set mountpoint=...) so the replica can be mounted and exported")
                if values.get("canmount") == "off":
                    raise PermanentError(f"{name} on {runner.label} has canmount=off: set canmount=on to use it")
                if values.get("readonly") == "on":
                    _halt(stop, f"setting readonly=off on {name}")
                    check(runner.run(["zfs", "set", "readonly=off", name]), runner.label, f"making {name} writable")
                if values.get("mounted") != "yes":
                    _halt(stop, f"mounting {name}")
                    check(runner.run(["zfs", "mount", name]), runner.label, f"mounting {name}")
                    log.info("mounted %s read-write on %s", name, runner.label)
            again = self._props(runner, argv, dataset)
            wrong = [n for n, v in again.items() if v.get("mounted") != "yes" or v.get("readonly") == "on"]
            if wrong:
                raise TransientError(f"{', '.join(sorted(wrong))} on {runner.label} is not mounted read-write yet")
            return again[dataset]["mountpoint"]

    @staticmethod
    def _props(runner: Runner, argv: list[str], dataset: str) -> dict[str, dict[str, str]]:
        result = runner.run(argv)
        if not result.ok and "does not exist" in result.err:
            raise PermanentError(f"{dataset} does not exist on {runner.label}")
        check(result, runner.label, f"reading {dataset}")
        rows: dict[str, dict[str, str]] = {}
        for line in result.out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and "@" not in parts[0]:
                rows.setdefault(parts[0], {})[parts[1]] = parts[2]
        return {n: v for n, v in rows.items() if v.get("type") == "filesystem"}

    def written_since(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> Written:
        check_dataset(dataset, FIELD)
        check_snapshot(snapshot, "snapshot")
        _halt(stop, f"reading what {dataset} holds beyond @{snapshot}")
        with self._runner(target) as runner:
            if _guid(runner, f"{dataset}@{snapshot}") is None:
                raise PermanentError(f"{dataset}@{snapshot} does not exist on {runner.label}")
            caps = ops.capabilities(runner, dataset.split("/", 1)[0])
            if caps.written:
                value = check(runner.run(ops.get_argv(dataset, f"written@{snapshot}")), runner.label,
                              f"reading written@{snapshot} of {dataset}").out.strip()
                if value.isdigit():
                    return Written(int(value), "written")
                return Written(None, "unavailable", f"zfs get written@{snapshot} answered {value!r}")
            if not isinstance(runner, ParamikoRunner):
                return Written(None, "unavailable", "this ZFS has no 'written' property")
            return self._counted(runner, dataset, snapshot, stop)

    def _counted(self, runner: ParamikoRunner, dataset: str, snapshot: str, stop: threading.Event) -> Written:
        note = ("this ZFS has no 'written' property: counted the data blocks of an incremental send stream "
                "(logical sizes of whole blocks)")
        self._drop_probes(runner, dataset)
        probe = f"{dataset}@{PROBE_PREFIX}{secrets.token_hex(4)}"
        _halt(stop, f"taking the probe snapshot {probe}")
        check(runner.run(["zfs", "snapshot", "-o", f"{PROBE_MARK}=1", probe]), runner.label, f"creating {probe}")
        try:
            counter = StreamCounter()
            end = ChannelEnd(runner.client, ["zfs", "send", "-i", f"{dataset}@{snapshot}", probe], runner.label)
            try:
                while True:
                    _halt(stop, f"counting the stream of {probe}")
                    try:
                        chunk = end.read()
                    except socket.timeout:
                        continue
                    if not chunk:
                        break
                    counter.feed(chunk)
                rc, err = end.finish(60)
            finally:
                end.close()
            if rc != 0:
                raise zfs_error(Result(("zfs", "send", "-i", snapshot, probe), rc, "", err), runner.label,
                                f"sending {probe} to count it")
            if not counter.ended:
                raise TransientError(f"the stream of {probe} from {runner.label} ended early")
            return Written(counter.data_bytes, "send_stream", note)
        except StreamError as exc:
            return Written(None, "unavailable", f"{note}; but the stream could not be read: {exc}")
        finally:
            self._destroy_probe(runner, probe)

    def _drop_probes(self, runner: Runner, dataset: str) -> None:
        """Probe snapshots an earlier, killed attempt left (a receive into the dataset would stop on them)."""
        listed = runner.run(["zfs", "get", "-H", "-p", "-d", "1", "-o", "name,value", PROBE_MARK, dataset])
        for line in listed.out.splitlines() if listed.ok else ():
            name, _, value = line.partition("\t")
            if name.startswith(f"{dataset}@{PROBE_PREFIX}") and value.strip() == "1":
                self._destroy_probe(runner, name)

    @staticmethod
    def _destroy_probe(runner: Runner, probe: str) -> None:
        mark = runner.run(ops.get_argv(probe, PROBE_MARK))
        if not mark.ok or mark.out.strip() != "1":
            return  # gone, or not ours: never destroyed
        result = runner.run(["zfs", "destroy", probe])  # one snapshot by its full name, no -r
        if not result.ok and "does not exist" not in result.err:
            log.warning("could not destroy the probe snapshot %s on %s: %s", probe, runner.label, result.err.strip())

    def rename(self, target: SSHEndpoint, dataset: str, new_name: str, stop: threading.Event) -> bool:
        check_dataset(dataset, FIELD)
        check_dataset(new_name, "new dataset name")
        if new_name == dataset or new_name.startswith(dataset + "/") or dataset.startswith(new_name + "/"):
            raise PermanentError(f"cannot rename {dataset} to {new_name}: one is inside the other")
        if new_name.split("/", 1)[0] != dataset.split("/", 1)[0]:
            raise PermanentError(f"cannot rename {dataset} to {new_name}: a rename stays within its pool")
        _halt(stop, f"renaming {dataset} to {new_name}")
        with self._runner(target) as runner:
            old, new, parent = runner.run_many([ops.exists_argv(dataset), ops.get_argv(new_name, RENAMED_FROM),
                                                ops.exists_argv(new_name.rsplit("/", 1)[0])])
            had_old = ops.parse_exists(old, runner.label, dataset)
            has_new = new.ok or "does not exist" not in new.err
            if has_new:
                if not had_old and new.out.strip() == dataset:
                    return False  # an earlier attempt renamed it
                raise PermanentError(f"{new_name} exists on {runner.label}: Zerfaux never renames over a dataset; "
                                     f"{dataset} was left as it is. Pick another name or move {new_name} away")
            if not had_old:
                raise PermanentError(f"{dataset} does not exist on {runner.label}: nothing to rename")
            if not ops.parse_exists(parent, runner.label, new_name.rsplit("/", 1)[0]):
                raise PermanentError(f"the parent of {new_name} does not exist on {runner.label}: create it first")
            # The mark tells a retry after a kill that the dataset at new_name is this one.
            check(runner.run(["zfs", "set", f"{RENAMED_FROM}={dataset}", dataset]), runner.label, f"marking {dataset}")
            _halt(stop, f"renaming {dataset} to {new_name}")
            check(runner.run(["zfs", "rename", dataset, new_name]), runner.label, f"renaming {dataset} to {new_name}")
            log.info("renamed %s to %s on %s", dataset, new_name, runner.label)
            return True

    # ---- the replica itself over NFS (a failover to the newest point, a planned migration) ----

    def _replica(self, runner: Runner, dataset: str) -> Dataset | None:
        found = parse_props(runner.run(props_argv(dataset)), runner.label, dataset)
        item = found.get(dataset) if found else None
        if item is not None and item.type != "filesystem":
            raise PermanentError(f"{dataset} on {runner.label} is a {item.type}, not a filesystem: NFS shares "
                                 "filesystems only")
        return item

    def export_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
                       clients: Sequence[str] | None = None) -> str:
        """``export`` of the replica a failover brings up (not a clone: ``export`` refuses anything
        Zerfaux did not clone); the same share, the same errors. It must be mounted (make it
        writable first)."""
        check_dataset(dataset, FIELD)
        try:
            allowed = self._clients if clients is None else check_clients(clients)
        except ValueError as exc:
            raise PermanentError(f"replication_targets.nfs_clients: {exc}") from None
        _halt(stop, f"exporting {dataset}")
        with self._runner(target) as runner:
            item = self._replica(runner, dataset)
            if item is None:
                raise PermanentError(f"{dataset} does not exist on {runner.label}: nothing to export")
            if not item.mounted or item.mountpoint is None:
                raise PermanentError(f"{dataset} on {runner.label} is not mounted: make it writable (which mounts "
                                     "it) before exporting")
            return self._share(runner, dataset, item.mountpoint, allowed)

    def unexport_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        """Stop sharing the replica; False when it was not shared."""
        check_dataset(dataset, FIELD)
        _halt(stop, f"unexporting {dataset}")
        with self._runner(target) as runner:
            item = self._replica(runner, dataset)
            if item is None:
                return False
            state = self._export_state(runner, dataset, item.mountpoint or "")
            if state.sharenfs == "off" and not state.listed:
                return False
            self._unshare(runner, dataset)
            return True
