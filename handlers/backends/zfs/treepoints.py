"""After a tree's replication: retention for the whole tree, then the group's recovery points.

Each side's policy is the one a single dataset gets (retention.py: the side's grid, else the
newest ``retention_snapshots`` of ours; never the snapshot just sent, the newest common one, a
held one or one with clones), decided per dataset and then per group snapshot: a name goes from
every dataset of that side having it, or from none (``treeplan.whole_groups``). The recovery points
are those of the top dataset (points.listing), a point counting as on the target only when every
child that has it on the source has its replica there by GUID (``treeplan.whole_on_target``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner
from handlers.backends.zfs.grid import parse
from handlers.backends.zfs.plan import newest_common
from handlers.backends.zfs.points import Settled, listing
from handlers.backends.zfs.retention import Creation, Policy, choose, snapshots_with_clones
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.treeplan import Tree, target_name, whole_groups, whole_on_target
from handlers.replication import ReplicationRequest

Trees = Callable[[], "tuple[Tree, Tree | None]"]


def settle_tree(sides: Sides, request: ReplicationRequest, members: list[str], name: str, target_tag: str,
                sent_bytes: int | None, creation: Creation, trees: Trees) -> Settled:
    """Prune the tree by the group's policies, then list the group's recovery points."""
    s = sides
    source, target = trees()
    pairs = [(d, target_name(s.src_ds, s.tgt_ds, d)) for d in members]
    policies = (Policy(request.retention_snapshots, parse(request.source_retention_grid)),
                Policy(request.retention_snapshots, parse(request.retention_grid)))
    gone: list[list[str]] = [[], []]
    if target is not None:
        keep_src, keep_tgt = _protected(source, target, pairs, name)
        for i, (runner, caps, tree, keep, tag) in enumerate(((s.src, s.scaps, source, keep_src, target_tag),
                                                             (s.tgt, s.tcaps, target, keep_tgt, None))):
            if policies[i].grid is None and policies[i].keep is None:
                continue
            if not caps.userrefs:
                s.note(f"retention skipped on {runner.label}: this ZFS cannot say which snapshots are held")
                continue
            gone[i] = _prune(s, runner, tree, keep, policies[i], tag, creation)
        if gone[0] or gone[1]:
            source, target = trees()
    sent = source.snapshot(s.src_ds, name)
    if sent is None:
        return Settled((), tuple(gone[0]), tuple(gone[1]))
    top_tgt = target.snaps.get(s.tgt_ds, []) if target is not None else []
    points = listing(source.snaps.get(s.src_ds, []), top_tgt, target_tag, sent, sent_bytes,
                     any_tag=request.direction == "reverse")
    whole = whole_on_target(source, target, s.tgt_ds)
    points = tuple(replace(p, on_target=p.on_target and whole.get(p.snapshot_name, True)) for p in points)
    return Settled(points, tuple(gone[0]), tuple(gone[1]))


def _protected(source: Tree, target: Tree, pairs: list[tuple[str, str]],
               name: str) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Per dataset, the GUIDs never pruned: the group snapshot just sent and the newest common one.

    On the source too where a bookmark cursor would let a single dataset's source prune the newest
    common snapshot (bookmarks.py): a tree keeps it, so every child keeps a snapshot as its base."""
    keep_src: dict[str, set[int]] = {}
    keep_tgt: dict[str, set[int]] = {}
    for src, tgt in pairs:
        sent = source.snapshot(src, name)
        keep_src[src] = {sent.guid} if sent else set()
        keep_tgt[tgt] = {sent.guid} if sent else set()
        common = newest_common(source.snaps.get(src, []), target.snaps.get(tgt, []))
        if common is not None:
            keep_src[src].add(common[0].guid)
            keep_tgt[tgt].add(common[1].guid)
    return keep_src, keep_tgt


def _prune(s: Sides, runner: Runner, tree: Tree, keep: dict[str, set[int]], policy: Policy,
           tag: str | None, creation: Creation) -> list[str]:
    """Destroy on one side the group snapshots the policy lets go on every dataset having them."""
    allowed: dict[str, set[str]] = {}
    for dataset, protect in keep.items():
        chosen = choose(tree.snaps.get(dataset, []), policy, protect, tag, creation)
        cloned = snapshots_with_clones(runner, dataset) if chosen else set()
        if cloned is None:
            s.note(f"retention skipped on {runner.label}: could not tell which snapshots of {dataset} have clones")
            return []
        allowed[dataset] = {x.name for x in chosen} - cloned
    destroyed: set[str] = set()
    for dataset, snaps in whole_groups(tree, list(keep), allowed).items():
        for old in snaps:
            result = ops.destroy_snapshot(runner, dataset, old.name)
            if result.ok:
                destroyed.add(old.name)
            else:
                s.note(f"retention could not destroy {dataset}@{old.name} on {runner.label}: {result.err.strip()}")
    return sorted(destroyed)
