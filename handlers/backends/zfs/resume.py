"""A partial receive: finished from its token on a retry, dropped only after a person's cancel.

``zfs receive -A`` throws a resumable receive away (a multi-hour seed starts again from zero), so
it runs in exactly two cases: the token's snapshot no longer exists on the source (nothing could
ever finish it), or a person cancelled the job. An attempt the engine stopped never runs it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from handlers.backends.zfs import ops
from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.stream import Transfer
from handlers.errors import PermanentError, TransientError
from handlers.replication import ProgressSink, ReplicationProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    moved: int  # bytes the resume sent (0: nothing to resume)
    estimated: int | None  # the resume stream's size (the job's estimate when it was all that was left)
    base: str | None  # the stream's base on the source, None for a full stream


NOTHING = Resumed(0, None, None)


def resume_partial(sides: Sides, transfer: Transfer, job_id: str, name: str, token: str | None,
                   source_snaps: list[Snap], progress: ProgressSink) -> Resumed:
    """Finish an interrupted receive from its token; abandon it only if its snapshot is gone.

    The token names its base by GUID only; ``zfs send -nv -t`` prints the token's contents, and
    the source's listing turns the GUID into a name."""
    s = sides
    if not s.resumable or not token:
        return NOTHING
    # A dry run tells whether the token's snapshot still exists on the source (FACTS: -A only then).
    check = s.src.run(["zfs", "send", "-nvP", "-t", token])
    if not check.ok:
        if "no longer exists" in check.err or "does not exist" in check.err:
            ops.abort_partial(s.tgt, s.tgt_ds)
            s.note("a partial receive was abandoned (zfs receive -A): its snapshot no longer exists on the source")
            return NOTHING
        raise TransientError(f"cannot resume into {s.tgt_ds}: zfs send -t failed on {s.src.label}: {check.err.strip()}")
    estimated = ops.parse_size(check.out + check.err)
    from_guid = ops.parse_token_from_guid(check.out + check.err)
    base = next((snap.name for snap in source_snaps if snap.guid == from_guid), None) if from_guid else None
    log.info("job %s: resuming the partial receive into %s", job_id, s.tgt_ds)
    s.note("resumed an interrupted transfer from the target's receive_resume_token")
    moved = transfer.run(["zfs", "send", "-t", token],
                         lambda n: progress(ReplicationProgress(name, base, n, estimated)))
    return Resumed(moved, estimated, base)


def clean_partial(sides: Sides, job_id: str) -> None:
    """After a person's cancel: let the killed receive exit, then drop its partial receive state.

    Once no receive into the dataset runs, its token is what it will stay: none (the stream was cut
    before ZFS kept anything) means nothing to drop. ``-A`` is retried a few times: the dataset can
    be busy for a moment after its receive exited."""
    s = sides
    try:
        ops.settled_target_state(s.tgt, s.tgt_ds, s.tcaps)
    except (TransientError, PermanentError) as exc:
        log.warning("job %s: after cancel: %s", job_id, exc)
    if not s.resumable:
        return
    for _ in range(20):
        if ops.resume_token(s.tgt, s.tgt_ds, s.tcaps) is None or ops.abort_partial(s.tgt, s.tgt_ds).ok:
            return
        time.sleep(0.25)
