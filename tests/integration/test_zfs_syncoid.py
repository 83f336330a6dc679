"""The syncoid transport with sanoid's own snapshots on the source (the usual case for syncoid users).

syncoid 2.1 with ``--no-sync-snap`` sends up to the NEWEST source snapshot and cannot be told
another, so a foreign snapshot newer than Zerfaux's used to end on the target instead of ours
(the verify failed, and the next attempt refused: "a later job has already replicated past it").
"""

from __future__ import annotations

import uuid

import pytest

from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.replication import ReplicationProgress
from tests.integration.test_zfs_backend import (  # noqa: F401  (fixtures)
    assert_no_holds,
    assert_same,
    backend,
    names,
    replicate,
    request,
)
from tests.support.platforms import FUSE_LOCAL, OPENZFS, MiB, Platform, guids, write

pytestmark = pytest.mark.zfs


@pytest.mark.parametrize("platform", [FUSE_LOCAL, OPENZFS], indirect=True)
def test_a_foreign_snapshot_newer_than_ours_is_not_what_is_sent(backend: ZFSReplicationReal, platform: Platform,
                                                               names: tuple[str, str]) -> None:
    p, (src, dst) = platform, names
    made: list[str] = []

    def sanoid_snapshots(progress: ReplicationProgress) -> None:
        # The first report comes after our snapshot was made and before the stream starts:
        # sanoid's hourly snapshot lands in between, as it would on a busy source.
        if not made:
            made.append(f"autosnap_{uuid.uuid4().hex[:6]}_hourly")
            p.source.run(["zfs", "snapshot", f"{src}@{made[-1]}"])

    write(p.source, src, "disk.vmdk", 2 * MiB)
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, p, "syncoid"), sanoid_snapshots)
    assert_same(p, src, dst, first.snapshot_name)
    on_target = list(guids(p.target, dst))
    assert on_target == [first.snapshot_name], on_target  # ours, and not sanoid's newer one
    assert any("is newer than" in n and made[0] in n for n in first.notes), first.notes
    # The next job: incremental from ours, with another foreign snapshot newer than the job's.
    made.clear()
    write(p.source, src, "disk-flat.vmdk", 2 * MiB)
    second = replicate(backend, request(str(uuid.uuid4()), src, dst, p, "syncoid"), sanoid_snapshots)
    assert second.base_snapshot == first.snapshot_name
    assert_same(p, src, dst, second.snapshot_name)
    assert list(guids(p.target, dst)) == [first.snapshot_name, second.snapshot_name]
    assert_no_holds(p, src, dst)
