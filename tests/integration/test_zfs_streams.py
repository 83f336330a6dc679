"""Stream options on zfs-fuse: what it lacks is noted and fallen back from; wire compression round trips.

zfs-fuse 0.7 has no -L -e -c -w and no bookmarks: a replication says so in its notes, records the
chain's flags as ``none``, and source retention keeps the newest common snapshot. Wire compression
runs as a pipe stage on both hosts for the ssh and paramiko transports; what crossed is checked by
the bytes counted and the replica's file digests. A bad ``wire_compression`` is refused by the
database and by the backend, each naming the column.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from handlers.backends.zfs.flags import FLAGS_PROPERTY
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.errors import PermanentError
from handlers.replication import ReplicationOutcome, ReplicationRequest, build_request
from tests.support.pg import Database
from tests.support.platforms import FUSE_LOCAL, FUSE_SSH, MiB, Platform, checksums, create_dataset, guids, write, zfs_get
from tests.support.zfs import secret_env

pytestmark = pytest.mark.zfs


@pytest.fixture
def backend(platform: Platform) -> Iterator[ZFSReplicationReal]:
    b = ZFSReplicationReal(secret_env(platform.target, platform.source))
    yield b
    b.close()


@pytest.fixture
def names(platform: Platform) -> Iterator[tuple[str, str]]:
    source, target = platform.source, platform.target
    tag = uuid.uuid4().hex[:8]
    src = f"{source.pool}/ws{tag}"
    create_dataset(source, src, "ws-" + tag)
    target.run(["zfs", "create", "-p", "-o", "mountpoint=none", f"{target.pool}/dr"], check=False)
    yield src, f"{target.pool}/dr/ws{tag}"
    source.run(["zfs", "destroy", "-R", src], check=False)
    target.run(["zfs", "destroy", "-R", f"{target.pool}/dr/ws{tag}"], check=False)


def request(n: int, src: str, dst: str, p: Platform, transport: str = "ssh", wire: str = "off",
            retention: int | None = None) -> ReplicationRequest:
    return ReplicationRequest(
        job_id=f"6{n:07d}-0000-4000-8000-{uuid.uuid4().hex[:12]}", source_dataset=src, target_dataset=dst,
        transport=transport, target=p.endpoint(p.target, "key-0"),
        source=p.endpoint(p.source, "key-1") if p.mode == "ssh" else None,
        retention_snapshots=retention, last_snapshot=None, wire_compression=wire,
    )


def replicate(backend: ZFSReplicationReal, req: ReplicationRequest) -> ReplicationOutcome:
    return backend.replicate(req, lambda _: None, threading.Event())


def write_text(p: Platform, dataset: str, name: str, size: int) -> None:
    """A compressible file: log-like lines, as much of a VM image is."""
    line = b"2026-12-01 12:00:00 web-01 GET /api/v1/orders 200 user=alice session=42\n"
    with open(os.path.join(zfs_get(p.source, "mountpoint", dataset), name), "wb") as fh:
        fh.write((line * (size // len(line) + 1))[:size])
    subprocess.run(["sync"], check=False)


@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
def test_fallbacks_are_noted_and_the_newest_common_stays(backend: ZFSReplicationReal, platform: Platform,
                                                          names: tuple[str, str]) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "a", 2 * MiB)
    first = replicate(backend, request(1, src, dst, p, retention=1))
    write(p.source, src, "b", 1 * MiB)
    second = replicate(backend, request(2, src, dst, p, retention=1))

    for outcome in (first, second):
        assert any("large blocks (-L), embedded data (-e), compressed stream (-c) not supported by this ZFS" in n
                   for n in outcome.notes), outcome.notes
    assert second.base_snapshot == first.snapshot_name
    assert zfs_get(p.target, FLAGS_PROPERTY, dst) == "none"
    # No bookmarks here: the source keeps the newest common snapshot for the next incremental.
    assert list(guids(p.source, src)) == [second.snapshot_name]
    assert guids(p.target, dst)[second.snapshot_name] == guids(p.source, src)[second.snapshot_name]


@pytest.mark.parametrize("platform,transport,wire", [
    pytest.param(FUSE_SSH, "ssh", "zstd", id="ssh-zstd"),
    pytest.param(FUSE_SSH, "paramiko", "lz4", id="paramiko-lz4"),
    pytest.param(FUSE_LOCAL, "ssh", "auto", id="local-auto"),
], indirect=["platform"])
def test_wire_compression_round_trip(backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str],
                                     transport: str, wire: str) -> None:
    p, (src, dst) = platform, names
    write_text(p, src, "log", 8 * MiB)
    first = replicate(backend, request(1, src, dst, p, transport, wire))
    write_text(p, src, "log2", 4 * MiB)
    second = replicate(backend, request(2, src, dst, p, transport, wire))

    assert first.bytes_transferred < 8 * MiB / 5, first  # the stream crossed compressed
    assert 0 < second.bytes_transferred < 4 * MiB / 5, second
    assert not any("wire compression" in n for n in first.notes + second.notes), first.notes
    for snap in (first.snapshot_name, second.snapshot_name):
        assert guids(p.target, dst)[snap] == guids(p.source, src)[snap]
    assert checksums(p.target, f"{dst}@{second.snapshot_name}") == checksums(p.source, f"{src}@{second.snapshot_name}")


@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
def test_bad_wire_compression_is_refused_by_the_backend(backend: ZFSReplicationReal, platform: Platform) -> None:
    req = request(1, f"{platform.source.pool}/none", f"{platform.target.pool}/dr/none", platform, wire="gzip")
    with pytest.raises(PermanentError, match=r"replication_targets\.wire_compression 'gzip' is unknown"):
        replicate(backend, req)


def test_wire_compression_column(seeded_db: Database) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="replication_targets_wire_compression_check"):
        seeded_db.sql("update replication_targets set wire_compression = 'gzip'")
    target = seeded_db.one("select to_jsonb(t) as row from replication_targets t limit 1")["row"]
    assert target["wire_compression"] == "auto"  # the default, measured (docs/replication.md)
    group = seeded_db.one("select to_jsonb(g) as row from protection_groups g where replication_target_id = %s",
                          (target["id"],))["row"]
    payload = {"job": {"id": "70000000-0000-4000-8000-000000000001", "target_dataset": "tank/dr/x"},
               "group": group, "target": target}
    assert build_request(payload).wire_compression == "auto"
