"""``Attempt``: one attempt of one replication job, step by step (docs/replication.md, *One attempt*).

The steps live in their own modules: holds.py (attempt-scoped holds), stream.py (the transport),
resume.py (a partial receive), points.py (retention, then the recovery points). Here: the order,
the plan, the checks between steps, and what a stop, a cancel or a failure leaves behind.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import cast

from handlers.backends.zfs import bookmarks, flags, ops, wire
from handlers.backends.zfs.bookmarks import is_bookmark, ref
from handlers.backends.zfs.holds import Holds
from handlers.backends.zfs.plan import Snap, find_job_snapshot, job_prefix, plan
from handlers.backends.zfs.resume import NOTHING, clean_partial, resume_partial
from handlers.backends.zfs.points import settle
from handlers.backends.zfs.retention import Creation, zfs_creation
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.stopping import interrupted, stopping
from handlers.backends.zfs.stream import Transfer
from handlers.errors import OperationCancelled, OperationStopped, PermanentError, TransientError
from handlers.replication import ProgressSink, ReplicationOutcome, ReplicationProgress, ReplicationRequest, snapshot_name

log = logging.getLogger(__name__)

_PENDING_GUID = 0  # no real snapshot has GUID 0: stands for "this job's snapshot, not made yet"


class Attempt:
    def __init__(self, request: ReplicationRequest, sides: Sides, transfer: Transfer,
                 progress: ProgressSink, cancel: threading.Event, creation: Creation = zfs_creation,
                 may_snapshot: bool = True) -> None:
        self.req, self.sides, self.transfer = request, sides, transfer
        self.creation = creation  # what retention grids read as a snapshot's creation (retention.py)
        self.may_snapshot = may_snapshot  # False: one child of a tree, whose snapshot zfs/tree.py made
        self.progress, self.cancel = progress, cancel
        self.holds = Holds(request.job_id, request.attempt, sides.note)
        self.streaming = False  # a stream was under way when the attempt failed: partial state may be left
        self.target_tag = ops.target_tag(request.target.host, request.target.port, request.target_dataset)

    def execute(self) -> ReplicationOutcome:
        s = self.sides
        if not s.resumable:
            side = s.tgt.label if not s.tcaps.resume else s.src.label
            s.note(f"resume not supported by this ZFS ({side}): an interrupted transfer restarts from the last common snapshot")
        try:
            return self._execute()
        except Exception as exc:
            if stopping(self.cancel):
                # The engine stopped us (shutdown, lease lost): no -A, no release, no retention. The
                # next attempt, here or on another listener, resumes and releases these holds.
                self.holds.keep()
                if isinstance(exc, OperationStopped):
                    raise
                raise interrupted(self.cancel, f"({exc})") from exc
            if isinstance(exc, OperationCancelled):
                clean_partial(s, self.req.job_id)
            elif s.resumable and self.streaming:
                # The partial receive resumes from its base: keep the holds for the retry of this
                # job, which releases them (as after a SIGKILL, where nothing could release them).
                self.holds.keep()
            raise
        finally:
            self.holds.release()

    def _checkpoint(self, before: str) -> None:
        """Start nothing new once told to stop."""
        if self.cancel.is_set():
            raise interrupted(self.cancel, f"before {before}")

    def _execute(self) -> ReplicationOutcome:
        s, req = self.sides, self.req
        # One look at the target (one round trip): a receive still running there (an earlier
        # attempt's may be exiting: its listing is not to be trusted until it has), its snapshots,
        # its parent, `written`, a resume token. The source's list is read meanwhile.
        # Also: the source's encryption, the chain's recorded flags, the source's cursors (flags.py, bookmarks.py).
        state, src_snaps, crypt, record, marks = ops.parallel(
            partial(ops.settled_target_state, s.tgt, s.tgt_ds, s.tcaps), s.source_snapshots,
            partial(flags.read_source, s.src, s.src_ds, s.scaps), partial(flags.read_target, s.tgt, s.tgt_ds, s.tcaps),
            partial(bookmarks.cursors, s.src, s.src_ds, s.scaps))
        target = cast("ops.TargetState", state)
        source_snaps = cast("list[Snap]", src_snaps)
        chain, cursors = cast("flags.ChainRecord", record), cast("list[Snap]", marks)
        prefix = job_prefix(snapshot_name(req.job_id))
        mine = find_job_snapshot(source_snaps, prefix)
        self._checkpoint("resuming")
        self.streaming = True
        resumed = resume_partial(s, self.transfer, req.job_id, mine.name if mine else "", target.token,
                                 source_snaps, self.progress)
        self.streaming = False
        transferred, estimated = resumed.moved, resumed.estimated
        if transferred:
            source_snaps = s.source_snapshots()
            target = ops.target_state(s.tgt, s.tgt_ds, s.tcaps)
            chain = flags.read_target(s.tgt, s.tgt_ds, s.tcaps)
        name = mine.name if mine else snapshot_name(req.job_id)
        # Newer than any cursor too: a source pruned of every snapshot still has its bookmarks.
        snap = mine or Snap(name, _PENDING_GUID, max((x.txg for x in [*source_snaps, *cursors]), default=0) + 1)
        tgt_snaps, written = target.snaps, target.written
        self.transfer.target_exists = tgt_snaps is not None
        if mine is not None:
            self.holds.adopt(s.src, s.src_ds, source_snaps)
            self.holds.adopt(s.tgt, s.tgt_ds, tgt_snaps or [])
        if tgt_snaps is None and not target.parent_ok:
            parent = s.tgt_ds.rsplit("/", 1)[0]
            raise PermanentError(
                f"{parent} (replication_targets.target_root) does not exist on {s.tgt.label}: "
                f"create it there (zfs create -p {parent}) and run the job again"
            )
        # Decide before making the snapshot: a refused target leaves the source untouched.
        stream = flags.choose(s, cast("flags.SourceCrypt", crypt), chain, tgt_snaps is not None)
        try:
            decided = plan(bookmarks.with_cursors(source_snaps, cursors), tgt_snaps, snap, s.tgt_ds, written)
        except PermanentError:
            tgt_snaps, written = self._settled_target(tgt_snaps, written)
            decided = plan(bookmarks.with_cursors(source_snaps, cursors), tgt_snaps, snap, s.tgt_ds, written)
        base = decided.base_name
        holds = [(s.src, s.src_ds, name)]
        if base and decided.base:
            # A cursor (bookmark) cannot be held: its snapshot's replica on the target is.
            on_target = next((t.name for t in tgt_snaps or [] if t.guid == decided.base.guid), base)
            holds += ([] if is_bookmark(base) else [(s.src, s.src_ds, base)]) + [(s.tgt, s.tgt_ds, on_target)]
        if mine is None and not self.may_snapshot:
            raise TransientError(f"{s.src_ds} has no snapshot of this job (its tree's snapshot is gone or the "
                                 "dataset was re-created): the next attempt plans the tree again")
        if mine is None:
            self._checkpoint("making the snapshot")
            ops.create_snapshot(s.src, s.src_ds, name, req.job_id, self.target_tag)
            log.info("job %s: snapshot %s@%s made on %s", req.job_id, s.src_ds, name, s.src.label)
        if decided.action != "uptodate":
            # Our snapshot exists now, so the base stays the newest common snapshot: hold it on both
            # sides (and our snapshot) while the stream flows, estimate, and read our GUID, all at once.
            found = ops.parallel(s.source_snapshots, partial(self._estimate, name, base, stream),
                                 *(partial(self.holds.hold, *h) for h in holds))
            source_snaps, estimated = cast("list[Snap]", found[0]), cast("int | None", found[1])
            made = find_job_snapshot(source_snaps, prefix)
            if made is None:
                raise TransientError(f"snapshot {s.src_ds}@{name} vanished right after it was made")
            snap = made
            decided = plan(bookmarks.with_cursors(source_snaps, cursors), tgt_snaps, snap, s.tgt_ds, written)
            if decided.base_name != base:
                raise TransientError(f"the snapshots of {s.src_ds} changed while the replication was planned "
                                     "(someone else made or destroyed one): the next attempt plans again")
            self.progress(ReplicationProgress(name, base, transferred, estimated))
            self._checkpoint("sending")
            self._prepare(stream, decided.action, base)
            transferred += self._send(snap, base, estimated)
        received, _ = ops.parallel(partial(self._verify, snap), self.holds.release)
        if chain.recorded != stream.record() and not self.transfer.recv_options:
            ops.check(s.tgt.run(flags.record_argv(s.tgt_ds, stream)), s.tgt.label, f"recording the chain's flags on {s.tgt_ds}")
        self._checkpoint("retention")
        cursor = bookmarks.advance(s, snap, self.target_tag, cast("list[Snap]", received))
        sent_bytes = transferred if decided.action != "uptodate" or transferred else None
        settled = settle(s, req, snap, self.target_tag, sent_bytes, self.creation, cursor)
        log.info("job %s: %s@%s is on %s (%s, %d bytes)", req.job_id, s.tgt_ds, name, s.tgt.label,
                 decided.action, transferred)
        if decided.action == "uptodate" and transferred:
            base = resumed.base  # the resume was the whole transfer: its base is the job's base
        return ReplicationOutcome(name, base, transferred, estimated, tuple(s.notes), settled.points,
                                  settled.pruned_source, settled.pruned_target)

    def _prepare(self, stream: flags.StreamFlags, action: str, base: str | None) -> None:
        """The stream's flags, the seed's record of them, the wire compression, a bookmark base."""
        s, t = self.sides, self.transfer
        t.flags = stream
        # zfs receive -o (OpenZFS 0.7, like -s): the seed carries its record; elsewhere it is set after.
        t.recv_options = flags.receive_options(stream) if action == "full" and s.tcaps.resume else []
        t.wire = wire.choose(s, self.req.wire_compression, stream, self.req.transport)
        t.from_bookmark = bool(base and is_bookmark(base))
        if base and t.from_bookmark:
            s.note(f"sent incrementally from the bookmark {ref(s.src_ds, base)}: its snapshot is gone on the source")

    def _send(self, snap: Snap, base: str | None, estimated: int | None) -> int:
        self.streaming = True
        s = self.sides
        send = ["zfs", "send", *self.transfer.flags.send_args()] + (["-i", ref(s.src_ds, base)] if base else []) + \
            [f"{s.src_ds}@{snap.name}"]
        moved = self.transfer.run(send, lambda n: self.progress(ReplicationProgress(snap.name, base, n, estimated)),
                                  sending=snap)
        self.streaming = False
        return moved

    def _settled_target(self, seen: list[Snap] | None, written: int | None,
                        reads: int = 5) -> tuple[list[Snap] | None, int | None]:
        """Read the target again before refusing it: only a listing that holds still is trusted.

        A receive aborted a moment ago (a cancel, a killed sender) can still be rolling back in
        the ZFS daemon after its client exited; zfs-fuse was seen listing no snapshots at all
        then. A refusal is permanent, so it must rest on two equal reads a second apart.
        """
        s = self.sides
        for _ in range(reads):
            if self.cancel.wait(1.0):
                raise interrupted(self.cancel, "while the target was read again")
            again = ops.target_state(s.tgt, s.tgt_ds, s.tcaps)
            if again.snaps == seen and again.written == written:
                return again.snaps, again.written
            seen, written = again.snaps, again.written
        raise TransientError(
            f"{s.tgt_ds} on {s.tgt.label} kept changing while it was read (a receive may still be "
            "ending): the next attempt will look again"
        )

    def _estimate(self, name: str, base: str | None, stream: flags.StreamFlags) -> int | None:
        s = self.sides
        if not s.scaps.estimate:
            s.note(f"size estimate not supported by this ZFS ({s.src.label}): bytes_estimated left empty")
            return None
        if base and is_bookmark(base):
            s.note("no size estimate from a bookmark base (zfs send -nP needs a snapshot): bytes_estimated left empty")
            return None
        return ops.estimate(s.src, s.src_ds, name, base, None, stream.send_args())

    def _verify(self, snap: Snap) -> list[Snap]:
        s = self.sides
        tgt = ops.snapshots(s.tgt, s.tgt_ds, s.tcaps) or []
        if not any(t.guid == snap.guid for t in tgt):
            raise TransientError(
                f"the transfer ended but {s.tgt_ds} on {s.tgt.label} has no snapshot with GUID {snap.guid} "
                f"({snap.name}); the next attempt will try again"
            )
        return tgt
