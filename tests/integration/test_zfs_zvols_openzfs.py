"""zvols replicated as zvols, on OpenZFS 2.1 in the QEMU guest (zfs-fuse has no zvols:
``zfs create -V`` there answers "Function not implemented").

What a user would check on the DR host: the replica is a volume, its snapshot has the source's
GUID, and the block device of the snapshot reads the same bytes (sha256 of ``dd`` over a clone's
``/dev/zvol/...``) as the source's, after a full and after an incremental send; and a zvol that
is a child of a recursive group comes across as a volume too, its interrupted stream resumed by the
retry as a single dataset's would be. One guest boot for the module.
"""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.replication import ReplicationProgress
from tests.integration.test_zfs_backend import Interrupted, replicate, replicate_retrying, request
from tests.support.platforms import OPENZFS, MiB, Platform, guids, held, resume_token, zfs_get
from tests.support.zfs import secret_env
from tests.support.zfshost import ZFSHost

pytestmark = [pytest.mark.zfs, pytest.mark.openzfs]

VOLSIZE = "24M"


@pytest.fixture
def backend(platform: Platform) -> Iterator[ZFSReplicationReal]:
    b = ZFSReplicationReal(secret_env(platform.target, platform.source))
    yield b
    b.close()


def device(dataset: str) -> str:
    return f"/dev/zvol/{dataset}"


def wait_device(dataset: str) -> str:
    """Shell that waits (udev makes the link a moment after the zvol appears) for the device."""
    dev = shlex.quote(device(dataset))
    return f"udevadm settle; i=0; while [ ! -e {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -e {dev} ]"


def write_blocks(host: ZFSHost, dataset: str, offset_mib: int, mib: int) -> None:
    """``mib`` MiB of random data into the zvol at ``offset_mib``, flushed."""
    dev = shlex.quote(device(dataset))
    host.run(["sh", "-c", f"{wait_device(dataset)} && dd if=/dev/urandom of={dev} bs=1M seek={offset_mib} "
                          f"count={mib} conv=notrunc,fsync status=none"])


def snapshot_hash(host: ZFSHost, snapshot: str) -> str:
    """sha256 of the snapshot's block device, read through a temporary clone (the replica is left alone)."""
    clone = f"{host.pool}/verify{uuid.uuid4().hex[:8]}"
    script = (f"zfs clone {shlex.quote(snapshot)} {shlex.quote(clone)} && {wait_device(clone)} && "
              f"dd if={shlex.quote(device(clone))} bs=1M status=none | sha256sum")
    try:
        out = host.run(["sh", "-c", script]).stdout.decode().split()
    finally:
        for _ in range(20):  # the device may be busy for a moment after dd
            if host.run(["zfs", "destroy", clone], check=False).returncode == 0:
                break
            time.sleep(0.25)
    assert out and len(out[0]) == 64, out
    return out[0]


def assert_zvol_same(p: Platform, src: str, dst: str, snap: str) -> str:
    assert zfs_get(p.target, "type", dst) == "volume"
    assert zfs_get(p.target, "volsize", dst) == zfs_get(p.source, "volsize", src)
    assert guids(p.target, dst)[snap] == guids(p.source, src)[snap]
    digest = snapshot_hash(p.source, f"{src}@{snap}")
    assert snapshot_hash(p.target, f"{dst}@{snap}") == digest
    return digest


@pytest.mark.parametrize("platform", [OPENZFS], indirect=True)
def test_zvol_full_then_incremental(backend: ZFSReplicationReal, platform: Platform) -> None:
    p, tag = platform, uuid.uuid4().hex[:8]
    src, dst = f"{p.source.pool}/vol{tag}", f"{p.target.pool}/dr/vol{tag}"
    p.source.run(["zfs", "create", "-V", VOLSIZE, src])
    p.target.run(["zfs", "create", "-p", f"{p.target.pool}/dr"], check=False)
    try:
        write_blocks(p.source, src, 0, 6)
        first = replicate(backend, request(str(uuid.uuid4()), src, dst, p))
        assert first.base_snapshot is None and first.bytes_transferred >= 6 * MiB
        before = assert_zvol_same(p, src, dst, first.snapshot_name)
        time.sleep(1.05)  # snapshot names carry the second
        write_blocks(p.source, src, 10, 2)
        second = replicate(backend, request(str(uuid.uuid4()), src, dst, p))
        assert second.base_snapshot == first.snapshot_name
        assert 2 * MiB <= second.bytes_transferred < 4 * MiB, second.bytes_transferred  # only the change
        assert assert_zvol_same(p, src, dst, second.snapshot_name) != before
    finally:
        p.source.run(["zfs", "destroy", "-R", src], check=False)
        p.target.run(["zfs", "destroy", "-R", dst], check=False)


@pytest.mark.parametrize("platform", [OPENZFS], indirect=True)
def test_zvol_child_of_a_recursive_group_resumes(backend: ZFSReplicationReal, platform: Platform) -> None:
    """A tree's child is sent by the same rules as a single dataset: interrupted inside the zvol's
    stream, the retry keeps the group snapshot, skips the top by GUID and resumes the zvol's receive."""
    p, tag = platform, uuid.uuid4().hex[:8]
    top, dst = f"{p.source.pool}/tree{tag}", f"{p.target.pool}/dr/tree{tag}"
    p.source.run(["zfs", "create", top])
    p.source.run(["zfs", "create", "-V", VOLSIZE, f"{top}/lun0"])
    p.target.run(["zfs", "create", "-p", f"{p.target.pool}/dr"], check=False)
    try:
        write_blocks(p.source, f"{top}/lun0", 0, 16)
        p.source.run(["sh", "-c", f"head -c 1048576 /dev/urandom > /{top}/vm.vmx && sync"])
        req = replace(request(str(uuid.uuid4()), top, dst, p), recursive=True)
        estimates: list[int | None] = []

        def die(progress: ReplicationProgress) -> None:
            estimates.append(progress.bytes_estimated)
            if progress.bytes_transferred > 10 * MiB:  # the top's 1 MiB is sent, the zvol's stream well under way
                raise Interrupted()

        with pytest.raises(Interrupted):
            replicate(backend, req, die)
        snap = next(n for n in guids(p.source, top) if n.startswith("zerfaux_"))
        assert guids(p.target, dst)[snap] == guids(p.source, top)[snap]
        assert resume_token(p.target, f"{dst}/lun0"), "the zvol's interrupted receive leaves a token"
        assert held(p.source, f"{top}/lun0@{snap}")  # kept for the resume
        # bytes_estimated sums both streams (zfs send -nP of each): 16 MiB of blocks and a 1 MiB file.
        assert estimates and all(e is not None and 17 * MiB <= e <= 19 * MiB for e in estimates), estimates
        outcome = replicate_retrying(backend, req)
        assert outcome.snapshot_name == snap and outcome.children == ("lun0",)
        assert any("resumed" in n for n in outcome.notes), outcome.notes
        # The rest of the zvol only (the token's offset lags the bytes relayed by a few MiB); starting
        # over would send all of its 16 MiB again.
        assert 0 < outcome.bytes_transferred < 14 * MiB, outcome.bytes_transferred
        assert zfs_get(p.target, "type", dst) == "filesystem"
        assert resume_token(p.target, f"{dst}/lun0") is None
        assert_zvol_same(p, f"{top}/lun0", f"{dst}/lun0", snap)
        for host, dataset in ((p.source, top), (p.source, f"{top}/lun0"), (p.target, dst), (p.target, f"{dst}/lun0")):
            assert not any(held(host, f"{dataset}@{n}") for n in guids(host, dataset)), dataset
    finally:
        p.source.run(["zfs", "destroy", "-R", top], check=False)
        p.target.run(["zfs", "destroy", "-R", dst], check=False)
