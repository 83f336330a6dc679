"""Which snapshots retention may destroy on each side, and the recovery points listed after it (no ZFS)."""

from __future__ import annotations

from handlers.backends.stub.points import StubReplica, fake_guid
from handlers.backends.zfs.grid import parse
from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.points import listing
from handlers.backends.zfs.retention import Policy, choose
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint

H = 3600
T = 1_800_000_000
TAG = "dr:22/tank/dr/vm"
BIG = 2**63 + 5  # GUIDs above bigint


def ours(n: int, hours_back: int, guid: int | None = None, target: str = TAG, refs: int = 0) -> Snap:
    stamp = f"2027010{n % 10}T{n:06d}Z"
    return Snap(f"zerfaux_{n:012d}_{stamp}", guid or 1000 + n, txg=100 - hours_back, userrefs=refs,
                target=target, creation=T - hours_back * H)


def test_a_grid_chooses_then_protection_vetoes() -> None:
    snaps = [ours(n, back) for n, back in enumerate([50, 40, 30, 3, 2, 1, 0])]
    grid = Policy(keep=1, grid=parse("1x1h(keep=all) | 2x1h"))  # ages (0,1h] all, (1h,2h], (2h,3h]
    assert [s.creation for s in choose(snaps, grid, set(), None)] == [T - 50 * H, T - 40 * H, T - 30 * H]
    held = [*snaps[:1], ours(1, 40, refs=1), *snaps[2:]]
    protected = {snaps[2].guid}
    assert choose(held, grid, protected, None) == [snaps[0]]


def test_foreign_and_other_replicas_snapshots_are_never_candidates() -> None:
    foreign = Snap("daily-2027", 1, txg=1, creation=T - 99 * H)
    other = ours(9, 90, target="elsewhere:22/x")
    snaps = [foreign, other, ours(1, 50), ours(2, 0)]
    policy = Policy(keep=1, grid=parse("1x1h"))
    assert choose(snaps, policy, set(), TAG) == [snaps[2]]  # the source: only this replica's
    assert choose(snaps, policy, set(), None) == [other, snaps[2]]  # the target: every one of ours
    assert choose(snaps, Policy(keep=1, grid=None), set(), TAG) == [snaps[2]]  # no grid: the count


def test_the_listing_matches_by_guid_and_marks_each_side() -> None:
    a, b, c = ours(1, 30, guid=BIG), ours(2, 20), ours(3, 0)
    gone_from_target = ours(4, 10)
    source = [a, gone_from_target, c, Snap("daily", 7, txg=1, creation=T)]
    # Received snapshots keep the sender's creation, have the target pool's txgs.
    target = [Snap(x.name, x.guid, x.txg + 500, creation=x.creation) for x in (a, b, c)]
    points = listing(source, target, TAG, c, sent_bytes=4096)
    assert [(p.snapshot_name, p.on_source, p.on_target) for p in points] == [
        (a.name, True, True), (b.name, False, True), (gone_from_target.name, True, False), (c.name, True, True)]
    assert points[0].guid == str(BIG) and points[0].created_at == "2027-01-14T02:00:00+00:00"
    assert [p.bytes for p in points] == [None, None, None, 4096]
    assert points[-1].created_at == "2027-01-15T08:00:00+00:00"


def test_the_stub_replica_lists_points_and_keeps_its_count() -> None:
    replica = StubReplica(None)
    ep = SSHEndpoint("dr", 22, "zerfaux", "k", None)
    req = ReplicationRequest("j", "tank/vm", "dr/vm", "ssh", ep, None, retention_snapshots=2, last_snapshot=None)
    for name in ("s1", "s2", "s3"):
        points, pruned = replica.received(req, name, 10)
    # What is left on both sides, and what this job pruned on neither.
    assert [(p.snapshot_name, p.on_source, p.on_target) for p in points] == [
        ("s1", False, False), ("s2", True, True), ("s3", True, True)]
    assert pruned == ("s1",) and not replica.complete  # in this process's memory only
    assert points[-1].guid == fake_guid("dr/vm", "s3") and int(points[-1].guid) > 2**63 - 1
    assert points[-1].bytes == 10 and points[1].bytes is None
