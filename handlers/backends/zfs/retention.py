"""Retention after a successful replication: destroy only our own snapshots the policy lets go.

Each side has its policy: the group's grid for that side (``retention_grid`` on the target,
``source_retention_grid`` on the source, handlers/backends/zfs/grid.py), or without one the
newest ``retention_snapshots`` of ours. Only our snapshots take part (our name; on the source
also made for this replica, ``zerfaux:target``, so another target's base stays). Whatever the
policy chose, never destroyed on either side: the snapshot just sent, the newest common
snapshot, a held snapshot (or one whose holds the ZFS cannot count), a snapshot with clones
(a test failover runs on one). A snapshot we did not make is never a candidate.

The grid reads each snapshot's creation through ``Creation``: the ZFS ``creation`` property,
unless the caller hands in another (the integration tests give snapshots old creation times
this way, since ZFS cannot be told to date a snapshot in the past).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner
from handlers.backends.zfs.grid import Grid, fit
from handlers.backends.zfs.plan import OURS, Snap, newest_common, prunable
from handlers.backends.zfs.sides import Sides

Creation = Callable[[Snap], int]  # a snapshot's creation, seconds since the epoch


def zfs_creation(snap: Snap) -> int:
    return snap.creation


@dataclass(frozen=True)
class Policy:
    keep: int | None  # retention_snapshots, for a side without a grid; None: keep everything there
    grid: Grid | None


def choose(snaps: Sequence[Snap], policy: Policy, protect: set[int], target: str | None,
           creation: Creation = zfs_creation) -> list[Snap]:
    """The snapshots retention may destroy on one side, oldest first (no I/O; clones are checked after).

    ``protect``: GUIDs never to destroy. ``target`` (on the source): only snapshots made for that
    replica take part, in the grid as in the count."""
    ours = sorted((s for s in snaps if OURS.fullmatch(s.name) and (target is None or s.target == target)),
                  key=lambda s: s.txg)
    if policy.grid is not None:
        excess = fit(policy.grid, ours, creation)[1]
    elif policy.keep is not None:
        excess = prunable(ours, policy.keep, target=target)
    else:
        return []
    return [s for s in excess if s.guid not in protect and s.userrefs == 0]


def retain(sides: Sides, source: Policy, target: Policy, sent: Snap, target_tag: str,
           src_snaps: list[Snap], tgt_snaps: list[Snap],
           creation: Creation = zfs_creation, cursor: bool = False) -> tuple[list[str], list[str]]:
    """Prune both sides at once; the names destroyed on (the source, the target).

    ``cursor``: the sent snapshot is bookmarked on the source (zfs/bookmarks.py), so the next job
    can send from the bookmark and the source need not keep the newest common snapshot itself."""
    s = sides
    protect = {sent.guid}
    common = newest_common(src_snaps, tgt_snaps)
    if common is not None:
        protect.add(common[0].guid)
    src_protect = protect if source_protects_sent(cursor) else set()
    found = ops.parallel(
        partial(_prune, s, s.src, s.src_ds, s.scaps, source, choose(src_snaps, source, src_protect, target_tag, creation)),
        partial(_prune, s, s.tgt, s.tgt_ds, s.tcaps, target, choose(tgt_snaps, target, protect, None, creation)))
    return found[0], found[1]


def source_protects_sent(cursor: bool) -> bool:
    """The one bookmark rule of retention: without a cursor, never prune the newest common snapshot."""
    return not cursor


def _prune(sides: Sides, runner: Runner, dataset: str, caps: ops.Caps, policy: Policy,
           chosen: list[Snap]) -> list[str]:
    if policy.grid is None and policy.keep is None:
        return []
    if not caps.userrefs:
        sides.note(f"retention skipped on {runner.label}: this ZFS cannot say which snapshots are held")
        return []
    if not chosen:
        return []
    cloned = snapshots_with_clones(runner, dataset)
    if cloned is None:
        sides.note(f"retention skipped on {runner.label}: could not tell which snapshots of {dataset} have clones")
        return []
    destroyed = []
    for old in chosen:
        if old.name in cloned:
            continue
        result = ops.destroy_snapshot(runner, dataset, old.name)
        if result.ok:
            destroyed.append(old.name)
        else:
            sides.note(f"retention could not destroy {dataset}@{old.name} on {runner.label}: {result.err.strip()}")
    return destroyed


def snapshots_with_clones(runner: Runner, dataset: str) -> set[str] | None:
    """Names of ``dataset``'s snapshots that have clones; None when the ZFS will not say.

    OpenZFS has the ``clones`` property; zfs-fuse does not, so there every dataset of the pool is
    asked for its ``origin`` (one command either way)."""
    listed = runner.run(["zfs", "get", "-H", "-d", "1", "-o", "name,value", "clones", dataset])
    found: set[str] = set()
    if listed.ok:
        for line in listed.out.splitlines():
            name, _, value = line.partition("\t")
            if name.startswith(dataset + "@") and value.strip() not in ("", "-"):
                found.add(name.split("@", 1)[1])
        return found
    pool = dataset.split("/", 1)[0]
    origins = runner.run(["zfs", "get", "-H", "-r", "-o", "value", "origin", pool])
    if not origins.ok:
        return None
    for line in origins.out.splitlines():
        if line.startswith(dataset + "@"):
            found.add(line.strip().split("@", 1)[1])
    return found
