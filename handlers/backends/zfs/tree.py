"""``TreeAttempt``: one attempt of a recursive group's job (docs/replication.md, *Dataset trees*).

The group's dataset and every child are snapshotted at once (``zfs snapshot -r``: one recovery
point, consistent across children), then each dataset is replicated as its own stream, parent
before child, by the same ``Attempt`` a single dataset gets (GUID matching, holds, resume, never
``-F``). Here: the listing of both trees, the checks before the snapshot, the order, the summed
progress, the notes about children that appeared or went, and retention for the whole tree.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from handlers.backends.zfs import ops
from handlers.backends.zfs.attempt import Attempt
from handlers.backends.zfs.plan import Snap, find_job_snapshot, job_prefix, newest_common, plan
from handlers.backends.zfs.retention import Creation, zfs_creation
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.stopping import interrupted
from handlers.backends.zfs.stream import Transfer
from handlers.backends.zfs.treepoints import settle_tree
from handlers.backends.zfs.treeplan import (
    Tree,
    check_children,
    gone_from_source,
    in_point,
    kinds_differ,
    parse_tree,
    target_name,
    tree_argv,
)
from handlers.errors import PermanentError, TransientError
from handlers.replication import ProgressSink, ReplicationOutcome, ReplicationProgress, ReplicationRequest, snapshot_name

log = logging.getLogger(__name__)

_PENDING = 0  # the GUID of "this job's snapshot, not made yet" (as in attempt.py)


class TreeAttempt:
    def __init__(self, request: ReplicationRequest, sides: Sides, transfer: Callable[[Sides], Transfer],
                 progress: ProgressSink, cancel: threading.Event, creation: Creation = zfs_creation) -> None:
        self.req, self.top, self.transfer = request, sides, transfer
        self.creation = creation  # what retention grids read as a snapshot's creation (retention.py)
        self.progress, self.cancel = progress, cancel
        self.target_tag = ops.target_tag(request.target.host, request.target.port, request.target_dataset)

    def _trees(self) -> tuple[Tree, Tree | None]:
        s = self.top
        src, tgt = ops.parallel(partial(s.src.run, tree_argv(s.src_ds, s.scaps.userrefs)),
                                partial(s.tgt.run, tree_argv(s.tgt_ds, s.tcaps.userrefs, s.tcaps.written,
                                                             s.tcaps.resume)))
        source = parse_tree(src, s.src.label, s.src_ds)
        if source is None:
            raise PermanentError(f"protection_groups.source_dataset {s.src_ds} does not exist on {s.src.label}")
        return source, parse_tree(tgt, s.tgt.label, s.tgt_ds)

    def execute(self) -> ReplicationOutcome:
        s, req = self.top, self.req
        source, target = self._trees()
        check_children(source, s.tgt_ds)
        wrong = kinds_differ(source, target, s.tgt_ds, source.datasets)
        if wrong:
            raise PermanentError("; ".join(wrong) + ": a replica keeps its source's type. Rename or destroy "
                                 "the replica yourself, then run the job again")
        mine = find_job_snapshot(source.snaps[s.src_ds], job_prefix(snapshot_name(req.job_id)))
        if mine is None:
            source, target = self._refuse_early(source, target)
            name = snapshot_name(req.job_id)
            if self.cancel.is_set():
                raise interrupted(self.cancel, "before making the snapshot")
            ops.create_snapshot(s.src, s.src_ds, name, req.job_id, self.target_tag, recursive=True)
            log.info("job %s: snapshot -r %s@%s made on %s", req.job_id, s.src_ds, name, s.src.label)
            source, target = self._trees()
        else:
            name = mine.name
        members, later = in_point(source, name)
        if later:
            s.note(f"{', '.join(later)} appeared after the group snapshot {name} was made: "
                   "not in this recovery point, seeded (full send) by the next job")
        gone = gone_from_source(source, target, s.tgt_ds)
        if gone:
            one = len(gone) == 1
            s.note(f"{', '.join(gone)} {'has' if one else 'have'} no source dataset any more (removed or renamed "
                   f"on the source); Zerfaux never destroys a replica, so {'it stays' if one else 'they stay'} on "
                   "the target as is (destroy it there yourself if unwanted)")
        sent = {d: snap.guid for d in members if (snap := source.snapshot(d, name)) is not None}
        todo = [d for d in members if target is None or not target.has_guid(target_name(s.src_ds, s.tgt_ds, d), sent[d])]
        bases = {d: self._base(source, target, d) for d in members}
        estimates = self._estimates(todo, name, bases)
        total = None if any(e is None for e in estimates.values()) else sum(e or 0 for e in estimates.values())
        done = 0
        for dataset in todo:
            done += self._child(dataset, name, bases.get(s.src_ds), done, total)
        if len(todo) < len(members):
            log.info("job %s: %d of %d datasets already had %s", req.job_id, len(members) - len(todo), len(members), name)
        if self.cancel.is_set():
            raise interrupted(self.cancel, "before retention")
        settled = settle_tree(s, req, members, name, self.target_tag, done if todo else None, self.creation,
                              self._trees)
        children = tuple(d[len(s.src_ds) + 1:] for d in members if d != s.src_ds)
        return ReplicationOutcome(name, bases.get(s.src_ds), done, total, tuple(s.notes), settled.points,
                                  settled.pruned_source, settled.pruned_target, children=children)

    def _refuse_early(self, source: Tree, target: Tree | None, reads: int = 5) -> tuple[Tree, Tree | None]:
        """What Attempt decides before its snapshot, for every dataset: a refused tree stays untouched.

        As in Attempt, a refusal rests on two equal reads of the target a second apart (a receive
        aborted a moment ago may still be rolling back); the trees it decided on are returned.
        """
        s = self.top
        if target is None and "/" in s.tgt_ds:
            parent = s.tgt_ds.rsplit("/", 1)[0]
            if not ops.parse_exists(s.tgt.run(ops.exists_argv(parent)), s.tgt.label, parent):
                raise PermanentError(
                    f"{parent} (replication_targets.target_root) does not exist on {s.tgt.label}: "
                    f"create it there (zfs create -p {parent}) and run the job again")
        for _ in range(reads):
            try:
                self._plan_all(source, target)
                return source, target
            except PermanentError:
                if self.cancel.wait(1.0):
                    raise interrupted(self.cancel, "while the target was read again") from None
                seen = target
                source, target = self._trees()
                if target == seen:
                    raise
        raise TransientError(f"{s.tgt_ds} on {s.tgt.label} kept changing while it was read (a receive may "
                             "still be ending): the next attempt will look again")

    def _plan_all(self, source: Tree, target: Tree | None) -> None:
        s = self.top
        if target is None:
            return
        for dataset in source.datasets:
            replica = target_name(s.src_ds, s.tgt_ds, dataset)
            if replica not in target.kinds or replica in target.tokens:
                continue  # seeded by this job, or a partial receive that its Attempt finishes first
            snaps = source.snaps[dataset]
            pending = Snap("(this job)", _PENDING, max((x.txg for x in snaps), default=0) + 1)
            plan(snaps, target.snaps[replica], pending, replica, target.written.get(replica))

    @staticmethod
    def _base(source: Tree, target: Tree | None, dataset: str) -> str | None:
        if target is None:
            return None
        replica = target_name(source.top, target.top, dataset)
        common = newest_common(source.snaps[dataset], target.snaps.get(replica, []))
        return common[0].name if common and replica in target.kinds else None

    def _estimates(self, todo: list[str], name: str, bases: dict[str, str | None]) -> dict[str, int | None]:
        s = self.top
        if not todo:
            return {}
        if not s.scaps.estimate:
            s.note(f"size estimate not supported by this ZFS ({s.src.label}): bytes_estimated left empty")
            return {d: None for d in todo}
        found = ops.parallel(*(partial(ops.estimate, s.src, d, name, bases[d], None) for d in todo))
        return dict(zip(todo, found))

    def _child(self, dataset: str, name: str, top_base: str | None, before: int, total: int | None) -> int:
        """Replicate one dataset of the tree to the job's snapshot; the bytes it moved."""
        s = self.top
        replica = target_name(s.src_ds, s.tgt_ds, dataset)
        sides = Sides(s.src, s.tgt, dataset, replica, s.scaps, s.tcaps, notes=s.notes)
        # Retention and the points are the tree's (treepoints.py): none per dataset.
        request = replace(self.req, source_dataset=dataset, target_dataset=replica, retention_snapshots=None,
                          retention_grid=None, source_retention_grid=None)

        def sink(p: ReplicationProgress) -> None:
            self.progress(ReplicationProgress(name, top_base, before + p.bytes_transferred, total))

        outcome = Attempt(request, sides, self.transfer(sides), sink, self.cancel, self.creation,
                          may_snapshot=False).execute()
        log.info("job %s: %s@%s is on %s (%d bytes)", self.req.job_id, replica, name, s.tgt.label,
                 outcome.bytes_transferred)
        return outcome.bytes_transferred
