"""RecoveryStorageReal on zfs-fuse pools through a real sshd: holds, clones, exports, retention.

Replicas are made by the real replication backend (``ZFSReplicationReal``) from a local source
with files of known content; every check reads the storage host itself (``zfs get``, ``zfs
list``, file digests, the export table), never only what the backend returned.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from handlers.backends.zfs.nfs import ETAB, NFSD_THREADS, NFSExportError
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.backends.zfs.recovery import RecoveryStorageReal
from handlers.errors import OperationCancelled, PermanentError
from handlers.recovery.backends import run_tag
from handlers.replication import ReplicationOutcome, ReplicationRequest
from handlers.types import SSHEndpoint
from tests.support.platforms import create_dataset, guids, zfs_get
from tests.support.zfs import FuseHost, mountpoint, secret_env

pytestmark = pytest.mark.zfs

FILES = {"app-01/app-01-flat.vmdk": 3 * 1024 * 1024, "app-01/app-01.vmdk": 600, "db-01/db-01-flat.vmdk": 1024 * 1024}


def content(name: str, size: int) -> bytes:
    """Known bytes for a file: the test can say what each file must hash to without reading the source."""
    seed, out = hashlib.sha256(name.encode()).digest(), bytearray()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed * 64
    return bytes(out[:size])


def digests(root: str) -> dict[str, str]:
    found = {}
    for base, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(base, f), "rb") as fh:
                found[os.path.relpath(os.path.join(base, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


EXPECTED = {name: hashlib.sha256(content(name, size)).hexdigest() for name, size in FILES.items()}


def read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def endpoint(host: FuseHost) -> SSHEndpoint:
    return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, "key-0", host.host_key)


@dataclass
class World:
    source: FuseHost
    target: FuseHost
    src: str  # source dataset (mounted, files written)
    root: str  # target_root on the DR pool (mounted under the run's directory)
    replica: str
    storage: RecoveryStorageReal
    replication: ZFSReplicationReal

    @property
    def ep(self) -> SSHEndpoint:
        return endpoint(self.target)

    def replicate(self, retention: int | None = None) -> ReplicationOutcome:
        req = ReplicationRequest(job_id=str(uuid.uuid4()), source_dataset=self.src, target_dataset=self.replica,
                                 transport="ssh", target=self.ep, source=None, retention_snapshots=retention,
                                 last_snapshot=None)
        return self.replication.replicate(req, lambda p: None, threading.Event())

    def write(self, name: str, data: bytes) -> None:
        path = os.path.join(zfs_get(self.source, "mountpoint", self.src), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        subprocess.run(["sync"], check=False)

    def clone_name(self, run_id: str) -> str:
        return f"{self.root}/{run_tag(run_id)}"

    def zfs(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.target.run(["zfs", *argv], check=check)


@pytest.fixture
def world(zfs_source: FuseHost, zfs_target: FuseHost) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    src, root = f"{zfs_source.pool}/rv{tag}", f"{zfs_target.pool}/rr{tag}"
    create_dataset(zfs_source, src, f"rv-{tag}")
    zfs_target.run(["zfs", "create", "-o", f"mountpoint={mountpoint('rr-' + tag)}", root])
    storage = RecoveryStorageReal(secret_env(zfs_target))
    replication = ZFSReplicationReal(secret_env(zfs_target))
    w = World(zfs_source, zfs_target, src, root, f"{root}/vm{tag}", storage, replication)
    for name, size in FILES.items():
        w.write(name, content(name, size))
    yield w
    storage.close()
    replication.close()
    for ds in (root, src):
        for _ in range(10):  # zfs-fuse may call a just-used mount busy for a moment
            done = subprocess.run(["zfs", "destroy", "-R", "-f", ds], capture_output=True, check=False)
            if done.returncode == 0 or b"does not exist" in done.stderr:
                break


def listing(w: World) -> list[list[str]]:
    """What a person on the storage host sees: ``zfs list -o name,origin,zerfaux:recovery_run``."""
    out = w.zfs("list", "-H", "-r", "-o", "name,origin,zerfaux:recovery_run", w.root).stdout.decode()
    return [line.split("\t") for line in out.splitlines()]


def test_clone_twice_is_one_mounted_clone_whose_files_hash_like_the_snapshot(world: World) -> None:
    w, run = world, str(uuid.uuid4())
    snap = w.replicate().snapshot_name
    point = f"{w.replica}@{snap}"
    first = w.storage.clone(w.ep, point, w.clone_name(run), run, threading.Event())
    assert (first.dataset, first.origin, first.adopted) == (w.clone_name(run), point, False)
    assert zfs_get(w.target, "mounted", w.clone_name(run)) == "yes"
    assert zfs_get(w.target, "mounted", w.replica) == "no"  # the replica stays as received (-u)
    assert first.mountpoint == zfs_get(w.target, "mountpoint", w.clone_name(run))
    assert digests(first.mountpoint) == EXPECTED

    second = w.storage.clone(w.ep, point, w.clone_name(run), run, threading.Event())
    assert second.adopted and second.mountpoint == first.mountpoint
    rows = listing(w)
    assert [r for r in rows if r[1] != "-"] == [[w.clone_name(run), point, run]]
    assert w.storage.snapshot_guid(w.ep, point, threading.Event()) == str(guids(w.target, w.replica)[snap])
    assert w.storage.snapshot_guid(w.ep, f"{w.replica}@nosuch", threading.Event()) is None
    assert w.storage.available_bytes(w.ep, w.root, threading.Event()) == int(zfs_get(w.target, "available", w.root))


def test_the_clone_is_writable_and_the_replica_does_not_change(world: World) -> None:
    w, run = world, str(uuid.uuid4())
    snap = w.replicate().snapshot_name
    before = (guids(w.target, w.replica), zfs_get(w.target, "referenced", w.replica))
    info = w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, threading.Event())
    with open(os.path.join(info.mountpoint, "app-01", "app-01-flat.vmdk"), "r+b") as fh:
        fh.write(b"booted by the test VM" * 1000)
    with open(os.path.join(info.mountpoint, "new.log"), "wb") as fh:
        fh.write(os.urandom(512 * 1024))
    subprocess.run(["sync"], check=False)
    assert digests(info.mountpoint)["app-01/app-01-flat.vmdk"] != EXPECTED["app-01/app-01-flat.vmdk"]
    # zfs-fuse has no `written` property: the replica's snapshots (GUIDs), its size, and an
    # incremental receive without -F (refused if the replica had changed) say it is untouched.
    assert (guids(w.target, w.replica), zfs_get(w.target, "referenced", w.replica)) == before
    w.write("db-01/db-01.log", b"more data" * 4096)
    second = w.replicate()
    assert second.base_snapshot == snap
    after = guids(w.target, w.replica)
    assert {k: v for k, v in after.items() if k in before[0]} == before[0]
    assert after[second.snapshot_name] == guids(w.source, w.src)[second.snapshot_name]


def test_hold_refuses_destroy_and_release_is_idempotent(world: World) -> None:
    w, run = world, str(uuid.uuid4())
    snap = w.replicate().snapshot_name
    point, tag, stop = f"{w.replica}@{snap}", run_tag(run), threading.Event()
    assert w.storage.hold(w.ep, point, tag, stop) is True
    assert w.storage.hold(w.ep, point, tag, stop) is False  # already held: zfs-fuse says "tag already exists"
    assert zfs_get(w.target, "userrefs", point) == "1"
    refused = w.zfs("destroy", point, check=False)
    assert refused.returncode != 0, "a held snapshot was destroyed"
    assert snap in guids(w.target, w.replica)
    assert w.storage.release(w.ep, point, tag, stop) is True
    assert w.storage.release(w.ep, point, tag, stop) is False
    assert w.storage.release(w.ep, f"{w.replica}@gone", tag, stop) is False
    assert zfs_get(w.target, "userrefs", point) == "0"
    with pytest.raises(PermanentError, match="does not exist"):
        w.storage.hold(w.ep, f"{w.replica}@gone", tag, stop)


def test_a_name_taken_by_anything_else_is_refused_and_left_alone(world: World) -> None:
    w, stop = world, threading.Event()
    snap = w.replicate().snapshot_name
    point = f"{w.replica}@{snap}"
    run = str(uuid.uuid4())
    # A person's dataset at the run's name, with a file in it.
    w.zfs("create", w.clone_name(run))
    mine = os.path.join(zfs_get(w.target, "mountpoint", w.clone_name(run)), "keep.txt")
    with open(mine, "w") as fh:
        fh.write("not Zerfaux's")
    with pytest.raises(PermanentError, match="not this run's clone.*does not touch it"):
        w.storage.clone(w.ep, point, w.clone_name(run), run, stop)
    with pytest.raises(PermanentError, match="not this run's clone"):
        w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop)
    with pytest.raises(PermanentError, match="not a recovery clone"):
        w.storage.export(w.ep, w.clone_name(run), stop)
    assert read(mine) == "not Zerfaux's"
    assert zfs_get(w.target, "zerfaux:recovery_run", w.clone_name(run)) == "-"

    # A clone without the mark, and one of another run: refused, both still there.
    other = str(uuid.uuid4())
    w.zfs("clone", point, w.clone_name(other))
    with pytest.raises(PermanentError, match="not this run's clone.*recovery_run=unset"):
        w.storage.destroy_clone(w.ep, w.clone_name(other), other, stop)
    with pytest.raises(PermanentError, match="no zerfaux:recovery_run mark"):
        w.storage.clone(w.ep, point, w.clone_name(other), other, stop)
    third = str(uuid.uuid4())
    w.storage.clone(w.ep, point, w.clone_name(third), third, stop)
    with pytest.raises(PermanentError, match="not this run's clone"):
        w.storage.destroy_clone(w.ep, w.clone_name(third), str(uuid.uuid4()), stop)
    names = [r[0] for r in listing(w)]
    assert {w.clone_name(run), w.clone_name(other), w.clone_name(third)} <= set(names)


def test_destroy_clone_destroys_only_the_clone_and_is_idempotent(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    snap = w.replicate().snapshot_name
    before = guids(w.target, w.replica)
    w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop)
    w.zfs("snapshot", f"{w.clone_name(run)}@a-person-looked")  # the clone's own snapshot goes with it
    assert w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop) is True
    assert w.zfs("list", w.clone_name(run), check=False).returncode != 0
    assert guids(w.target, w.replica) == before
    assert [r[0] for r in listing(w)] == [w.root, w.replica]
    assert w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop) is False


def test_replication_goes_on_and_retention_keeps_the_cloned_snapshot(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    first = w.replicate(retention=1).snapshot_name
    point, tag = f"{w.replica}@{first}", run_tag(run)
    assert w.storage.hold(w.ep, point, tag, stop)
    w.storage.clone(w.ep, point, w.clone_name(run), run, stop)

    w.write("app-01/more.bin", os.urandom(256 * 1024))
    second = w.replicate(retention=1)
    assert second.base_snapshot == first  # incremental, into the replica that has a clone
    w.write("app-01/more2.bin", os.urandom(256 * 1024))
    third = w.replicate(retention=1)
    kept = guids(w.target, w.replica)
    assert first in kept and third.snapshot_name in kept  # held and cloned: kept
    assert second.snapshot_name not in kept  # retention did run: the one it may prune is gone
    assert kept[third.snapshot_name] == guids(w.source, w.src)[third.snapshot_name]
    # Replication releases only its own jobs' tags: the run's hold is still there.
    assert zfs_get(w.target, "userrefs", point) == "1"

    # The clone alone protects it (zfs-fuse has no `clones` property: retention reads `origin`).
    assert w.storage.release(w.ep, point, tag, stop)
    w.write("app-01/more3.bin", os.urandom(64 * 1024))
    fourth = w.replicate(retention=1)
    assert first in guids(w.target, w.replica) and first not in fourth.pruned_target

    # Without clone and hold it is an ordinary old snapshot again.
    assert w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop)
    w.write("app-01/more4.bin", os.urandom(64 * 1024))
    fifth = w.replicate(retention=1)
    assert first in fifth.pruned_target and first not in guids(w.target, w.replica)


def test_export_sets_sharenfs_and_says_exactly_what_the_host_did(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    snap = w.replicate().snapshot_name
    info = w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop)
    wanted = "*:rw,no_root_squash,sync,crossmnt"  # zfs-fuse's dialect: <client>:<options>
    exportfs, nfsd = shutil.which("exportfs"), os.path.exists(NFSD_THREADS) and read(NFSD_THREADS).strip() not in ("", "0")
    try:
        path = w.storage.export(w.ep, w.clone_name(run), stop)
        assert exportfs and nfsd, "export claimed success on a host that cannot serve NFS"
        assert path == info.mountpoint
    except NFSExportError as exc:
        assert not (exportfs and nfsd)
        assert exc.sharenfs == wanted and exc.path == info.mountpoint
        if exportfs is None:
            assert "no exportfs" in str(exc) and "install nfs-kernel-server" in str(exc)
            assert not exc.listed
        else:
            assert exc.listed and exc.served is False and "no NFS server runs" in str(exc)
    assert zfs_get(w.target, "sharenfs", w.clone_name(run)) == wanted
    if exportfs:
        table = read(ETAB)
        line = next(line for line in table.splitlines() if line.startswith(info.mountpoint + "\t"))
        assert "rw," in line and "no_root_squash" in line
    assert w.storage.unexport(w.ep, w.clone_name(run), stop) is True
    assert zfs_get(w.target, "sharenfs", w.clone_name(run)) == "off"
    if exportfs:
        assert not any(line.startswith(info.mountpoint + "\t") for line in read(ETAB).splitlines())
    assert w.storage.unexport(w.ep, w.clone_name(run), stop) is False
    assert w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop)
    assert w.storage.unexport(w.ep, w.clone_name(run), stop) is False


def test_export_names_the_clients_it_is_given_and_refuses_a_hostile_one(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    snap = w.replicate().snapshot_name
    w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop)
    with pytest.raises(PermanentError, match="replication_targets.nfs_clients"):
        w.storage.export(w.ep, w.clone_name(run), stop, clients=["esx-01;reboot"])
    with pytest.raises(PermanentError, match="replication_targets.nfs_clients"):
        w.storage.export(w.ep, w.clone_name(run), stop, clients=["esx 01"])
    assert zfs_get(w.target, "sharenfs", w.clone_name(run)) == "off"
    try:
        w.storage.export(w.ep, w.clone_name(run), stop, clients=["esx-01.dr.example", "10.1.2.0/24"])
    except NFSExportError:
        pass  # no NFS server here: the property is what this test checks
    assert zfs_get(w.target, "sharenfs", w.clone_name(run)) == \
        "esx-01.dr.example:rw,no_root_squash,sync,crossmnt 10.1.2.0/24:rw,no_root_squash,sync,crossmnt"
    assert w.storage.unexport(w.ep, w.clone_name(run), stop) is True
    assert w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop)


def test_a_tree_is_cloned_whole(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    child = f"{w.src}/disk1"
    w.source.run(["zfs", "create", child])
    with open(os.path.join(zfs_get(w.source, "mountpoint", child), "disk1-flat.vmdk"), "wb") as fh:
        fh.write(content("disk1", 700 * 1024))
    subprocess.run(["sync"], check=False)
    req = ReplicationRequest(job_id=str(uuid.uuid4()), source_dataset=w.src, target_dataset=w.replica,
                             transport="ssh", target=w.ep, source=None, retention_snapshots=None,
                             last_snapshot=None, recursive=True)
    snap = w.replication.replicate(req, lambda p: None, stop).snapshot_name
    info = w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop)
    rows = {r[0]: r for r in listing(w)}
    assert rows[f"{w.clone_name(run)}/disk1"][1:] == [f"{w.replica}/disk1@{snap}", run]
    assert zfs_get(w.target, "mounted", f"{w.clone_name(run)}/disk1") == "yes"
    found = digests(info.mountpoint)
    assert found["disk1/disk1-flat.vmdk"] == hashlib.sha256(content("disk1", 700 * 1024)).hexdigest()
    assert {k: v for k, v in found.items() if k in EXPECTED} == EXPECTED
    assert w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop).adopted
    assert w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop)
    assert [r[0] for r in listing(w)] == [w.root, w.replica, f"{w.replica}/disk1"]


@pytest.mark.parametrize("call", [
    lambda s, ep, ds: s.clone(ep, f"{ds}@s1", f"{ds.rsplit('/', 1)[0]}/zerfaux-test-deadbeef", "x; touch /tmp/pwned",
                              threading.Event()),
    lambda s, ep, ds: s.clone(ep, f"{ds}@s1;id", f"{ds.rsplit('/', 1)[0]}/zerfaux-test-00000000",
                              "00000000-0000-4000-8000-000000000000", threading.Event()),
    lambda s, ep, ds: s.clone(ep, f"{ds}@s1", "$(reboot)/zerfaux-test-00000000",
                              "00000000-0000-4000-8000-000000000000", threading.Event()),
    lambda s, ep, ds: s.clone(ep, f"{ds}@s1", f"{ds}/not-the-runs-name", "00000000-0000-4000-8000-000000000000",
                              threading.Event()),
    lambda s, ep, ds: s.hold(ep, f"{ds}@s1", "-r", threading.Event()),
    lambda s, ep, ds: s.release(ep, f"{ds}@`id`", "t", threading.Event()),
    lambda s, ep, ds: s.snapshot_guid(ep, "-o x@y", threading.Event()),
    lambda s, ep, ds: s.available_bytes(ep, "pool/a b", threading.Event()),
    lambda s, ep, ds: s.export(ep, "pool/a'b", threading.Event()),
    lambda s, ep, ds: s.unexport(ep, "pool/a|b", threading.Event()),
    lambda s, ep, ds: s.destroy_clone(ep, f"{ds}", "run id with spaces", threading.Event()),
])
def test_shell_hostile_names_are_refused_before_any_command(zfs_target: FuseHost, call: object) -> None:
    storage = RecoveryStorageReal(secret_env(zfs_target))
    try:
        with pytest.raises(PermanentError):
            call(storage, endpoint(zfs_target), f"{zfs_target.pool}/rr/vm")  # type: ignore[operator]
        assert storage.sessions.opened == 0  # refused before connecting, let alone running anything
        stopped = threading.Event()
        stopped.set()
        with pytest.raises(OperationCancelled):
            storage.hold(endpoint(zfs_target), f"{zfs_target.pool}/rr/vm@s1", "t", stopped)
        assert storage.sessions.opened == 0
    finally:
        storage.close()
    assert not os.path.exists("/tmp/pwned")
    with pytest.raises(ValueError):
        RecoveryStorageReal(secret_env(zfs_target), nfs_clients=["*;reboot"])


def test_a_target_root_without_mountpoint_still_gets_a_mounted_clone(world: World) -> None:
    """Replicas under a root with mountpoint=none are never mounted; the clone gets ZFS's default path."""
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    snap = w.replicate().snapshot_name
    bare = f"{w.root}/bare"
    w.zfs("create", "-o", "mountpoint=none", bare)
    clone = f"{bare}/{run_tag(run)}"
    try:
        info = w.storage.clone(w.ep, f"{w.replica}@{snap}", clone, run, stop)
        assert info.mountpoint == f"/{clone}" == zfs_get(w.target, "mountpoint", clone)
        assert zfs_get(w.target, "mounted", clone) == "yes"
        assert digests(info.mountpoint) == EXPECTED
        assert w.storage.destroy_clone(w.ep, clone, run, stop)
    finally:
        w.zfs("destroy", "-f", clone, check=False)
        shutil.rmtree(f"/{w.target.pool}", ignore_errors=True)  # the directories zfs made on /


def test_a_clone_someone_cloned_is_not_destroyed_with_theirs(world: World) -> None:
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    snap = w.replicate().snapshot_name
    w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop)
    w.zfs("snapshot", f"{w.clone_name(run)}@theirs")
    w.zfs("clone", f"{w.clone_name(run)}@theirs", f"{w.root}/their-copy")
    with pytest.raises(PermanentError, match="dependent clones"):
        w.storage.destroy_clone(w.ep, w.clone_name(run), run, stop)
    assert {w.clone_name(run), f"{w.root}/their-copy"} <= {r[0] for r in listing(w)}


def test_a_tree_clone_cut_short_is_completed_not_doubled(world: World) -> None:
    """A listener killed after the root's clone and before the child's: the retry adds the child."""
    w, run, stop = world, str(uuid.uuid4()), threading.Event()
    w.source.run(["zfs", "create", f"{w.src}/disk1"])
    req = ReplicationRequest(job_id=str(uuid.uuid4()), source_dataset=w.src, target_dataset=w.replica,
                             transport="ssh", target=w.ep, source=None, retention_snapshots=None,
                             last_snapshot=None, recursive=True)
    snap = w.replication.replicate(req, lambda p: None, stop).snapshot_name
    w.zfs("clone", "-o", f"zerfaux:recovery_run={run}", f"{w.replica}@{snap}", w.clone_name(run))
    info = w.storage.clone(w.ep, f"{w.replica}@{snap}", w.clone_name(run), run, stop)
    assert info.adopted
    clones = [r for r in listing(w) if r[1] != "-"]
    assert clones == [[w.clone_name(run), f"{w.replica}@{snap}", run],
                      [f"{w.clone_name(run)}/disk1", f"{w.replica}/disk1@{snap}", run]]
