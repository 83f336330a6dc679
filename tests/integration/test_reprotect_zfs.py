"""Reprotect storage on real ZFS, both sites over SSH: zfs-fuse through the run's sshd, and OpenZFS 2.1
in the QEMU guest (two pools of one guest play the two sites).

The primary's dataset is replicated forward to the DR replica by the real backend, the DR replica
is made writable as a failover does, both sites write, and then: the newest common snapshot, the
primary's changes kept (or discarded), and the reverse replication from DR back to the primary,
incremental from the common snapshot. Every check reads the hosts themselves (``zfs get guid``,
``zfs list``, file digests read on the host), not only what the backend said.
"""

from __future__ import annotations

import shlex
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from handlers.backends.zfs.failover import FailoverStorageReal
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.errors import OperationCancelled, PermanentError
from handlers.recovery.failover_backends import FailoverStorage, kept_names, pre_failover_snapshot
from handlers.replication import ReplicationOutcome, request_for
from handlers.types import SSHEndpoint
from tests.support.platforms import FUSE_SSH, OPENZFS, Platform, create_dataset, guids, write, zfs_get
from tests.support.zfs import mountpoint, secret_env
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.zfs
MiB = 1024 * 1024


def files(host: ZFSHost, directory: str) -> dict[str, str]:
    """{name: sha256} of the files in a mounted directory, read on the host."""
    out = host.run(["sh", "-c", 'cd "$1" && for f in *; do [ -f "$f" ] && sha256sum -- "$f"; done; true',
                    "sh", directory]).stdout.decode()
    return {line.split(None, 1)[1].strip(): line.split()[0] for line in out.splitlines() if line.strip()}


def snapshot_names(host: ZFSHost, pool: str) -> set[str]:
    out = host.run(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", pool]).stdout.decode()
    return set(out.split())


@dataclass
class Sites:
    p: Platform
    src: str  # the primary's dataset (protection_groups.source_dataset)
    replica: str  # the DR replica (<target_root>/<replica_name>)
    storage: FailoverStorageReal
    replication: ZFSReplicationReal

    @property
    def primary(self) -> SSHEndpoint:
        return self.p.endpoint(self.p.source, "key-1")

    @property
    def dr(self) -> SSHEndpoint:
        return self.p.endpoint(self.p.target, "key-0")

    def rows(self) -> tuple[dict[str, object], dict[str, object]]:
        s, t = self.p.source, self.p.target
        group = {"id": "g", "name": "reprotect", "source_dataset": self.src, "replica_name": self.replica.rsplit("/", 1)[1],
                 "source_ssh_host": s.ssh_host, "source_ssh_port": s.ssh_port, "source_ssh_user": s.ssh_user,
                 "source_ssh_key_secret": "key-1", "source_ssh_host_key": s.host_key, "retention_snapshots": None}
        target = {"id": "t", "name": "dr", "ssh_host": t.ssh_host, "ssh_port": t.ssh_port, "ssh_user": t.ssh_user,
                  "ssh_key_secret": "key-0", "ssh_host_key": t.host_key, "target_root": self.replica.rsplit("/", 1)[0],
                  "transport": "ssh"}
        return group, target

    def replicate(self, direction: str, keep_all: bool = False) -> ReplicationOutcome:
        group, target = self.rows()
        req = request_for(group, target, job_id=str(uuid.uuid4()), direction=direction, keep_all=keep_all)
        return self.replication.replicate(req, lambda p: None, threading.Event())


@pytest.fixture(params=[FUSE_SSH, OPENZFS])
def sites(request: pytest.FixtureRequest) -> Iterator[Sites]:
    name = str(request.param)
    if name == "openzfs":
        source, target = request.getfixturevalue("openzfs_source"), request.getfixturevalue("openzfs_target")
    else:
        source, target = request.getfixturevalue("zfs_source"), request.getfixturevalue("zfs_target")
    p = Platform(name, source, target, "ssh")
    tag = uuid.uuid4().hex[:8]
    src, root = f"{source.pool}/rp{tag}", f"{target.pool}/rr{tag}"
    create_dataset(source, src, f"rp-{tag}")
    target.run(["zfs", "create", *(["-o", f"mountpoint={mountpoint('rr-' + tag)}"] if target.local else []), root])
    secrets = secret_env(target, source)
    s = Sites(p, src, f"{root}/vm{tag}", FailoverStorageReal(secrets), ZFSReplicationReal(secrets))
    protocol: FailoverStorage = s.storage  # mypy checks the real class against the Protocol
    assert protocol is s.storage
    yield s
    s.storage.close()
    s.replication.close()
    for host, prefix in ((target, root), (source, src)):
        names = host.run(["zfs", "list", "-H", "-o", "name"], check=False).stdout.decode().split()
        for ds in [n for n in names if n == prefix or n.startswith(prefix + "_") or n.startswith(prefix + "/")]:
            host.run(["sh", "-c", f"zfs list -H -t snapshot -o name -r {shlex.quote(ds)} | "
                      "while read s; do zfs release zerfaux_reprotect_test \"$s\" 2>/dev/null; done; true"], check=False)
        for _ in range(10):  # clones first: destroy -R takes the dependants with it
            leftover = [n for n in host.run(["zfs", "list", "-H", "-o", "name"], check=False).stdout.decode().split()
                        if n == prefix or n.startswith(prefix + "_")]
            if not leftover:
                break
            for ds in leftover:
                host.run(["zfs", "destroy", "-R", "-f", ds], check=False)


TAG = "zerfaux_reprotect_test"


def unplanned_failover(s: Sites) -> tuple[str, dict[str, str]]:
    """Forward replication, then the DR replica written by 'its VMs' and the primary written on (both sides
    diverge from the common point). Returns (the common snapshot, the primary's files as they are now)."""
    write(s.p.source, s.src, "disk-flat.vmdk", s.p.size(8, 4))
    common = s.replicate("forward").snapshot_name
    # The primary goes on after the point: a snapshot of its own and unsnapshotted writes.
    write(s.p.source, s.src, "late-1.log", 256 * 1024)
    s.p.source.run(["zfs", "snapshot", f"{s.src}@manual-late"])
    write(s.p.source, s.src, "late-2.log", 128 * 1024)
    primary_now = files(s.p.source, zfs_get(s.p.source, "mountpoint", s.src))
    # The failover: the replica made writable; the DR VMs write.
    stop = threading.Event()
    s.storage.snapshot(s.dr, s.replica, pre_failover_snapshot(str(uuid.uuid4())), stop)
    where = s.storage.promote_writable(s.dr, s.replica, stop)
    write(s.p.target, s.replica, "dr-wrote.log", 512 * 1024)
    assert "dr-wrote.log" in files(s.p.target, where)
    return common, primary_now


def test_changes_are_kept_and_the_reverse_replication_sends_only_the_delta(sites: Sites) -> None:
    s, run, stop = sites, str(uuid.uuid4()), threading.Event()
    common, primary_now = unplanned_failover(s)
    found = s.storage.newest_common_snapshot(s.dr, s.replica, s.primary, s.src, stop)
    assert found is not None and found.name == common
    assert found.guid == str(guids(s.p.source, s.src)[common]) == str(guids(s.p.target, s.replica)[common])
    assert s.storage.snapshots_after(s.primary, s.src, common, stop) == ("manual-late",)
    assert s.storage.snapshots_after(s.dr, s.replica, common, stop) == (pre_failover_snapshot_name(s),)

    before = snapshot_names(s.p.source, s.p.source.pool)
    kept = s.storage.keep_changes(s.primary, s.src, common, TAG, run, stop)
    again = s.storage.keep_changes(s.primary, s.src, common, TAG, run, stop)
    assert kept == again
    name, snap = kept_names(s.src, run)
    assert (kept.kept_dataset, kept.kept_snapshot, kept.hold_tag, kept.clone) == (name, f"{name}@{snap}", TAG, s.src)
    # Every snapshot is still there (some under the kept name), plus the kept one; nothing destroyed.
    after = snapshot_names(s.p.source, s.p.source.pool)
    moved = {n.replace(f"{s.src}@", f"{name}@") for n in before if n.startswith(f"{s.src}@")}
    assert {n.split("@")[1] for n in before} <= {n.split("@")[1] for n in after}
    assert f"{name}@manual-late" in after and kept.kept_snapshot in after and f"{s.src}@{common}" in after
    assert len(after) == len(before) + 1 and moved - after <= {f"{name}@{common}"}
    # The primary's late data, unsnapshotted writes included, readable under the kept name.
    assert files(s.p.source, zfs_get(s.p.source, "mountpoint", name)) == primary_now
    destroy = s.p.source.run(["zfs", "destroy", kept.kept_snapshot], check=False)
    assert destroy.returncode != 0 and b"busy" in destroy.stderr  # held
    # ds is @common again, where it was mounted before.
    assert zfs_get(s.p.source, "guid", f"{s.src}@{common}") == found.guid
    assert s.storage.snapshots_after(s.primary, s.src, common, stop) == ()
    assert "late-1.log" not in files(s.p.source, zfs_get(s.p.source, "mountpoint", s.src))

    s.storage.set_readonly(s.primary, s.src, True, stop)  # the new direction's target
    s.p.source.run(["zfs", "umount", s.src], check=False)
    size = int(zfs_get(s.p.target, "used", s.replica))
    out = s.replicate("reverse", keep_all=True)
    assert out.base_snapshot == common
    assert zfs_get(s.p.source, "guid", f"{s.src}@{out.snapshot_name}") == \
        zfs_get(s.p.target, "guid", f"{s.replica}@{out.snapshot_name}")
    assert out.bytes_transferred < size / 4, (out.bytes_transferred, size)
    assert out.pruned_source == () and out.pruned_target == ()
    # The reverse replica carries what the DR VMs wrote; the kept data is untouched.
    reverse = s.p.source.run(["zfs", "list", "-H", "-o", "name", f"{s.src}@{out.snapshot_name}"])
    assert reverse.returncode == 0
    assert files(s.p.source, zfs_get(s.p.source, "mountpoint", name)) == primary_now
    assert snapshot_names(s.p.source, s.p.source.pool) >= after


def pre_failover_snapshot_name(s: Sites) -> str:
    return next(n for n in guids(s.p.target, s.replica) if n.startswith("zerfaux_pre_failover_"))


class StopAfter(threading.Event):
    """A stop signal that trips after ``n`` checks: a kill at the n-th step boundary of an operation."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_keep_changes_resumes_after_a_kill_at_any_step(sites: Sites) -> None:
    s, run = sites, str(uuid.uuid4())
    common, primary_now = unplanned_failover(s)
    name, _ = kept_names(s.src, run)
    stopped_at = []
    for n in range(40):
        try:
            kept = s.storage.keep_changes(s.primary, s.src, common, TAG, run, StopAfter(n))
            break
        except OperationCancelled:
            stopped_at.append(n)
            # Whatever the kill left, the primary's data is readable under one of the two names.
            there = s.p.source.run(["zfs", "list", "-H", "-o", "name", name], check=False).returncode == 0
            assert there or s.p.source.run(["zfs", "list", "-H", "-o", "name", s.src], check=False).returncode == 0
    else:
        raise AssertionError("keep_changes never finished")
    assert len(stopped_at) >= 6  # snapshot, hold, mark, unmount/rename, clone, promote
    assert files(s.p.source, zfs_get(s.p.source, "mountpoint", kept.kept_dataset)) == primary_now
    assert zfs_get(s.p.source, "guid", f"{s.src}@{common}") == zfs_get(s.p.target, "guid", f"{s.replica}@{common}")
    s.p.source.run(["zfs", "umount", s.src], check=False)
    out = s.replicate("reverse", keep_all=True)
    assert zfs_get(s.p.source, "guid", f"{s.src}@{out.snapshot_name}") == \
        zfs_get(s.p.target, "guid", f"{s.replica}@{out.snapshot_name}")


def test_keep_changes_refuses_without_the_common_snapshot_and_changes_nothing(sites: Sites) -> None:
    s, run, stop = sites, str(uuid.uuid4()), threading.Event()
    common, _ = unplanned_failover(s)
    before = snapshot_names(s.p.source, s.p.source.pool)
    with pytest.raises(PermanentError, match="does not exist"):
        s.storage.keep_changes(s.primary, s.src, "zerfaux_000000000000_20270101T000000Z", TAG, run, stop)
    assert snapshot_names(s.p.source, s.p.source.pool) == before
    # A dataset at the kept name that is not this run's is never touched.
    name, _ = kept_names(s.src, run)
    s.p.source.run(["zfs", "create", "-o", "mountpoint=none", name])
    with pytest.raises(PermanentError, match="not made by run"):
        s.storage.keep_changes(s.primary, s.src, common, TAG, run, stop)
    assert snapshot_names(s.p.source, s.p.source.pool) == before
    with pytest.raises(PermanentError, match="acceptable"):
        s.storage.keep_changes(s.primary, s.src + ";rm", common, TAG, run, stop)


def test_discard_changes_destroys_only_what_is_past_the_common_snapshot(sites: Sites) -> None:
    s, stop = sites, threading.Event()
    common, _ = unplanned_failover(s)
    # Not encrypted (zfs-fuse has no encryption at all): nothing to load, the secret is not even read.
    assert s.storage.load_key(s.dr, s.replica, "no-such-secret", stop) is False
    gone = s.storage.discard_changes(s.primary, s.src, common, stop)
    assert gone == (f"{s.src}@manual-late",)
    assert list(guids(s.p.source, s.src))[-1] == common
    assert s.storage.discard_changes(s.primary, s.src, common, stop) == ()
    s.storage.set_readonly(s.primary, s.src, True, stop)
    s.p.source.run(["zfs", "umount", s.src], check=False)
    out = s.replicate("reverse", keep_all=True)
    assert zfs_get(s.p.source, "guid", f"{s.src}@{out.snapshot_name}") == \
        zfs_get(s.p.target, "guid", f"{s.replica}@{out.snapshot_name}")


def test_rollback_then_destroying_the_pre_failover_snapshot_lets_the_next_forward_incremental_in(
        sites: Sites) -> None:
    s, run, stop = sites, str(uuid.uuid4()), threading.Event()
    write(s.p.source, s.src, "disk-flat.vmdk", s.p.size(4, 2))
    point = s.replicate("forward").snapshot_name
    pre = s.storage.snapshot(s.dr, s.replica, pre_failover_snapshot(run), stop, run_id=run)
    s.storage.promote_writable(s.dr, s.replica, stop)
    write(s.p.target, s.replica, "dr-wrote.log", 512 * 1024)
    s.storage.rollback(s.dr, s.replica, pre.snapshot.split("@")[1], stop)
    # Only this run's snapshot is destroyed: not the point, not one without the mark of its own.
    with pytest.raises(PermanentError, match="not made by run"):
        s.storage.destroy_snapshot(s.dr, f"{s.replica}@{point}", run, stop)
    with pytest.raises(PermanentError, match="not made by run"):
        s.storage.destroy_snapshot(s.dr, pre.snapshot, str(uuid.uuid4()), stop)
    assert s.storage.destroy_snapshot(s.dr, pre.snapshot, run, stop) is True
    assert s.storage.destroy_snapshot(s.dr, pre.snapshot, run, stop) is False
    assert list(guids(s.p.target, s.replica)) == [point]
    assert s.storage.set_readonly(s.dr, s.replica, True, stop) is True
    # zfs-fuse cannot say the setting of a mounted dataset (its "temporary" value): it sets it again.
    assert s.storage.set_readonly(s.dr, s.replica, True, stop) is (s.p.name != "openzfs" and
                                                                 zfs_get(s.p.target, "mounted", s.replica) == "yes")
    assert s.p.target.run(["touch", f"{zfs_get(s.p.target, 'mountpoint', s.replica)}/x"], check=False).returncode != 0
    write(s.p.source, s.src, "more.log", 256 * 1024)
    out = s.replicate("forward")
    assert out.base_snapshot == point
    assert zfs_get(s.p.target, "guid", f"{s.replica}@{out.snapshot_name}") == \
        zfs_get(s.p.source, "guid", f"{s.src}@{out.snapshot_name}")


def test_an_older_point_clone_replaces_the_replica_and_every_snapshot_stays(sites: Sites) -> None:
    s, run, stop = sites, str(uuid.uuid4()), threading.Event()
    write(s.p.source, s.src, "disk-flat.vmdk", s.p.size(4, 2))
    older = s.replicate("forward").snapshot_name
    write(s.p.source, s.src, "newer.log", 256 * 1024)
    newer = s.replicate("forward").snapshot_name
    root = s.replica.rsplit("/", 1)[0]
    clone = f"{root}/zerfaux-failover-{run[:8]}"
    s.p.target.run(["zfs", "clone", f"{s.replica}@{older}", clone])  # mounted where target_root's mountpoint says
    s.p.target.run(["zfs", "mount", clone], check=False)
    write(s.p.target, clone, "dr-wrote.log", 128 * 1024)
    mp = zfs_get(s.p.target, "mountpoint", clone)
    wrote = files(s.p.target, mp)
    for n in range(40):  # killed at each step in turn: every later call goes on from there
        try:
            done = s.storage.replace_with_clone(s.dr, s.replica, clone, run, StopAfter(n))
            break
        except OperationCancelled:
            # Whatever the kill left, both points are still there under one name or another.
            left = {n.split("@")[1] for n in snapshot_names(s.p.target, root)}
            assert {older, newer} <= left
    assert n >= 4  # pin, promote, mark, rename (and the clone's rename)
    assert s.storage.replace_with_clone(s.dr, s.replica, clone, run, stop) == done
    superseded = done["superseded"]
    assert superseded == f"{s.replica}_zerfaux_superseded_{run.replace('-', '')[:8]}"
    assert zfs_get(s.p.target, "mountpoint", s.replica) == mp and files(s.p.target, mp) == wrote
    # Nothing destroyed: the older point now belongs to the replica, the newer one to the superseded.
    assert older in guids(s.p.target, s.replica) and newer in guids(s.p.target, superseded)
    assert zfs_get(s.p.target, "origin", superseded) == f"{s.replica}@{older}" and done["point"] == older
    # The next forward incremental goes onto the promoted clone's newest snapshot: the point.
    assert list(guids(s.p.target, s.replica))[-1] == older


@pytest.mark.openzfs
def test_load_key_of_a_raw_received_replica(openzfs_source: ZFSHost, openzfs_target: ZFSHost,
                                            tmp_path: object) -> None:
    import os

    from handlers.secrets import SecretResolver
    tag = uuid.uuid4().hex[:8]
    key = "correct horse battery " + tag
    src, dst = f"{openzfs_source.pool}/enc{tag}", f"{openzfs_target.pool}/encr{tag}"
    openzfs_source.run(["sh", "-c", f"printf %s {shlex.quote(key)} | zfs create -o encryption=on "
                        f"-o keyformat=passphrase -o keylocation=prompt {src}"])
    try:
        write(openzfs_source, src, "data.bin", 256 * 1024)
        openzfs_source.run(["zfs", "snapshot", f"{src}@s1"])
        openzfs_source.run(["sh", "-c", f"zfs send -w {src}@s1 | zfs receive -u {dst}"])
        assert zfs_get(openzfs_target, "keystatus", dst) == "unavailable"
        secrets_dir = str(tmp_path)
        with open(os.path.join(secrets_dir, "enc-key"), "w") as fh:
            fh.write(key + "\n")
        with open(os.path.join(secrets_dir, "wrong-key"), "w") as fh:
            fh.write("not the key\n")
        env = {"ZERFAUX_SECRET_KEY_0": openzfs_target.private_key}
        storage = FailoverStorageReal(SecretResolver(env, secrets_dir))
        ep = SSHEndpoint(openzfs_target.ssh_host, openzfs_target.ssh_port, openzfs_target.ssh_user, "key-0",
                         openzfs_target.host_key)
        stop = threading.Event()
        try:
            with pytest.raises(PermanentError, match="wrong-key"):
                storage.load_key(ep, dst, "wrong-key", stop)
            assert zfs_get(openzfs_target, "keystatus", dst) == "unavailable"
            assert storage.load_key(ep, dst, "enc-key", stop) is True
            assert zfs_get(openzfs_target, "keystatus", dst) == "available"
            assert storage.load_key(ep, dst, "enc-key", stop) is False
            storage.promote_writable(ep, dst, stop)
            digest = openzfs_target.run(["sha256sum", f"{zfs_get(openzfs_target, 'mountpoint', dst)}/data.bin"])
            source_digest = openzfs_source.run(["sha256sum", f"{zfs_get(openzfs_source, 'mountpoint', src)}/data.bin"])
            assert digest.stdout.split()[0] == source_digest.stdout.split()[0]
            # Not encrypted: nothing to do.
            assert storage.load_key(ep, openzfs_target.pool, "enc-key", stop) is False
        finally:
            storage.close()
    finally:
        openzfs_target.run(["zfs", "destroy", "-r", "-f", dst], check=False)
        openzfs_source.run(["zfs", "destroy", "-r", "-f", src], check=False)
