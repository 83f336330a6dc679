"""Pure decisions of a replication: what to send, what is refused, what retention may prune.

No I/O here, so every rule is unit-tested. The rules (see docs/replication.md):

* Snapshots are matched by GUID, never by name: a snapshot renamed or re-created under the
  same name on either side is a different snapshot.
* Initial replication only into a dataset that does not exist yet.
* An existing target must have a snapshot in common with the source, and nothing newer than the
  newest common one; otherwise it has diverged and we refuse. We never roll back or destroy.
* Retention prunes only snapshots named like ours (on the source: made for the same target),
  never a held one, never the newest common.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from handlers.errors import PermanentError
from handlers.replication import SNAPSHOT_PREFIX

# Exactly what handlers.replication.snapshot_name makes: other zerfaux_* names are not ours.
OURS = re.compile(rf"^{SNAPSHOT_PREFIX}[0-9A-Za-z]{{1,12}}_\d{{8}}T\d{{6}}Z$")


@dataclass(frozen=True)
class Snap:
    name: str  # the part after '@'
    guid: int
    txg: int  # createtxg: creation order on its own pool
    userrefs: int = 0  # holds; -1 when the ZFS cannot say
    target: str = ""  # the zerfaux:target property: which replica a source snapshot was made for
    creation: int = 0  # the creation property, seconds since the epoch (received snapshots keep the sender's)


@dataclass(frozen=True)
class Plan:
    action: str  # "full" | "incremental" | "uptodate"
    base: Snap | None  # the newest common snapshot (source side), None for a full send

    @property
    def base_name(self) -> str | None:
        """The incremental stream's base; None when nothing is sent from one."""
        return self.base.name if self.action == "incremental" and self.base else None


def job_prefix(snapshot: str) -> str:
    """``zerfaux_<job>_``: what a retry looks for to reuse this job's snapshot."""
    return snapshot.rsplit("_", 1)[0] + "_"


def find_job_snapshot(source: Sequence[Snap], prefix: str) -> Snap | None:
    mine = [s for s in source if s.name.startswith(prefix) and OURS.fullmatch(s.name)]
    return max(mine, key=lambda s: s.txg) if mine else None


def newest_common(source: Sequence[Snap], target: Sequence[Snap]) -> tuple[Snap, Snap] | None:
    """The newest target snapshot whose GUID the source also has: (source side, target side)."""
    by_guid = {s.guid: s for s in source}
    for snap in sorted(target, key=lambda s: s.txg, reverse=True):
        if snap.guid in by_guid:
            return by_guid[snap.guid], snap
    return None


# A clone of a snapshot, or a dataset rolled back to one, whose snapshot was taken with intent-log
# blocks in it has its ZIL header zeroed at creation: OpenZFS rewrites the objset block, and the
# dataset shows ``written`` of that one block (1 KiB on the OpenZFS guest, a 4 KiB sector at most)
# with no file changed. ZFS itself does not count a ZIL-only difference as a modification
# (``dsl_dataset_modified_since_snap`` compares the meta-dnode), so a change this small is left to
# ZFS's own check: the receive (never -F) refuses a dataset really "modified since most recent
# snapshot". A reprotect's kept-changes clone and its discard rollback hit this (docs/recovery.md).
ZIL_RESET_BYTES = 4096


def plan(
    source: Sequence[Snap],
    target: Sequence[Snap] | None,
    snapshot: Snap,
    target_dataset: str,
    target_written: int | None = None,
) -> Plan:
    """What to send to bring ``target_dataset`` up to ``snapshot``.

    ``target`` is None when the target dataset does not exist. ``target_written`` is the
    target's ``written`` property (bytes changed since its newest snapshot) where the ZFS has it.
    Raises ``PermanentError`` for a target that must not be touched.
    """
    if target is None:
        return Plan("full", None)
    if any(t.guid == snapshot.guid for t in target):
        newest = max(target, key=lambda s: s.txg)
        if newest.guid == snapshot.guid:
            return Plan("uptodate", snapshot)
    common = newest_common(source, target)
    if common is None:
        what = "has no snapshots" if not target else "shares no snapshot (by GUID) with the source"
        raise PermanentError(
            f"target {target_dataset} already exists and {what}, so it cannot be brought up to date "
            "without destroying it; Zerfaux never does that. Check what it holds; if it may be "
            f"discarded, destroy or rename it yourself (zfs rename {target_dataset} ...) and run the job again "
            "for a full replication, or point replication_jobs.target_dataset at a new name"
        )
    base, on_target = common
    newer = [t.name for t in sorted(target, key=lambda s: s.txg) if t.txg > on_target.txg]
    if newer:
        raise PermanentError(
            f"target {target_dataset} has diverged: it has snapshots newer than the newest common snapshot "
            f"{base.name}: {', '.join(newer)}. Zerfaux never rolls back or destroys a replica. Inspect them; "
            f"if they may be discarded run zfs rollback -r {target_dataset}@{on_target.name} on the target "
            "yourself, then run the job again"
        )
    if target_written and target_written > ZIL_RESET_BYTES:
        raise PermanentError(
            f"target {target_dataset} was changed since its newest snapshot {on_target.name} "
            f"({target_written} bytes written). Zerfaux never rolls back a replica. Inspect it; if the change "
            f"may be discarded run zfs rollback {target_dataset}@{on_target.name} yourself, then run the job again"
        )
    if base.guid == snapshot.guid:
        return Plan("uptodate", snapshot)
    if base.txg > snapshot.txg:
        raise PermanentError(
            f"the newest common snapshot {base.name} is newer than this job's snapshot {snapshot.name}: "
            "a later job has already replicated past it; nothing to do for this one"
        )
    return Plan("incremental", base)


def prunable(snaps: Iterable[Snap], keep: int, protect: Iterable[int] = (), target: str | None = None) -> list[Snap]:
    """Snapshots retention may destroy: ours, beyond the newest ``keep`` of ours, not held, not protected.

    ``protect`` holds GUIDs never to prune (the newest common snapshot, the one just sent).
    ``target`` (on the source) counts only snapshots made for that replica: a dataset replicated
    to two targets keeps each one's base, whatever the other's retention does. Oldest first.
    """
    protected = set(protect)
    ours = sorted((s for s in snaps if OURS.fullmatch(s.name) and (target is None or s.target == target)),
                  key=lambda s: s.txg)
    excess = ours[: max(0, len(ours) - keep)]
    return [s for s in excess if s.guid not in protected and s.userrefs == 0]
