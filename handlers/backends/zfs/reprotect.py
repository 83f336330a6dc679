"""Reprotect, failback and commit storage operations (issue 14) on a ZFS host over SSH.

A mixin of ``FailoverStorageReal`` (zfs/failover.py): it uses that class's ``_runner`` (pinned
host keys, kept sessions, argument lists quoted by ``ParamikoRunner``) and its secrets. Every
name is checked by zfs/validate.py (and recovery_names.py) before any command runs; ``stop`` is
checked before every effect. What is run on which host, and what zfs-fuse cannot do, is in
docs/recovery.md ("Reprotect and reverse replication: storage").

Nothing is destroyed here except: the snapshots ``discard_changes`` names (the explicit
``options.discard_source_changes``), and in ``destroy_snapshot`` one snapshot carrying this run's
``zerfaux:recovery_run`` mark as a property of its own.

Each operation reads where an earlier call got to and goes on from there, so a call after a
SIGKILL anywhere inside an earlier one converges: user properties written before each rename
(``zerfaux:kept_for``, ``zerfaux:superseded_by``) tell a retry which dataset is which.
"""

from __future__ import annotations

import logging
import shlex
import socket
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from handlers.backends.zfs import ops
from handlers.backends.zfs.clones import MARK
from handlers.backends.zfs.exec import ParamikoRunner, Runner, check, zfs_error
from handlers.backends.zfs.recovery import _halt
from handlers.backends.zfs.recovery_names import check_run_id, check_tag, split_snapshot
from handlers.backends.zfs.validate import check_dataset, check_snapshot
from handlers.errors import PermanentError, TransientError
from handlers.recovery.failover_backends import SUPERSEDED_PREFIX, CommonSnapshot, KeptChanges, kept_names
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint

log = logging.getLogger(__name__)

KEPT_FOR = "zerfaux:kept_for"  # on the kept dataset (and its clone): the run that kept it
KEPT_MOUNT = "zerfaux:kept_mountpoint"  # the dataset's mountpoint before, when it was its own (local)
SUPERSEDED_BY = "zerfaux:superseded_by"  # on a replica replaced by a clone: the clone's name
FIELD = "dataset"
_LIST_PROPS = "guid,createtxg,creation"


@dataclass(frozen=True)
class _Snap:
    name: str
    guid: int
    txg: int
    creation: int


def _snapshots(runner: Runner, dataset: str, what: str) -> list[_Snap]:
    """``dataset``'s snapshots oldest first; ``PermanentError`` naming it when it does not exist."""
    found = ops.parse_snapshots(runner.run(["zfs", "get", "-Hp", "-d", "1", "-o", "name,property,value",
                                            _LIST_PROPS, dataset]), runner.label, dataset)
    if found is None:
        raise PermanentError(f"{what} {dataset} does not exist on {runner.label}")
    return [_Snap(s.name, s.guid, s.txg, s.creation) for s in found]


def _props(runner: Runner, dataset: str, props: str) -> dict[str, tuple[str, str]] | None:
    """{property: (value, source)} of one dataset; None when it does not exist."""
    result = runner.run(["zfs", "get", "-Hp", "-o", "property,value,source", props, dataset])
    if not result.ok and "does not exist" in result.err:
        return None
    check(result, runner.label, f"reading {dataset}")
    rows = {}
    for line in result.out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def _value(props: dict[str, tuple[str, str]], name: str) -> str:
    value = props.get(name, ("-", "-"))[0]
    return "" if value == "-" else value


def _children(runner: Runner, dataset: str) -> list[str]:
    result = check(runner.run(["zfs", "list", "-H", "-r", "-o", "name", "-t", "filesystem,volume", dataset]),
                   runner.label, f"listing the children of {dataset}")
    return [n for n in result.out.split() if n != dataset]


def _unmount(runner: Runner, dataset: str, stop: threading.Event, why: str) -> None:
    """zfs-fuse renames only an unmounted dataset ("dataset is busy"): unmount it first."""
    mounted = runner.run(ops.get_argv(dataset, "mounted"))
    if mounted.ok and mounted.out.strip() == "yes":
        _halt(stop, f"unmounting {dataset}")
        result = runner.run(["zfs", "umount", dataset])
        if not result.ok and "not currently mounted" not in result.err:
            raise PermanentError(f"cannot unmount {dataset} on {runner.label} to {why}: {result.err.strip()}. "
                                 "Stop whatever uses it (an NFS export, a shell in it) and run the step again; "
                                 "nothing was renamed")


class ReprotectStorage:
    _secrets: SecretResolver

    if TYPE_CHECKING:  # FailoverStorageReal's (zfs/recovery.py); declared here for the type checker only
        def _runner(self, target: SSHEndpoint) -> AbstractContextManager[Runner]: ...

    # ---- reads ---------------------------------------------------------------------------------

    def newest_common_snapshot(self, a: SSHEndpoint, a_ds: str, b: SSHEndpoint, b_ds: str,
                               stop: threading.Event) -> CommonSnapshot | None:
        check_dataset(a_ds, FIELD)
        check_dataset(b_ds, FIELD)
        _halt(stop, f"matching the snapshots of {a_ds} and {b_ds}")
        with self._runner(b) as runner:
            guids = {s.guid for s in _snapshots(runner, b_ds, "dataset")}
        with self._runner(a) as runner:
            for snap in reversed(_snapshots(runner, a_ds, "dataset")):
                if snap.guid in guids:
                    created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(snap.creation))
                    return CommonSnapshot(snap.name, str(snap.guid), created)
        return None

    def snapshots_after(self, target: SSHEndpoint, ds: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        check_dataset(ds, FIELD)
        check_snapshot(snapshot, "snapshot")
        _halt(stop, f"listing the snapshots of {ds}")
        with self._runner(target) as runner:
            snaps = _snapshots(runner, ds, "dataset")
            names = [s.name for s in snaps]
            if snapshot not in names:
                raise PermanentError(f"{ds}@{snapshot} does not exist on {runner.label}")
            return tuple(names[names.index(snapshot) + 1:])

    # ---- keep or discard what the original site holds beyond the common snapshot ---------------

    def keep_changes(self, target: SSHEndpoint, ds: str, common: str, tag: str, run_id: str,
                     stop: threading.Event) -> KeptChanges:
        check_dataset(ds, FIELD)
        check_snapshot(common, "common snapshot")
        check_tag(tag)
        check_run_id(run_id)
        kept, snap = kept_names(ds, run_id)
        check_dataset(kept, "kept dataset")
        result = KeptChanges(kept, f"{kept}@{snap}", tag, ds)
        _halt(stop, f"keeping what {ds} holds beyond @{common}")
        with self._runner(target) as runner:
            props = "type,origin,mountpoint,mounted," + KEPT_FOR + "," + KEPT_MOUNT
            at_kept = _props(runner, kept, props)
            if at_kept is None:
                self._set_aside(runner, ds, kept, snap, common, tag, run_id, stop)
                at_kept = _props(runner, kept, props)
                if at_kept is None:
                    raise TransientError(f"{ds} on {runner.label} was renamed to {kept} but {kept} is not there")
            elif _value(at_kept, KEPT_FOR) != run_id:
                raise PermanentError(f"{kept} exists on {runner.label} and was not made by run {run_id}: Zerfaux "
                                     f"does not touch it; {ds} was left as it is. Move {kept} away and run again")
            self._clone_back(runner, ds, kept, common, at_kept, run_id, stop)
            return result

    def _set_aside(self, runner: Runner, ds: str, kept: str, snap: str, common: str, tag: str, run_id: str,
                   stop: threading.Event) -> None:
        """Snapshot (held) and rename ``ds`` to ``kept``: after it, everything ds held is under ``kept``."""
        info = _props(runner, ds, "type,mountpoint,mounted,origin," + KEPT_FOR)
        if info is None:
            raise PermanentError(f"{ds} does not exist on {runner.label}: nothing to keep (and {kept} is not there)")
        if _value(info, "type") != "filesystem":
            raise PermanentError(f"{ds} on {runner.label} is a {_value(info, 'type')}, not a filesystem: nothing changed")
        names = [s.name for s in _snapshots(runner, ds, "dataset")]
        if common not in names:
            raise PermanentError(f"{ds}@{common} does not exist on {runner.label}: nothing was changed")
        if _children(runner, ds):
            raise PermanentError(f"{ds} on {runner.label} has child datasets: Zerfaux keeps the changes of a single "
                                 "dataset only; move them aside by hand (zfs rename) and run the step again. "
                                 "Nothing was changed")
        if snap not in names:
            _halt(stop, f"snapshotting {ds}@{snap}")
            made = runner.run(["zfs", "snapshot", "-o", f"{MARK}={run_id}", f"{ds}@{snap}"])
            if not made.ok and "already exists" not in made.err:
                raise zfs_error(made, runner.label, f"snapshotting {ds}@{snap}")
        _halt(stop, f"holding {ds}@{snap}")
        held = runner.run(["zfs", "hold", tag, f"{ds}@{snap}"])
        if not held.ok and "tag already exists" not in held.err:
            raise zfs_error(held, runner.label, f"holding {ds}@{snap} with {tag}")
        # The marks tell a retry after a kill which dataset this is, whatever its name by then.
        marks = [f"{KEPT_FOR}={run_id}"]
        mountpoint, source = info.get("mountpoint", ("-", "-"))
        if source == "local" and mountpoint.startswith("/"):
            marks.append(f"{KEPT_MOUNT}={mountpoint}")
        _halt(stop, f"marking {ds}")
        for mark in marks:
            check(runner.run(["zfs", "set", mark, ds]), runner.label, f"marking {ds}")
        _unmount(runner, ds, stop, f"rename it to {kept}")
        _halt(stop, f"renaming {ds} to {kept}")
        check(runner.run(["zfs", "rename", ds, kept]), runner.label, f"renaming {ds} to {kept}")
        log.info("kept %s as %s on %s (run %s)", ds, kept, runner.label, run_id)

    def _clone_back(self, runner: Runner, ds: str, kept: str, common: str, at_kept: dict[str, tuple[str, str]],
                    run_id: str, stop: threading.Event) -> None:
        """``kept`` mounted where a person can reach it; ``ds`` a promoted clone of ``kept@common``."""
        before = _value(at_kept, KEPT_MOUNT)
        mountpoint, source = at_kept.get("mountpoint", ("-", "-"))
        if before and source == "local" and mountpoint == before:
            # Its own mountpoint went with the rename: give it one of its own, the clone takes the old one.
            _halt(stop, f"moving {kept}'s mountpoint")
            check(runner.run(["zfs", "set", f"mountpoint={before}{kept[len(ds):]}", kept]), runner.label,
                  f"setting the mountpoint of {kept}")
        if _value(at_kept, "mounted") != "yes" and (mountpoint.startswith("/") or before):
            mounted = runner.run(["zfs", "mount", kept])  # best effort: the data is kept either way
            if not mounted.ok and "already mounted" not in mounted.err:
                log.warning("could not mount %s on %s: %s", kept, runner.label, mounted.err.strip())
        at_ds = _props(runner, ds, "type,origin," + KEPT_FOR)
        if at_ds is None:
            _halt(stop, f"cloning {kept}@{common} to {ds}")
            # readonly: nothing may touch it before the reverse replication arrives (on zfs-fuse a mere read
            # updates atime, and a receive refuses a dataset "modified since most recent snapshot").
            argv = ["zfs", "clone", "-o", f"{KEPT_FOR}={run_id}", "-o", "readonly=on"]
            if before:
                argv += ["-o", f"mountpoint={before}"]
            made = runner.run([*argv, f"{kept}@{common}", ds])
            if not made.ok and "already exists" not in made.err:
                raise zfs_error(made, runner.label, f"cloning {kept}@{common} to {ds}")
            at_ds = _props(runner, ds, "type,origin," + KEPT_FOR)
            if at_ds is None:
                raise TransientError(f"the clone {ds} of {kept}@{common} on {runner.label} is not there yet")
        if _value(at_ds, KEPT_FOR) != run_id:
            raise PermanentError(f"{ds} on {runner.label} is not the clone run {run_id} made of {kept}@{common} "
                                 f"(someone made another {ds} meanwhile): Zerfaux does not touch it")
        if _value(at_ds, "origin") == f"{kept}@{common}":
            # zfs-fuse refuses an incremental into a clone of its base ("invalid backup stream"): once
            # promoted, ds owns @common (and the snapshots before it) and kept becomes its clone.
            _halt(stop, f"promoting {ds}")
            check(runner.run(["zfs", "promote", ds]), runner.label, f"promoting {ds}")
            log.info("%s on %s is %s@%s again (promoted); the changes are in %s", ds, runner.label, kept, common, kept)
        elif _value(at_ds, "origin") and _value(at_ds, "origin") != "-":
            raise PermanentError(f"{ds} on {runner.label} is a clone of {_value(at_ds, 'origin')}, not of "
                                 f"{kept}@{common}: Zerfaux does not touch it")

    def discard_changes(self, target: SSHEndpoint, ds: str, common: str, stop: threading.Event) -> tuple[str, ...]:
        check_dataset(ds, FIELD)
        check_snapshot(common, "common snapshot")
        _halt(stop, f"rolling {ds} back to @{common}")
        with self._runner(target) as runner:
            names = [s.name for s in _snapshots(runner, ds, "dataset")]
            if common not in names:
                raise PermanentError(f"{ds}@{common} does not exist on {runner.label}: nothing was discarded")
            newer = tuple(f"{ds}@{n}" for n in names[names.index(common) + 1:])
            _halt(stop, f"rolling {ds} back to @{common}")
            # -r destroys the newer snapshots (the explicit discard); never -R: a clone of one refuses it.
            result = runner.run(["zfs", "rollback", *(["-r"] if newer else []), f"{ds}@{common}"])
            if not result.ok and ("busy" in result.err or "clone" in result.err):
                raise PermanentError(f"rolling {ds} back to @{common} on {runner.label} failed: {result.err.strip()} "
                                     "(a held snapshot or a clone of a newer one stops it: release or move it first)")
            check(result, runner.label, f"rolling {ds} back to @{common}")
            log.info("discarded %s beyond @%s on %s: %s", ds, common, runner.label, ", ".join(newer) or "no snapshot")
            return newer

    # ---- keys, properties, snapshots -----------------------------------------------------------

    def load_key(self, target: SSHEndpoint, ds: str, key_secret: str, stop: threading.Event) -> bool:
        check_dataset(ds, FIELD)
        _halt(stop, f"reading the encryption of {ds}")
        with self._runner(target) as runner:
            result = runner.run(["zfs", "get", "-H", "-o", "property,value", "encryption,keystatus,encryptionroot", ds])
            if not result.ok:
                if "does not exist" in result.err:
                    raise PermanentError(f"{ds} does not exist on {runner.label}: no key to load")
                if "invalid property" in result.err or "bad property list" in result.err:
                    return False  # this ZFS has no native encryption (zfs-fuse)
                check(result, runner.label, f"reading the encryption of {ds}")
            values = dict(line.split("\t", 1) for line in result.out.splitlines() if "\t" in line)
            if values.get("encryption", "off") in ("off", "-") or values.get("keystatus") == "available":
                return False
            root = values.get("encryptionroot", "-").strip()
            root = ds if root in ("", "-") else check_dataset(root, "encryptionroot")
            key = self._secrets.resolve(key_secret, "protection_groups.encryption_key_secret")
            _halt(stop, f"loading the key of {root}")
            if not isinstance(runner, ParamikoRunner):
                raise PermanentError(f"loading the key of {root} needs an SSH session to {runner.label}")
            rc, err = _run_with_input(runner, ["zfs", "load-key", "-L", "prompt", root], key.encode() + b"\n")
            if rc != 0:
                if "already loaded" in err:
                    return False
                if "incorrect key" in err.lower() or "invalid" in err.lower():
                    raise PermanentError(f"the key in secret {key_secret!r} (protection_groups.encryption_key_secret) "
                                         f"does not unlock {root} on {runner.label}: {err.strip()}")
                raise TransientError(f"zfs load-key {root} failed on {runner.label}: {err.strip()}")
            log.info("loaded the key of %s on %s", root, runner.label)
            return True

    def set_readonly(self, target: SSHEndpoint, ds: str, on: bool, stop: threading.Event) -> bool:
        check_dataset(ds, FIELD)
        want = "on" if on else "off"
        _halt(stop, f"setting readonly={want} on {ds}")
        with self._runner(target) as runner:
            props = _props(runner, ds, "readonly")
            if props is None:
                raise PermanentError(f"{ds} does not exist on {runner.label}")
            value, source = props.get("readonly", ("off", "default"))
            # 'temporary' is the mount's option, not the setting (zfs-fuse shows "off temporary" on a
            # dataset mounted read-only after readonly=on, and hides the local value): set it again.
            if value == want and source != "temporary":
                return False
            check(runner.run(["zfs", "set", f"readonly={want}", ds]), runner.label, f"setting readonly={want} on {ds}")
            return True

    def destroy_snapshot(self, target: SSHEndpoint, snapshot: str, run_id: str, stop: threading.Event) -> bool:
        ds, name = split_snapshot(snapshot, "snapshot")
        check_run_id(run_id)
        _halt(stop, f"destroying {snapshot}")
        with self._runner(target) as runner:
            mark = runner.run(["zfs", "get", "-H", "-o", "value,source", MARK, snapshot])
            if not mark.ok and "does not exist" in mark.err:
                return False
            value, _, source = check(mark, runner.label, f"reading {snapshot}").out.strip().partition("\t")
            if value != run_id or source.strip() != "local":
                raise PermanentError(f"{snapshot} on {runner.label} was not made by run {run_id} ({MARK} is "
                                     f"{value!r}, {source.strip() or 'unset'}): Zerfaux does not destroy it")
            _halt(stop, f"destroying {snapshot}")
            result = runner.run(["zfs", "destroy", snapshot])  # one snapshot by its full name: no -r, no -R
            if not result.ok:
                if "could not find any snapshots" in result.err or "does not exist" in result.err:
                    return False
                raise PermanentError(f"destroying {snapshot} on {runner.label} failed: {result.err.strip()} (held, "
                                     "or a clone was made of it: release or destroy that first)")
            log.info("destroyed %s on %s (run %s)", snapshot, runner.label, run_id)
            return True

    # ---- commit of a failover to an older point ------------------------------------------------

    def replace_with_clone(self, target: SSHEndpoint, ds: str, clone: str, tag: str,
                           stop: threading.Event) -> dict[str, str]:
        check_dataset(ds, FIELD)
        check_dataset(clone, "clone dataset")
        check_tag(tag)
        superseded = f"{ds}_{SUPERSEDED_PREFIX}{tag.replace('-', '')[:8]}"
        check_dataset(superseded, "superseded dataset")
        if clone.split("/", 1)[0] != ds.split("/", 1)[0] or clone == ds:
            raise PermanentError(f"the clone {clone} must be another dataset of {ds}'s pool")
        _halt(stop, f"replacing {ds} with {clone}")
        props = "type,origin,mountpoint,mounted," + SUPERSEDED_BY
        with self._runner(target) as runner:
            old = _props(runner, superseded, props)
            if old is None:
                self._supersede(runner, ds, clone, superseded, props, stop)
                old = _props(runner, superseded, props)
                if old is None:
                    raise TransientError(f"{ds} on {runner.label} was renamed but {superseded} is not there")
            elif _value(old, SUPERSEDED_BY) != clone:
                raise PermanentError(f"{superseded} exists on {runner.label} and was not superseded by {clone}: "
                                     "Zerfaux does not touch it")
            origin = _value(old, "origin")  # <clone or ds>@<the point>: the promoted clone's snapshot
            if _props(runner, ds, "type") is None:
                if _props(runner, clone, "type") is None:
                    raise PermanentError(f"neither {ds} nor {clone} exists on {runner.label}; the old replica "
                                         f"is {superseded}")
                self._rename_mounted(runner, clone, ds, stop)
            point = origin.split("@", 1)[1] if "@" in origin else ""
            log.info("%s on %s is the former %s (from @%s); the superseded replica is %s", ds, runner.label, clone,
                     point, superseded)
            return {"dataset": ds, "superseded": superseded, "point": point}

    def _supersede(self, runner: Runner, ds: str, clone: str, superseded: str, props: str,
                   stop: threading.Event) -> None:
        """Promote the clone (it takes the replica's snapshots up to its origin), then rename the replica."""
        now, new = _props(runner, ds, props), _props(runner, clone, props)
        if now is None:
            raise PermanentError(f"{ds} does not exist on {runner.label}: nothing was replaced")
        if new is not None and _value(new, "origin").startswith(ds + "@"):
            mountpoint, source = new.get("mountpoint", ("-", "-"))
            if source != "local" and mountpoint.startswith("/"):
                # Pin the clone's mountpoint: the datastore presented from it must not move with the rename.
                _halt(stop, f"pinning the mountpoint of {clone}")
                check(runner.run(["zfs", "set", f"mountpoint={mountpoint}", clone]), runner.label,
                      f"pinning the mountpoint of {clone}")
            _halt(stop, f"promoting {clone}")
            check(runner.run(["zfs", "promote", clone]), runner.label, f"promoting {clone}")
            now = _props(runner, ds, props) or now
        if not _value(now, "origin").startswith(clone + "@"):
            raise PermanentError(f"{clone} on {runner.label} is not a clone of a snapshot of {ds} (nor promoted "
                                 f"over it): nothing was replaced")
        _halt(stop, f"marking {ds}")
        check(runner.run(["zfs", "set", f"{SUPERSEDED_BY}={clone}", ds]), runner.label, f"marking {ds}")
        _unmount(runner, ds, stop, f"rename it to {superseded}")
        _halt(stop, f"renaming {ds} to {superseded}")
        check(runner.run(["zfs", "rename", ds, superseded]), runner.label, f"renaming {ds} to {superseded}")

    @staticmethod
    def _rename_mounted(runner: Runner, name: str, new_name: str, stop: threading.Event) -> None:
        """Rename keeping it mounted where it is (``-u``, OpenZFS 2.x); zfs-fuse: unmount, rename, mount."""
        _halt(stop, f"renaming {name} to {new_name}")
        result = runner.run(["zfs", "rename", "-u", name, new_name])
        if not result.ok and ("invalid option" in result.err or "usage" in result.err.lower()):
            _unmount(runner, name, stop, f"rename it to {new_name}")
            check(runner.run(["zfs", "rename", name, new_name]), runner.label, f"renaming {name} to {new_name}")
            mounted = runner.run(["zfs", "mount", new_name])
            if not mounted.ok and "already mounted" not in mounted.err:
                log.warning("could not mount %s on %s: %s", new_name, runner.label, mounted.err.strip())
            return
        check(result, runner.label, f"renaming {name} to {new_name}")


def _run_with_input(runner: ParamikoRunner, argv: list[str], data: bytes, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``argv`` on the host with ``data`` on its stdin (a key: never on a command line). (rc, stderr)."""
    transport = runner.client.get_transport()
    if transport is None or not transport.is_active():
        raise TransientError(f"SSH session to {runner.label} was lost")
    chan = transport.open_session(timeout=30)
    try:
        chan.settimeout(timeout)
        chan.exec_command(shlex.join(argv))
        chan.sendall(data)
        chan.shutdown_write()
        err = bytearray()
        deadline = time.monotonic() + timeout
        while not (chan.exit_status_ready() and not chan.recv_stderr_ready()):
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            while chan.recv_ready():
                chan.recv(65536)
            if time.monotonic() > deadline:
                raise TransientError(f"{argv[0]} {argv[1]} on {runner.label} did not finish within {timeout:.0f} s")
            chan.status_event.wait(0.05)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        return chan.recv_exit_status(), err.decode(errors="replace")
    except (OSError, socket.timeout, EOFError) as exc:
        raise TransientError(f"SSH session to {runner.label} failed during {argv[0]} {argv[1]}: {exc}") from None
    finally:
        chan.close()
