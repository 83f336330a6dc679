"""``FailoverStorageReal`` on zfs-fuse pools through a real sshd: the replica around a failover.

Replicas are made by the real replication backend from a local source with files of known
content (the world of test_zfs_recovery.py). Every check reads the storage host itself (``zfs
get guid``, ``zfs list``, file digests of the mounted replica), not only what the backend said.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import pytest

from handlers.backends.zfs.failover import FailoverStorageReal
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.errors import PermanentError
from handlers.recovery.failover_backends import FailoverStorage, pre_failover_snapshot
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint
from tests.integration.test_zfs_recovery import EXPECTED, FILES, content, digests
from tests.support.platforms import create_dataset, guids, zfs_get
from tests.support.zfs import FuseHost, mountpoint, secret_env

pytestmark = pytest.mark.zfs


@dataclass
class World:
    source: FuseHost
    target: FuseHost
    src: str
    root: str
    replica: str
    storage: FailoverStorageReal
    replication: ZFSReplicationReal

    @property
    def ep(self) -> SSHEndpoint:
        t = self.target
        return SSHEndpoint(t.ssh_host, t.ssh_port, t.ssh_user, "key-0", t.host_key)

    def replicate(self) -> str:
        req = ReplicationRequest(job_id=str(uuid.uuid4()), source_dataset=self.src, target_dataset=self.replica,
                                 transport="ssh", target=self.ep, source=None, retention_snapshots=None,
                                 last_snapshot=None)
        return self.replication.replicate(req, lambda p: None, threading.Event()).snapshot_name

    def write_source(self, name: str, data: bytes) -> None:
        path = os.path.join(zfs_get(self.source, "mountpoint", self.src), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        os.sync()

    def zfs(self, *argv: str, check: bool = True) -> str:
        return self.target.run(["zfs", *argv], check=check).stdout.decode()

    def exists(self, dataset: str) -> bool:
        return self.target.run(["zfs", "list", "-H", "-o", "name", dataset], check=False).returncode == 0


@pytest.fixture
def world(zfs_source: FuseHost, zfs_target: FuseHost) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    src, root = f"{zfs_source.pool}/fv{tag}", f"{zfs_target.pool}/fr{tag}"
    create_dataset(zfs_source, src, f"fv-{tag}")
    zfs_target.run(["zfs", "create", "-o", f"mountpoint={mountpoint('fr-' + tag)}", root])
    w = World(zfs_source, zfs_target, src, root, f"{root}/vm{tag}", FailoverStorageReal(secret_env(zfs_target)),
              ZFSReplicationReal(secret_env(zfs_target)))
    for name, size in FILES.items():
        w.write_source(name, content(name, size))
    protocol: FailoverStorage = w.storage  # mypy checks the real class against the Protocol
    assert protocol is w.storage
    yield w
    w.storage.close()
    w.replication.close()
    for ds in (root, src):
        for _ in range(10):  # zfs-fuse may call a just-used mount busy for a moment
            done = zfs_target.run(["zfs", "destroy", "-R", "-f", ds], check=False)
            if done.returncode == 0 or b"does not exist" in done.stderr:
                break


def test_the_pre_failover_snapshot_is_made_once(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    w.replicate()
    name = pre_failover_snapshot(run)
    assert name.startswith("zerfaux_pre_failover_") and len(name) == len("zerfaux_pre_failover_") + 8
    first = w.storage.snapshot(w.ep, w.replica, name, stop, run_id=run)
    second = w.storage.snapshot(w.ep, w.replica, name, stop, run_id=run)
    assert (first.created, second.created) == (True, False)
    on_host = guids(w.target, w.replica)
    assert first.guid == second.guid == str(on_host[name])
    assert list(on_host).count(name) == 1
    assert zfs_get(w.target, "zerfaux:recovery_run", f"{w.replica}@{name}") == run


def test_writable_replica_rolled_back_to_the_newest_snapshot_hashes_as_before(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    point = w.replicate()
    pre = w.storage.snapshot(w.ep, w.replica, pre_failover_snapshot(run), stop, run_id=run)
    snap = pre.snapshot.split("@")[1]
    before = guids(w.target, w.replica)
    assert zfs_get(w.target, "mounted", w.replica) == "no"  # received with -u

    path = w.storage.promote_writable(w.ep, w.replica, stop)
    assert w.storage.promote_writable(w.ep, w.replica, stop) == path
    assert path == zfs_get(w.target, "mountpoint", w.replica)
    assert zfs_get(w.target, "mounted", w.replica) == "yes" and zfs_get(w.target, "readonly", w.replica) == "off"
    assert digests(path) == EXPECTED

    # What the DR VMs write after the failover: a disk overwritten, a new file.
    with open(os.path.join(path, "app-01/app-01-flat.vmdk"), "r+b") as fh:
        fh.write(os.urandom(1024 * 1024))
    with open(os.path.join(path, "db-01/new.log"), "wb") as fh:
        fh.write(os.urandom(256 * 1024))
    os.sync()
    assert digests(path) != EXPECTED
    written = w.storage.written_since(w.ep, w.replica, snap, stop)
    assert written.how in ("written", "send_stream"), written
    # Whole blocks: the 1 MiB overwritten and the 256 KiB file, plus a directory block or two.
    assert written.bytes is not None and 1024 * 1024 + 256 * 1024 <= written.bytes < 2 * 1024 * 1024, written
    assert not [s for s in guids(w.target, w.replica) if s.startswith("zerfaux_probe_")]  # the probe went

    assert w.storage.rollback(w.ep, w.replica, snap, stop) == (w.replica,)
    assert digests(zfs_get(w.target, "mountpoint", w.replica)) == EXPECTED
    assert guids(w.target, w.replica) == before  # every snapshot kept, GUIDs unchanged
    assert point in before
    assert w.storage.rollback(w.ep, w.replica, snap, stop) == (w.replica,)  # again: harmless
    again = w.storage.written_since(w.ep, w.replica, snap, stop)
    assert again.bytes is not None and again.bytes < 64 * 1024, again  # at most metadata, no file data


def test_rollback_to_an_older_snapshot_is_refused_and_nothing_destroyed(world: World) -> None:
    w, stop = world, threading.Event()
    older = w.replicate()
    w.write_source("db-01/more.bin", os.urandom(128 * 1024))
    newer = w.replicate()
    before = guids(w.target, w.replica)
    assert {older, newer} <= set(before)
    with pytest.raises(PermanentError) as refused:
        w.storage.rollback(w.ep, w.replica, older, stop)
    text = str(refused.value)
    assert f"{w.replica}@{newer}" in text and "newest" in text and "Nothing was rolled back" in text, text
    assert guids(w.target, w.replica) == before
    with pytest.raises(PermanentError, match="has no snapshot @nope"):
        w.storage.rollback(w.ep, w.replica, "nope", stop)


def test_rename_keeps_the_data_and_refuses_an_existing_name(world: World) -> None:
    w, stop = world, threading.Event()
    w.replicate()
    before = guids(w.target, w.replica)
    taken = f"{w.root}/taken"
    w.zfs("create", taken)
    with pytest.raises(PermanentError, match="exists .* never renames over"):
        w.storage.rename(w.ep, w.replica, taken, stop)
    assert w.exists(w.replica) and guids(w.target, w.replica) == before and guids(w.target, taken) == {}

    kept = f"{w.root}/kept-original"
    assert w.storage.rename(w.ep, w.replica, kept, stop) is True
    assert not w.exists(w.replica) and guids(w.target, kept) == before
    assert w.storage.rename(w.ep, w.replica, kept, stop) is False  # a retry after the rename: done
    path = w.storage.promote_writable(w.ep, kept, stop)
    assert digests(path) == EXPECTED  # the data is reachable under the new name
    with pytest.raises(PermanentError, match="does not exist"):
        w.storage.rename(w.ep, f"{w.root}/never-there", f"{w.root}/elsewhere", stop)


HOSTILE = ["pool/a;rm -rf /", "-R", "pool/../x", "pool/a b", "$(id)", "pool/a\nb", ""]


def test_hostile_names_are_refused_before_any_command(zfs_target: FuseHost) -> None:
    # No sshd answers on port 1: a command would fail as a TransientError, a refused name fails first.
    storage = FailoverStorageReal(secret_env(zfs_target))
    ep, stop = SSHEndpoint("127.0.0.1", 1, "root", "key-0", zfs_target.host_key), threading.Event()
    good = f"{zfs_target.pool}/fine"
    try:
        for bad in HOSTILE:
            calls: list[Callable[[], object]] = [
                partial(storage.snapshot, ep, bad, "zerfaux_pre_failover_0123abcd", stop),
                partial(storage.rollback, ep, bad, "snap", stop),
                partial(storage.promote_writable, ep, bad, stop),
                partial(storage.written_since, ep, bad, "snap", stop),
                partial(storage.rename, ep, bad, good + "2", stop),
                partial(storage.rename, ep, good, bad, stop),
            ]
            if "/" not in bad:  # as a snapshot name too
                calls += [partial(storage.snapshot, ep, good, bad, stop),
                          partial(storage.rollback, ep, good, bad, stop),
                          partial(storage.written_since, ep, good, bad, stop)]
            for call in calls:
                with pytest.raises(PermanentError, match="not an acceptable|is empty|not acceptable"):
                    call()
        with pytest.raises(PermanentError, match="within its pool"):
            storage.rename(ep, good, "otherpool/x", stop)
    finally:
        storage.close()


def test_a_probe_left_by_a_killed_attempt_is_removed_and_a_foreign_one_kept(world: World) -> None:
    w, stop = world, threading.Event()
    point = w.replicate()
    w.zfs("snapshot", "-o", "zerfaux:probe=1", f"{w.replica}@zerfaux_probe_deadbeef")  # a killed attempt's
    w.zfs("snapshot", f"{w.replica}@zerfaux_probe_cafe0000")  # somebody's, without the mark
    counted = w.storage.written_since(w.ep, w.replica, point, stop)
    assert counted.bytes is not None
    left = set(guids(w.target, w.replica))
    assert "zerfaux_probe_deadbeef" not in left and "zerfaux_probe_cafe0000" in left
    assert {s for s in left if s.startswith("zerfaux_probe_")} == {"zerfaux_probe_cafe0000"}


def test_the_replica_itself_is_exported_once_writable_and_unexported_again(world: World) -> None:
    from handlers.backends.zfs.nfs import NFSExportError

    w, stop = world, threading.Event()
    w.replicate()
    with pytest.raises(PermanentError, match="not mounted"):  # received -u: a failover makes it writable first
        w.storage.export_replica(w.ep, w.replica, stop)
    with pytest.raises(PermanentError, match="not a recovery clone"):  # the test failover's export refuses it
        w.storage.export(w.ep, w.replica, stop)
    path = w.storage.promote_writable(w.ep, w.replica, stop)
    try:
        assert w.storage.export_replica(w.ep, w.replica, stop, ["10.0.0.0/8"]) == path
    except NFSExportError as exc:  # this machine may have no NFS server: the property is set all the same
        assert exc.path == path
    assert zfs_get(w.target, "sharenfs", w.replica).startswith("10.0.0.0/8")
    assert w.storage.unexport_replica(w.ep, w.replica, stop) is True
    assert zfs_get(w.target, "sharenfs", w.replica) == "off"
    assert w.storage.unexport_replica(w.ep, w.replica, stop) is False
    assert digests(path) == EXPECTED  # sharing changed no file
