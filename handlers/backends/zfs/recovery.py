"""``RecoveryStorageReal``: holds, clones and NFS exports of recovery points on the DR storage host.

Implements ``handlers.recovery.backends.RecoveryStorage`` over the replication's SSH machinery
(pinned host keys, kept paramiko sessions, argument lists quoted by ``ParamikoRunner``). Every
name is checked by zfs/validate.py before any command runs. What each step runs, and what
zfs-fuse cannot do, is in docs/recovery.md ("DR storage: holds, clones, exports").

Never destroyed here: anything without this run's ``zerfaux:recovery_run`` mark, a replica, a
snapshot of a replica. ``destroy_clone`` destroys the clone's datasets one by one by name
(deepest first, never ``-r``), after checking every one of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from handlers.backends.zfs import ops
from handlers.backends.zfs.clones import (
    MARK,
    Dataset,
    clone_name,
    destroy_order,
    foreign,
    origin_name,
    parse_props,
    parse_snapshot_tree,
    props_argv,
    snapshot_tree_argv,
)
from handlers.backends.zfs.connections import SessionPool
from handlers.backends.zfs.exec import ParamikoRunner, Runner, check, zfs_error
from handlers.backends.zfs.nfs import (
    ETAB_ARGV,
    EXPORTFS_ARGV,
    THREADS_ARGV,
    ExportState,
    NFSExportError,
    check_clients,
    explain,
    listed,
    served,
    sharenfs_value,
)
from handlers.backends.zfs.recovery_names import check_clone_name, check_run_id, check_tag, split_snapshot
from handlers.backends.zfs.ssh import Peer
from handlers.backends.zfs.stopping import stopping
from handlers.backends.zfs.validate import check_cipher, check_dataset, check_endpoint
from handlers.errors import OperationCancelled, OperationStopped, PermanentError, TransientError
from handlers.recovery.backends import CloneInfo
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint

log = logging.getLogger(__name__)

FIELD = "replication_targets.ssh"


def _halt(stop: threading.Event, what: str) -> None:
    if not stop.is_set():
        return
    if stopping(stop):
        raise OperationStopped(f"recovery step stopped ({getattr(stop, 'why', '') or 'stopped'}) before {what}")
    raise OperationCancelled(f"recovery step cancelled before {what}")


class RecoveryStorageReal:
    def __init__(self, secrets: SecretResolver, cipher: str = "aes128-gcm@openssh.com",
                 nfs_clients: Sequence[str] = ("*",), busy_seconds: float = 30.0) -> None:
        """``nfs_clients``: who may mount a clone (the DR ESXi hosts' addresses or networks)."""
        self._secrets = secrets
        self._cipher = check_cipher(cipher)
        self._clients = check_clients(nfs_clients)
        self._busy_seconds = busy_seconds
        self.sessions = SessionPool()

    def close(self) -> None:
        self.sessions.close()

    @contextmanager
    def _runner(self, target: SSHEndpoint) -> Iterator[Runner]:
        pinned = check_endpoint(target, FIELD)
        key = self._secrets.resolve(target.key_secret, f"{FIELD}_key_secret")
        peer = Peer(target, pinned, key, FIELD)
        client = self.sessions.checkout(peer, self._cipher)
        try:
            yield ParamikoRunner(client, peer)
        except (PermanentError, OperationCancelled, OperationStopped):
            self.sessions.checkin(peer, self._cipher, client)  # the session is fine; the answer was no
            raise
        except BaseException:
            client.close()
            raise
        self.sessions.checkin(peer, self._cipher, client)

    # ---- reads -------------------------------------------------------------------------------

    def snapshot_guid(self, target: SSHEndpoint, snapshot: str, stop: threading.Event) -> str | None:
        split_snapshot(snapshot, "recovery_points snapshot")
        _halt(stop, f"reading the GUID of {snapshot}")
        with self._runner(target) as runner:
            result = runner.run(ops.get_argv(snapshot, "guid"))
            if not result.ok and "does not exist" in result.err:
                return None
            check(result, runner.label, f"reading the GUID of {snapshot}")
            return result.out.strip()

    def available_bytes(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> int:
        check_dataset(dataset, "replication_targets.target_root")
        _halt(stop, f"reading the space available in {dataset}")
        with self._runner(target) as runner:
            result = check(runner.run(ops.get_argv(dataset, "available")), runner.label,
                           f"reading the space available in {dataset}")
            value = result.out.strip()
            if not value.isdigit():
                raise TransientError(f"zfs get available {dataset} on {runner.label} answered {value!r}")
            return int(value)

    # ---- holds -------------------------------------------------------------------------------

    def hold(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        split_snapshot(snapshot, "recovery_points snapshot")
        check_tag(tag)
        _halt(stop, f"holding {snapshot}")
        with self._runner(target) as runner:
            result = runner.run(["zfs", "hold", tag, snapshot])
            if result.ok:
                log.info("held %s with %s on %s", snapshot, tag, runner.label)
                return True
            # zfs-fuse cannot list holds (`zfs holds` needs a helper Debian does not ship): this
            # answer is how a retry learns that the hold is there already.
            if "tag already exists" in result.err:
                return False
            raise zfs_error(result, runner.label, f"holding {snapshot}")

    def release(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        split_snapshot(snapshot, "recovery_points snapshot")
        check_tag(tag)
        _halt(stop, f"releasing the hold on {snapshot}")
        with self._runner(target) as runner:
            result = runner.run(["zfs", "release", tag, snapshot])
            if result.ok:
                log.info("released %s from %s on %s", tag, snapshot, runner.label)
                return True
            if "no such tag" in result.err or "does not exist" in result.err:
                return False
            raise zfs_error(result, runner.label, f"releasing the hold {tag} on {snapshot}")

    # ---- the clone ---------------------------------------------------------------------------

    def clone(self, target: SSHEndpoint, snapshot: str, dataset: str, run_id: str,
              stop: threading.Event) -> CloneInfo:
        replica, snap = split_snapshot(snapshot, "recovery_points snapshot")
        check_run_id(run_id)
        check_clone_name(dataset, run_id, replica)
        parent = dataset.rsplit("/", 1)[0]
        _halt(stop, f"cloning {snapshot}")
        with self._runner(target) as runner:
            tree, props, parent_mp = runner.run_many(
                [snapshot_tree_argv(replica), props_argv(dataset, recursive=True), ops.get_argv(parent, "mountpoint")])
            relatives = parse_snapshot_tree(tree, runner.label, replica, snap)
            if relatives is None:
                raise PermanentError(f"{snapshot} does not exist on {runner.label}: the recovery point is not on "
                                     "the target (replicate first, or pick another recovery point)")
            found = parse_props(props, runner.label, dataset) or {}
            check(parent_mp, runner.label, f"reading the mountpoint of {parent}")
            adopted = dataset in found
            for relative in relatives:  # parents first: a child clone needs its parent
                name, origin = clone_name(dataset, relative), origin_name(replica, relative, snap)
                self._refuse_foreign(runner, name, found.get(name), origin, run_id)
                if name in found:
                    continue
                _halt(stop, f"cloning {origin}")
                # A parent (target_root) with mountpoint none would leave the clone unmounted and
                # unexportable: give the root ZFS's default path then (children inherit from it).
                where = ["-o", f"mountpoint=/{dataset}"] if not relative and \
                    parent_mp.out.strip() in ("none", "legacy", "-") else []
                made = runner.run(["zfs", "clone", "-o", f"{MARK}={run_id}", *where, origin, name])
                if not made.ok:
                    if "already exists" not in made.err:  # else: a racing attempt made it; checked below
                        raise zfs_error(made, runner.label, f"cloning {origin} to {name}")
                else:
                    log.info("cloned %s to %s on %s (run %s)", origin, name, runner.label, run_id)
            mountpoint = self._mounted(runner, dataset, replica, snap, relatives, run_id)
        return CloneInfo(dataset=dataset, origin=snapshot, mountpoint=mountpoint, adopted=adopted)

    @staticmethod
    def _refuse_foreign(runner: Runner, name: str, found: Dataset | None, origin: str, run_id: str) -> None:
        why = foreign(found, origin, run_id)
        if why:
            raise PermanentError(
                f"{name} exists on {runner.label} and is not this run's clone of {origin}: {why}. Zerfaux does "
                "not touch it: rename or destroy it yourself if it is a leftover, then run the step again")

    def _mounted(self, runner: Runner, dataset: str, replica: str, snap: str, relatives: list[str],
                 run_id: str) -> str:
        """Mount each clone of the tree that is not (zfs-fuse receives with -u; a clone must be mounted)."""
        found = parse_props(runner.run(props_argv(dataset, recursive=True)), runner.label, dataset) or {}
        for relative in relatives:
            name = clone_name(dataset, relative)
            self._refuse_foreign(runner, name, found.get(name), origin_name(replica, relative, snap), run_id)
            item = found[name]
            if item.mountpoint is None:
                raise PermanentError(f"{name} on {runner.label} has no mountpoint (none or legacy, set on it or "
                                     f"inherited): set one on {dataset.rsplit('/', 1)[0]} so clones can be mounted "
                                     "and exported")
            if not item.mounted:
                check(runner.run(["zfs", "mount", name]), runner.label, f"mounting {name}")
        again = parse_props(runner.run(props_argv(dataset, recursive=True)), runner.label, dataset) or {}
        unmounted = [clone_name(dataset, r) for r in relatives if not again[clone_name(dataset, r)].mounted]
        if unmounted:
            raise TransientError(f"{', '.join(unmounted)} on {runner.label} did not mount")
        mountpoint = again[dataset].mountpoint
        assert mountpoint is not None  # checked above
        return mountpoint

    def destroy_clone(self, target: SSHEndpoint, dataset: str, run_id: str, stop: threading.Event) -> bool:
        check_run_id(run_id)
        check_dataset(dataset, "recovery run clone dataset")
        _halt(stop, f"destroying {dataset}")
        with self._runner(target) as runner:
            tree = parse_props(runner.run(props_argv(dataset, recursive=True)), runner.label, dataset)
            if tree is None or dataset not in tree:
                return False
            root = tree[dataset]
            if root.mark != run_id or not root.origin:
                raise PermanentError(
                    f"{dataset} on {runner.label} is not this run's clone ({MARK}={root.mark or 'unset'}, origin "
                    f"{root.origin or 'none'}; run {run_id}): Zerfaux destroys only the clones it made for the run")
            try:
                snaps, filesystems = destroy_order(tree, dataset, run_id)
            except ValueError as exc:
                raise PermanentError(f"not destroying {dataset} on {runner.label}: {exc}") from None
            if root.sharenfs != "off":
                self._unshare(runner, dataset)
            for name in [*snaps, *filesystems]:
                self._destroy_one(runner, name)
            log.info("destroyed the clone %s on %s (run %s)", dataset, runner.label, run_id)
            return True

    def _destroy_one(self, runner: Runner, name: str) -> None:
        # One dataset by full name, -f to unmount it; never -r/-R. zfs-fuse calls a just-used
        # mount busy for a moment: try again until busy_seconds have passed.
        deadline = time.monotonic() + self._busy_seconds
        while True:
            result = runner.run(["zfs", "destroy", "-f", name])
            if result.ok or "does not exist" in result.err:
                return
            if "dependent clones" in result.err:  # somebody cloned the test's clone: theirs to remove
                raise PermanentError(f"not destroying {name} on {runner.label}: {result.err.strip()} (a dataset "
                                     "outside the clone was cloned from it; destroy that first)")
            if "busy" not in result.err or time.monotonic() >= deadline:
                raise zfs_error(result, runner.label, f"destroying {name}")
            time.sleep(0.5)

    # ---- NFS ---------------------------------------------------------------------------------

    def export(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
               clients: Sequence[str] | None = None) -> str:
        check_dataset(dataset, "recovery run clone dataset")
        try:
            allowed = self._clients if clients is None else check_clients(clients)
        except ValueError as exc:
            raise PermanentError(f"replication_targets.nfs_clients: {exc}") from None
        _halt(stop, f"exporting {dataset}")
        with self._runner(target) as runner:
            item = self._ours(runner, dataset, "export")
            if item is None:
                raise PermanentError(f"{dataset} does not exist on {runner.label}: clone the snapshot first")
            if not item.mounted or item.mountpoint is None:
                raise PermanentError(f"{dataset} on {runner.label} is not mounted: clone it again (the clone step "
                                     "mounts it) before exporting")
            return self._share(runner, dataset, item.mountpoint, allowed)

    def _share(self, runner: Runner, dataset: str, path: str, allowed: Sequence[str]) -> str:
        """``sharenfs`` read-write, root not squashed, to ``allowed``; the path once it is served."""
        caps = ops.capabilities(runner, dataset.split("/", 1)[0])
        value = sharenfs_value(allowed, fuse=not caps.written)
        state = self._export_state(runner, dataset, path)
        said = ""
        if state.sharenfs != value or not state.listed:
            argv = ["zfs", "share", dataset] if state.sharenfs == value else \
                ["zfs", "set", f"sharenfs={value}", dataset]
            done = runner.run(argv)
            said = "" if done.ok else (done.err.strip() or done.out.strip())
            state = self._export_state(runner, dataset, path)
        if state.sharenfs != value:
            raise PermanentError(f"could not set sharenfs on {dataset} at {runner.label}: {said or 'no answer'}")
        if state.listed and state.served is not False:
            log.info("exported %s (%s) on %s: sharenfs=%s", dataset, path, runner.label, value)
            return path
        raise NFSExportError(explain(dataset, path, state, said), path, value, state.listed, state.served)

    def unexport(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        check_dataset(dataset, "recovery run clone dataset")
        _halt(stop, f"unexporting {dataset}")
        with self._runner(target) as runner:
            item = self._ours(runner, dataset, "unexport")
            if item is None:
                return False
            state = self._export_state(runner, dataset, item.mountpoint or "")
            if state.sharenfs == "off" and not state.listed:
                return False
            self._unshare(runner, dataset)
            return True

    def _ours(self, runner: Runner, dataset: str, what: str) -> Dataset | None:
        found = parse_props(runner.run(props_argv(dataset)), runner.label, dataset)
        item = found.get(dataset) if found else None
        if item is not None and (item.mark is None or not item.origin):
            raise PermanentError(f"not going to {what} {dataset} on {runner.label}: it is not a recovery clone "
                                 f"(no {MARK} mark or no origin); Zerfaux shares only the clones it made")
        return item

    def _unshare(self, runner: Runner, dataset: str) -> None:
        # sharenfs=off makes ZFS run `exportfs -u` itself; `zfs unshare` covers an export left in
        # the table while the property was already off.
        check(runner.run(["zfs", "set", "sharenfs=off", dataset]), runner.label, f"unexporting {dataset}")
        item = parse_props(runner.run(props_argv(dataset)), runner.label, dataset) or {}
        path = item[dataset].mountpoint if dataset in item else None
        if path and self._export_state(runner, dataset, path).listed:
            runner.run(["zfs", "unshare", dataset])
            if self._export_state(runner, dataset, path).listed:
                raise TransientError(f"{path} is still in the export table of {runner.label} after unsharing {dataset}")
        log.info("unexported %s on %s", dataset, runner.label)

    @staticmethod
    def _export_state(runner: Runner, dataset: str, path: str) -> ExportState:
        prop, etab, threads, system, exportfs = runner.run_many(
            [ops.get_argv(dataset, "sharenfs"), ETAB_ARGV, THREADS_ARGV, ["uname", "-s"], EXPORTFS_ARGV])
        check(prop, runner.label, f"reading sharenfs of {dataset}")
        linux = system.ok and system.out.strip() == "Linux"
        running = served(threads.out if threads.ok else ("0" if linux else None))
        return ExportState(prop.out.strip() or "off", etab.ok and bool(path) and listed(etab.out, path), running,
                           exportfs.ok)
