"""Streams as OpenZFS allows them, in the QEMU guest: raw sends of an encrypted dataset, -L -e -c,
and the replication cursor (a bookmark) that lets the source prune its last common snapshot.

One guest boot for the module (session fixture); each test makes its own datasets. What is
checked is what an operator would check on the hosts: keystatus, mounting, GUIDs, file digests
through a clone, the block size a received file has, bookmarks and holds as ``zfs`` lists them.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import pytest

from handlers.backends.zfs.bookmarks import LAST_RECEIVED
from handlers.backends.zfs.flags import FLAGS_PROPERTY
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.errors import PermanentError
from handlers.replication import ReplicationOutcome, ReplicationRequest
from tests.support.openzfs import OpenZFSHost
from tests.support.platforms import MiB, checksums, guids, write, zfs_get
from tests.support.zfs import secret_env
from tests.support.zfshost import ZFSHost
from handlers.types import SSHEndpoint

pytestmark = [pytest.mark.openzfs, pytest.mark.zfs]


def endpoint(host: ZFSHost, secret: str) -> SSHEndpoint:
    return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, secret, host.host_key)


@pytest.fixture
def backend(openzfs_source: OpenZFSHost, openzfs_target: OpenZFSHost) -> Iterator[ZFSReplicationReal]:
    b = ZFSReplicationReal(secret_env(openzfs_target, openzfs_source))
    yield b
    b.close()


@pytest.fixture
def names(openzfs_source: OpenZFSHost, openzfs_target: OpenZFSHost) -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(4)
    src, dst = f"{openzfs_source.pool}/st{tag}", f"{openzfs_target.pool}/dr/st{tag}"
    openzfs_target.run(["zfs", "create", "-p", "-o", "mountpoint=none", f"{openzfs_target.pool}/dr"], check=False)
    yield src, dst
    for host, ds in ((openzfs_source, src), (openzfs_source, src + "p"), (openzfs_target, dst)):
        for snap in guids(host, ds) if host.run(["zfs", "list", ds], check=False).returncode == 0 else {}:
            host.run(["zfs", "release", LAST_RECEIVED, f"{ds}@{snap}"], check=False)
        host.run(["zfs", "destroy", "-R", ds], check=False)


def job(n: int, src: str, dst: str, source: OpenZFSHost, target: OpenZFSHost,
        retention: int | None = None) -> ReplicationRequest:
    return ReplicationRequest(
        job_id=f"5{n:07d}-0000-4000-8000-{secrets.token_hex(6)}", source_dataset=src, target_dataset=dst,
        transport="ssh", target=endpoint(target, "key-0"), source=endpoint(source, "key-1"),
        retention_snapshots=retention, last_snapshot=None, wire_compression="auto",
    )


def replicate(backend: ZFSReplicationReal, req: ReplicationRequest) -> ReplicationOutcome:
    return backend.replicate(req, lambda _: None, threading.Event())


def test_encrypted_dataset_goes_raw_and_stays_raw(backend: ZFSReplicationReal, openzfs_source: OpenZFSHost,
                                                  openzfs_target: OpenZFSHost, names: tuple[str, str]) -> None:
    src, dst = names
    key = f"/root/key-{src.rsplit('/', 1)[1]}"
    openzfs_source.run(["sh", "-c", f"echo 'correct horse battery staple' > {key}"])
    openzfs_source.run(["zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
                        "-o", f"keylocation=file://{key}", src])
    write(openzfs_source, src, "a", 2 * MiB)
    first = replicate(backend, job(1, src, dst, openzfs_source, openzfs_target))

    assert zfs_get(openzfs_target, "encryption", dst) == "aes-256-gcm"
    assert zfs_get(openzfs_target, "keystatus", dst) == "unavailable"
    assert zfs_get(openzfs_target, FLAGS_PROPERTY, dst) == "raw"
    openzfs_target.run(["zfs", "set", f"mountpoint=/{dst}", dst])  # as someone trying to read it would
    refused = openzfs_target.run(["zfs", "mount", dst], check=False)
    assert refused.returncode != 0 and b"key" in refused.stderr, refused.stderr  # no key at the DR site

    write(openzfs_source, src, "b", 1 * MiB)
    second = replicate(backend, job(2, src, dst, openzfs_source, openzfs_target))
    assert second.base_snapshot == first.snapshot_name
    assert zfs_get(openzfs_target, "keystatus", dst) == "unavailable"  # the incremental was raw too
    assert guids(openzfs_target, dst)[second.snapshot_name] == guids(openzfs_source, src)[second.snapshot_name]

    # A plaintext copy of the source (same snapshot GUIDs) must not continue the raw chain.
    plain = src + "p"
    openzfs_source.run(["sh", "-c", f"zfs send {src}@{second.snapshot_name} | zfs receive -u {plain}"])
    assert zfs_get(openzfs_source, "encryption", plain) == "off"
    before = guids(openzfs_target, dst)
    with pytest.raises(PermanentError) as refusal:
        replicate(backend, job(3, plain, dst, openzfs_source, openzfs_target))
    assert "seeded raw" in str(refusal.value) and "new replica" in str(refusal.value)
    assert guids(openzfs_target, dst) == before

    # With the key (as a failover would load it) the data is the source's.
    openzfs_target.run(["zfs", "load-key", "-L", f"file://{key}", dst])  # one guest: the source's key file
    assert checksums(openzfs_target, f"{dst}@{second.snapshot_name}") == \
        checksums(openzfs_source, f"{src}@{second.snapshot_name}")


def test_large_blocks_and_compressed_stream(backend: ZFSReplicationReal, openzfs_source: OpenZFSHost,
                                            openzfs_target: OpenZFSHost, names: tuple[str, str]) -> None:
    src, dst = names
    openzfs_source.run(["zfs", "create", "-o", "recordsize=1M", "-o", "compression=lz4", src])
    write(openzfs_source, src, "random", 3 * MiB)
    text = f"/{src}/text"
    openzfs_source.run(["sh", "-c", f"yes 'zerfaux replicates this line again and again' | head -c {8 * MiB} > {text}"
                                    " && sync"])
    outcome = replicate(backend, job(1, src, dst, openzfs_source, openzfs_target))

    assert not any("not supported" in note for note in outcome.notes), outcome.notes
    assert zfs_get(openzfs_target, FLAGS_PROPERTY, dst) == "L,e,c"
    # -c: the 8 MiB of text crossed as the pool's lz4 blocks (a plain stream carries over 11 MiB).
    assert 3 * MiB < outcome.bytes_transferred < 6 * MiB, outcome.bytes_transferred
    # -L: the replica's files kept their 1 MiB blocks (without -L they would be split into 128 KiB).
    clone = f"{openzfs_target.pool}/blk{secrets.token_hex(3)}"
    openzfs_target.run(["zfs", "clone", f"{dst}@{outcome.snapshot_name}", clone])
    try:
        size = openzfs_target.run(["stat", "-c", "%o", f"/{clone}/random"]).stdout.decode().strip()
    finally:
        openzfs_target.run(["zfs", "destroy", clone], check=False)
    assert size == str(MiB)
    assert checksums(openzfs_target, f"{dst}@{outcome.snapshot_name}") == \
        checksums(openzfs_source, f"{src}@{outcome.snapshot_name}")


def bookmarks_of(host: OpenZFSHost, dataset: str) -> dict[str, int]:
    out = host.run(["zfs", "list", "-H", "-p", "-t", "bookmark", "-d", "1", "-o", "name,guid", dataset]).stdout
    return {line.split("\t")[0].split("#", 1)[1]: int(line.split("\t")[1]) for line in out.decode().splitlines()}


def holders(host: OpenZFSHost, dataset: str) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for snap in guids(host, dataset):
        out = host.run(["zfs", "holds", "-H", f"{dataset}@{snap}"]).stdout.decode()
        tags[snap] = [line.split("\t")[1] for line in out.splitlines() if "\t" in line]
    return tags


def test_cursor_bookmark_lets_the_source_prune(backend: ZFSReplicationReal, openzfs_source: OpenZFSHost,
                                               openzfs_target: OpenZFSHost, names: tuple[str, str]) -> None:
    src, dst = names
    openzfs_source.run(["zfs", "create", src])
    write(openzfs_source, src, "a", 4 * MiB)
    first = replicate(backend, job(1, src, dst, openzfs_source, openzfs_target, retention=1))
    write(openzfs_source, src, "b", 1 * MiB)
    second = replicate(backend, job(2, src, dst, openzfs_source, openzfs_target, retention=1))

    assert list(guids(openzfs_source, src)) == [second.snapshot_name]  # retention: only the newest
    marks = bookmarks_of(openzfs_source, src)
    assert len(marks) == 1, marks  # the first cursor went when the second was made
    (cursor, cursor_guid), = marks.items()
    assert cursor.endswith(second.snapshot_name) and cursor_guid == guids(openzfs_source, src)[second.snapshot_name]
    assert holders(openzfs_target, dst) == {second.snapshot_name: [LAST_RECEIVED]}  # first pruned, hold moved

    # An outside pruner takes the last common snapshot too: the cursor still knows where the replica is.
    openzfs_source.run(["zfs", "destroy", f"{src}@{second.snapshot_name}"])
    write(openzfs_source, src, "c", 1 * MiB)
    third = replicate(backend, job(3, src, dst, openzfs_source, openzfs_target, retention=1))

    assert third.base_snapshot == "#" + cursor
    assert any("from the bookmark" in note for note in third.notes), third.notes
    assert third.bytes_transferred < 2 * MiB  # an incremental, not the 6 MiB dataset again
    assert guids(openzfs_target, dst)[third.snapshot_name] == guids(openzfs_source, src)[third.snapshot_name]
    assert checksums(openzfs_target, f"{dst}@{third.snapshot_name}") == \
        checksums(openzfs_source, f"{src}@{third.snapshot_name}")
    assert list(bookmarks_of(openzfs_source, src)) == [cursor.removesuffix(second.snapshot_name) + third.snapshot_name]
    assert holders(openzfs_target, dst) == {third.snapshot_name: [LAST_RECEIVED]}
    assert first.snapshot_name not in guids(openzfs_target, dst)
