"""Retention after a successful replication: destroy only our own snapshots beyond the newest N.

On the source only the snapshots made for this replica count (``zerfaux:target``), so another
target's base stays; never the snapshot just sent, never a held one (plan.prunable).
"""

from __future__ import annotations

from functools import partial

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner
from handlers.backends.zfs.plan import Snap, prunable
from handlers.backends.zfs.sides import Sides


def retain(sides: Sides, keep: int | None, sent: Snap, target_tag: str, cursor: bool = False) -> None:
    """``cursor``: the sent snapshot is bookmarked on the source (zfs/bookmarks.py), so the next job
    can send from the bookmark and the source need not keep the snapshot itself."""
    if keep is None:
        return
    s = sides
    ops.parallel(partial(_prune, s, s.src, s.src_ds, s.scaps, keep, sent, target_tag, cursor),
                 partial(_prune, s, s.tgt, s.tgt_ds, s.tcaps, keep, sent, None, False))


def source_protects_sent(cursor: bool) -> bool:
    """The one bookmark rule of retention: without a cursor, never prune the newest common snapshot."""
    return not cursor


def _prune(sides: Sides, runner: Runner, dataset: str, caps: ops.Caps, keep: int, sent: Snap,
           target: str | None, cursor: bool) -> None:
    if not caps.userrefs:
        sides.note(f"retention skipped on {runner.label}: this ZFS cannot say which snapshots are held")
        return
    protect = {sent.guid} if target is None or source_protects_sent(cursor) else set()
    for old in prunable(ops.snapshots(runner, dataset, caps) or [], keep, protect=protect, target=target):
        result = ops.destroy_snapshot(runner, dataset, old.name)
        if not result.ok:
            sides.note(f"retention could not destroy {dataset}@{old.name} on {runner.label}: {result.err.strip()}")
