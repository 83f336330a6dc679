"""Dataset trees (``protection_groups.recursive``) against real zfs-fuse through the run's sshd.

A tree of three children and a grandchild is snapshotted at once (``zfs snapshot -r``) and each
dataset sent as its own stream. What a user would check on the DR host: every child there, the
same GUID per snapshot on both sides, identical file checksums; a child added later seeded, a
child removed on the source kept on the target (and named in the job's notes), a failure in one
child leaving the others whole and the retry finishing the rest, retention all-or-none per group
snapshot. zfs-fuse has no zvols (``zfs create -V``: "Function not implemented"): those are in
tests/integration/test_zfs_zvols.py, on the OpenZFS guest.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from handlers.backends.zfs.exec import Result
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.backends.zfs.treeplan import Tree as TreeListing
from handlers.backends.zfs.treeplan import parse_tree, tree_argv, whole_on_target
from handlers.errors import PermanentError
from handlers.replication import ReplicationProgress, ReplicationRequest
from tests.integration.test_zfs_backend import Interrupted, assert_no_holds, replicate, replicate_retrying, request
from tests.support.platforms import FUSE_LOCAL, FUSE_SSH, MiB, Platform, checksums, guids, write, zfs_get
from tests.support.zfs import mountpoint, secret_env
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.zfs

CHILDREN = ("a", "b", "c", "a/g")  # three children and a grandchild


@dataclass
class Tree:
    src: str  # the group's dataset
    dst: str  # its replica's name
    children: list[str]  # relative names, "" for the top

    def pairs(self) -> list[tuple[str, str]]:
        return [(self.src + ("/" + c if c else ""), self.dst + ("/" + c if c else "")) for c in self.children]


@pytest.fixture
def backend(platform: Platform) -> Iterator[ZFSReplicationReal]:
    b = ZFSReplicationReal(secret_env(platform.target, platform.source))
    yield b
    b.close()


@pytest.fixture
def tree(platform: Platform) -> Iterator[Tree]:
    source, target = platform.source, platform.target
    tag = uuid.uuid4().hex[:8]
    src = f"{source.pool}/tree{tag}"
    source.run(["zfs", "create", "-o", f"mountpoint={mountpoint('tree-' + tag)}", src])
    for child in CHILDREN:
        source.run(["zfs", "create", f"{src}/{child}"])  # mounted below the top (inherited mountpoint)
    target.run(["zfs", "create", "-p", "-o", "mountpoint=none", f"{target.pool}/dr"], check=False)
    yield Tree(src, f"{target.pool}/dr/tree{tag}", ["", *CHILDREN])
    source.run(["zfs", "destroy", "-R", src], check=False)
    target.run(["zfs", "destroy", "-R", f"{target.pool}/dr/tree{tag}"], check=False)


def tree_request(p: Platform, t: Tree, transport: str = "ssh", retention: int | None = None) -> ReplicationRequest:
    return replace(request(str(uuid.uuid4()), t.src, t.dst, p, transport, retention), recursive=True)


def fill(p: Platform, t: Tree, sizes: dict[str, int]) -> None:
    for (src, _), child in zip(t.pairs(), t.children):
        write(p.source, src, f"disk-{child.replace('/', '-') or 'top'}.vmdk", sizes.get(child, 256 * 1024))


def snapshots_if_any(p: Platform, dataset: str) -> dict[str, int]:
    """The target dataset's snapshots, or none when a killed full receive left no dataset."""
    if p.target.run(["zfs", "list", dataset], check=False).returncode != 0:
        return {}
    return guids(p.target, dataset)


def point_whole(p: Platform, t: Tree, snap: str) -> bool:
    """treeplan.whole_on_target over the hosts' real listings (what a recovery-point listing uses)."""
    def tree_of(host: ZFSHost, top: str) -> TreeListing | None:
        done = host.run(tree_argv(top, userrefs=True), check=False)
        return parse_tree(Result((), done.returncode, done.stdout.decode(), done.stderr.decode()), host.name, top)
    source = tree_of(p.source, t.src)
    assert source is not None
    return whole_on_target(source, tree_of(p.target, t.dst), t.dst)[snap]


def destroy_on_source(p: Platform, dataset: str) -> None:
    """``zfs destroy -r``, again while zfs-fuse still calls the just-read mount busy."""
    for _ in range(20):
        done = p.source.run(["zfs", "destroy", "-r", dataset], check=False)
        if done.returncode == 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"cannot destroy {dataset}: {done.stderr.decode(errors='replace')}")


def assert_tree_same(p: Platform, t: Tree, snap: str) -> None:
    """Every dataset of the tree on the target, at ``snap``, with the source's GUID and files."""
    for src, dst in t.pairs():
        assert guids(p.target, dst)[snap] == guids(p.source, src)[snap], dst
        assert checksums(p.target, f"{dst}@{snap}") == checksums(p.source, f"{src}@{snap}"), dst
        assert zfs_get(p.target, "type", dst) == "filesystem"


@pytest.mark.parametrize("platform,transport",
                         [(FUSE_LOCAL, "ssh"), (FUSE_SSH, "paramiko"), (FUSE_LOCAL, "syncoid")],
                         indirect=["platform"])
def test_tree_full_then_incremental(backend: ZFSReplicationReal, platform: Platform, tree: Tree,
                                    transport: str) -> None:
    p, t = platform, tree
    fill(p, t, {"b": 2 * MiB})
    seen: list[ReplicationProgress] = []
    first = replicate(backend, tree_request(p, t, transport), seen.append)
    assert first.base_snapshot is None
    assert first.children == ("a", "b", "c", "a/g")  # parent before child
    assert_tree_same(p, t, first.snapshot_name)
    # One atomic `zfs snapshot -r`: the same transaction group on every dataset of the source.
    txgs = {zfs_get(p.source, "createtxg", f"{src}@{first.snapshot_name}") for src, _ in t.pairs()}
    assert len(txgs) == 1, txgs
    # Progress sums the children: it ends at the job's total, which is at least every file's bytes.
    assert first.bytes_transferred >= (2 + 4 * 0.25) * MiB
    assert seen and seen[-1].bytes_transferred == first.bytes_transferred
    assert [s.bytes_transferred for s in seen] == sorted(s.bytes_transferred for s in seen)
    time.sleep(1.05)  # snapshot names carry the second
    write(p.source, f"{t.src}/a/g", "more.vmdk", 1 * MiB)
    second = replicate(backend, tree_request(p, t, transport))
    assert second.base_snapshot == first.snapshot_name
    assert_tree_same(p, t, second.snapshot_name)
    assert second.bytes_transferred < first.bytes_transferred  # incrementals: only a/g changed much
    for src, dst in t.pairs():  # every stream's holds (zfs-fuse counts them in userrefs) released
        assert_no_holds(p, src, dst)
    # Each child is its own dataset on the target, received stream by stream: no -R, no -F.
    listed = p.target.run(["zfs", "list", "-H", "-r", "-o", "name", t.dst]).stdout.decode().split()
    assert listed == [dst for _, dst in sorted(t.pairs(), key=lambda x: x[1])]


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_child_added_later_is_seeded(backend: ZFSReplicationReal, platform: Platform, tree: Tree) -> None:
    p, t = platform, tree
    fill(p, t, {})
    first = replicate(backend, tree_request(p, t))
    p.source.run(["zfs", "create", f"{t.src}/b/new"])
    write(p.source, f"{t.src}/b/new", "disk-new.vmdk", 512 * 1024)
    time.sleep(1.05)
    second = replicate(backend, tree_request(p, t))
    t.children.append("b/new")
    assert_tree_same(p, t, second.snapshot_name)
    # Seeded with a full send: the new child has only the newest group snapshot.
    assert set(guids(p.target, f"{t.dst}/b/new")) == {second.snapshot_name}
    assert first.snapshot_name in guids(p.target, t.dst)


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_child_removed_on_source_stays_on_target(backend: ZFSReplicationReal, platform: Platform, tree: Tree) -> None:
    p, t = platform, tree
    fill(p, t, {})
    first = replicate(backend, tree_request(p, t))
    kept = guids(p.target, f"{t.dst}/c")
    destroy_on_source(p, f"{t.src}/c")
    time.sleep(1.05)
    second = replicate(backend, tree_request(p, t, retention=1))
    assert guids(p.target, f"{t.dst}/c") == kept  # untouched: not destroyed, not pruned
    assert first.snapshot_name in kept
    note = [n for n in second.notes if f"{t.dst}/c" in n]
    assert note and "never destroys" in note[0], second.notes
    t.children.remove("c")
    assert_tree_same(p, t, second.snapshot_name)


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_failure_in_one_child_then_retry(backend: ZFSReplicationReal, platform: Platform, tree: Tree) -> None:
    p, t = platform, tree
    # Parent before child, siblings by name: top, a, b, c, a/g. The listener dies inside b's stream.
    # Progress comes every 0.1 s: b is large enough to be reported on well before its stream ends.
    fill(p, t, {"": 2 * MiB, "a": 2 * MiB, "b": 32 * MiB})
    req = tree_request(p, t)

    def die(progress: ReplicationProgress) -> None:
        if progress.bytes_transferred > 8 * MiB:
            raise Interrupted()

    with pytest.raises(Interrupted):
        replicate(backend, req, die)
    snap = next(n for n in guids(p.source, t.src) if n.startswith("zerfaux_"))
    # The datasets before b are whole at the group snapshot; b has none of it, the later ones are not there.
    for src, dst in t.pairs()[:2]:
        assert guids(p.target, dst)[snap] == guids(p.source, src)[snap]
    assert snap not in snapshots_if_any(p, f"{t.dst}/b")
    for child in ("c", "a/g"):
        assert p.target.run(["zfs", "list", f"{t.dst}/{child}"], check=False).returncode != 0
    assert not point_whole(p, t, snap)  # the top's replica has it, b's does not: no recovery point yet
    retry = replicate_retrying(backend, req)
    assert retry.snapshot_name == snap  # the same group snapshot, not a new one
    assert_tree_same(p, t, snap)
    assert point_whole(p, t, snap)
    # top and a were skipped by GUID: the retry moved b, c and a/g (about 33 MiB), not the whole 37.
    assert 32 * MiB < retry.bytes_transferred < 35 * MiB, retry.bytes_transferred


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_retention_prunes_a_group_snapshot_everywhere_or_nowhere(backend: ZFSReplicationReal, platform: Platform,
                                                                 tree: Tree) -> None:
    p, t = platform, tree
    made = []
    for i in range(3):
        fill(p, t, {})
        made.append(replicate(backend, tree_request(p, t, retention=1)).snapshot_name)
        if i == 0:  # someone holds one child's replica of the first group snapshot
            p.target.run(["zfs", "hold", "keep-me", f"{t.dst}/b@{made[0]}"])
        time.sleep(1.05)
    for src, dst in t.pairs():
        assert set(guids(p.source, src)) == {made[2]}, src
        # The hold on b keeps the first group snapshot on every child of the target, not only on b.
        assert set(guids(p.target, dst)) == {made[0], made[2]}, dst
    p.target.run(["zfs", "release", "keep-me", f"{t.dst}/b@{made[0]}"])


@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
def test_a_diverged_child_refuses_the_tree_before_any_snapshot(backend: ZFSReplicationReal, platform: Platform,
                                                               tree: Tree) -> None:
    p, t = platform, tree
    fill(p, t, {})
    first = replicate(backend, tree_request(p, t))
    p.target.run(["zfs", "snapshot", f"{t.dst}/a/g@made-at-dr"])
    before = {src: guids(p.source, src) for src, _ in t.pairs()}
    with pytest.raises(PermanentError, match=rf"{t.dst}/a/g has diverged.*made-at-dr"):
        replicate(backend, tree_request(p, t))
    assert {src: guids(p.source, src) for src, _ in t.pairs()} == before  # no group snapshot made
    assert "made-at-dr" in guids(p.target, f"{t.dst}/a/g")
    assert all(set(guids(p.target, dst)) == {first.snapshot_name} for _, dst in t.pairs()[:-1])


@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
def test_recovery_points_are_group_snapshots_whole_on_every_child(backend: ZFSReplicationReal, platform: Platform,
                                                                  tree: Tree) -> None:
    p, t = platform, tree
    made = []
    for _ in range(2):
        fill(p, t, {})
        made.append(replicate(backend, tree_request(p, t)).snapshot_name)
        time.sleep(1.05)
    p.target.run(["zfs", "destroy", f"{t.dst}/b@{made[0]}"])  # by hand, on one child's replica
    fill(p, t, {})
    last = replicate(backend, tree_request(p, t))
    points = {pt.snapshot_name: pt for pt in last.recovery_points}
    assert list(points) == [*made, last.snapshot_name]
    top = guids(p.source, t.src)
    assert all(points[n].guid == str(top[n]) and points[n].on_source for n in points)  # the top's GUID stands
    # The top's replica still has the first, b's does not: not a point to recover from any more.
    assert made[0] in guids(p.target, t.dst)
    assert [points[n].on_target for n in points] == [False, True, True]
    assert points[last.snapshot_name].bytes == last.bytes_transferred


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_a_retention_grid_prunes_group_snapshots_whole(platform: Platform, tree: Tree) -> None:
    """The target's grid (1 h of all, then 24 hourly) by the snapshots' given ages: the group snapshot
    older than the grid goes from every replica, the one held on one child stays on all; the source
    (no grid, no count) keeps everything. Ages are handed in as in test_zfs_grid.py."""
    p, t = platform, tree
    hours: dict[str, float] = {}
    now = int(time.time())
    backend = ZFSReplicationReal(secret_env(p.target, p.source),
                                 creation=lambda snap: now - int(hours.get(snap.name, 0) * 3600))
    try:
        made, outcomes = [], []
        for age in (50, 40, 0):  # each job's snapshot gets its age right after the job
            fill(p, t, {})
            outcomes.append(replicate(backend, replace(tree_request(p, t), retention_grid="1x1h(keep=all) | 24x1h")))
            made.append(outcomes[-1].snapshot_name)
            hours[made[-1]] = age
            if age == 50:
                p.target.run(["zfs", "hold", "keep-me", f"{t.dst}/b@{made[0]}"])
            time.sleep(1.05)
    finally:
        backend.close()
    for src, dst in t.pairs():
        assert set(guids(p.target, dst)) == {made[0], made[2]}, dst  # the 40 h old one: gone from every replica
        assert set(guids(p.source, src)) == set(made), src
    assert outcomes[2].pruned_target == (made[1],) and outcomes[2].pruned_source == ()
    p.target.run(["zfs", "release", "keep-me", f"{t.dst}/b@{made[0]}"])
