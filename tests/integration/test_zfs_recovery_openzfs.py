"""RecoveryStorageReal against OpenZFS 2.1 in the QEMU guest: the paths zfs-fuse cannot show.

``zfs holds`` lists the run's tag, retention reads the ``clones`` property, ``sharenfs`` takes
OpenZFS's dialect. Files are read with ``sha256sum`` in the guest; replication runs through the
real backend, source and target both over SSH.
"""

from __future__ import annotations

import hashlib
import threading
import uuid

import pytest

from handlers.backends.zfs.nfs import NFSExportError
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.backends.zfs.recovery import RecoveryStorageReal
from handlers.errors import PermanentError
from handlers.recovery.backends import run_tag
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint
from tests.support.platforms import guids, zfs_get
from tests.support.zfs import secret_env
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.openzfs

SIZE = 512 * 1024
DATA = (b"zerfaux\n" * (SIZE // 8 + 1))[:SIZE]


def endpoint(host: ZFSHost, secret: str) -> SSHEndpoint:
    return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, secret, host.host_key)


def test_openzfs_hold_clone_retention_export_destroy(openzfs_source: ZFSHost, openzfs_target: ZFSHost) -> None:
    src_host, dst = openzfs_source, openzfs_target
    tag, run, stop = uuid.uuid4().hex[:8], str(uuid.uuid4()), threading.Event()
    src, root = f"{src_host.pool}/rv{tag}", f"{dst.pool}/rr{tag}"
    replica, clone = f"{root}/vm", f"{root}/{run_tag(run)}"
    src_host.run(["zfs", "create", src])
    src_host.run(["sh", "-c", f'yes zerfaux | head -c {SIZE} > "$(zfs get -H -o value mountpoint {src})/disk.vmdk"; sync'])
    dst.run(["zfs", "create", root])
    secrets = secret_env(dst, src_host)
    storage, replication = RecoveryStorageReal(secrets), ZFSReplicationReal(secrets)
    ep, sep = endpoint(dst, "key-0"), endpoint(src_host, "key-1")

    def replicate() -> str:
        req = ReplicationRequest(job_id=str(uuid.uuid4()), source_dataset=src, target_dataset=replica,
                                 transport="ssh", target=ep, source=sep, retention_snapshots=1, last_snapshot=None)
        return replication.replicate(req, lambda p: None, stop).snapshot_name

    try:
        first = replicate()
        point, hold = f"{replica}@{first}", run_tag(run)
        assert storage.hold(ep, point, hold, stop) is True and storage.hold(ep, point, hold, stop) is False
        assert hold in dst.run(["zfs", "holds", "-H", point]).stdout.decode()
        assert b"dataset is busy" in dst.run(["zfs", "destroy", point], check=False).stderr

        info = storage.clone(ep, point, clone, run, stop)
        assert not info.adopted and zfs_get(dst, "mounted", clone) == "yes"
        out = dst.run(["sha256sum", f"{info.mountpoint}/disk.vmdk"]).stdout.decode().split()[0]
        assert out == hashlib.sha256(DATA).hexdigest()
        assert storage.clone(ep, point, clone, run, stop).adopted
        assert dst.run(["zfs", "get", "-H", "-o", "value", "clones", point]).stdout.decode().strip() == clone

        second = replicate()
        src_host.run(["sh", "-c", f'echo more >> "$(zfs get -H -o value mountpoint {src})/disk.vmdk"; sync'])
        third = replicate()
        kept = guids(dst, replica)
        assert first in kept and second not in kept and kept[third] == guids(src_host, src)[third]

        has_exportfs = dst.run(["sh", "-c", "command -v exportfs"], check=False).returncode == 0
        try:
            assert storage.export(ep, clone, stop) == info.mountpoint
        except NFSExportError as exc:  # the guest has no NFS server unless nfs-kernel-server is in it
            assert exc.sharenfs == "rw,no_root_squash,sync,crossmnt"
            assert ("no exportfs" in str(exc) and "install nfs-kernel-server" in str(exc)) == (not has_exportfs)
            assert exc.listed is False or has_exportfs
        assert zfs_get(dst, "sharenfs", clone) == "rw,no_root_squash,sync,crossmnt"
        assert storage.unexport(ep, clone, stop) is True and zfs_get(dst, "sharenfs", clone) == "off"

        with pytest.raises(PermanentError, match="not this run's clone"):
            storage.destroy_clone(ep, clone, str(uuid.uuid4()), stop)
        assert storage.destroy_clone(ep, clone, run, stop) is True
        assert storage.destroy_clone(ep, clone, run, stop) is False
        assert storage.release(ep, point, hold, stop) is True and storage.release(ep, point, hold, stop) is False
        assert hold not in dst.run(["zfs", "holds", "-H", point]).stdout.decode()
    finally:
        storage.close()
        replication.close()
        dst.run(["zfs", "destroy", "-R", root], check=False)
        src_host.run(["zfs", "destroy", "-R", src], check=False)
