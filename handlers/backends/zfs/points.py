"""After a replication: retention on both sides, then the replica's recovery points.

Both sides are listed once (one round trip each, at once); retention (retention.py) prunes from
those listings, and what it destroyed is taken out of them. The recovery points are our
snapshots of this replica, matched by GUID across the two sides: every one of ours on the target
(``on_target``), and every one of ours the source made for this replica (``on_source``), so a
snapshot destroyed by hand on the target shows as ``on_target = false`` while the source still
has it. ``zerfaux.complete_replication_run`` upserts them; a point listed on neither side any
more is marked removed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import cast

from handlers.backends.zfs import ops
from handlers.backends.zfs.grid import parse
from handlers.backends.zfs.plan import OURS, Snap
from handlers.backends.zfs.retention import Creation, Policy, retain, zfs_creation
from handlers.backends.zfs.sides import Sides
from handlers.replication import RecoveryPoint, ReplicationRequest


@dataclass(frozen=True)
class Settled:
    points: tuple[RecoveryPoint, ...]
    pruned_source: tuple[str, ...]
    pruned_target: tuple[str, ...]


def settle(sides: Sides, request: ReplicationRequest, sent: Snap, target_tag: str, sent_bytes: int | None,
           creation: Creation = zfs_creation, cursor: bool = False) -> Settled:
    """Prune by the group's policies, then list what is left as recovery points."""
    s = sides
    found = ops.parallel(s.source_snapshots, partial(ops.snapshots, s.tgt, s.tgt_ds, s.tcaps))
    src_snaps, tgt_snaps = cast("list[Snap]", found[0]), found[1] or []
    source = Policy(request.retention_snapshots, parse(request.source_retention_grid))
    target = Policy(request.retention_snapshots, parse(request.retention_grid))
    gone_src, gone_tgt = retain(s, source, target, sent, target_tag, src_snaps, tgt_snaps, creation, cursor)
    src_left = [x for x in src_snaps if x.name not in set(gone_src)]
    tgt_left = [x for x in tgt_snaps if x.name not in set(gone_tgt)]
    points = listing(src_left, tgt_left, target_tag, sent, sent_bytes, any_tag=request.direction == "reverse")
    return Settled(points, tuple(gone_src), tuple(gone_tgt))


def listing(source: list[Snap], target: list[Snap], target_tag: str, sent: Snap,
            sent_bytes: int | None, any_tag: bool = False) -> tuple[RecoveryPoint, ...]:
    """Our snapshots of the replica on either side, by GUID, oldest first (no I/O).

    ``any_tag`` (a reverse replication, whose source is the DR replica): every snapshot of ours on
    the source counts, since the ones it received from the primary carry no ``zerfaux:target``."""
    on_source = {s.guid: s for s in source}
    ours_target = {t.guid: t for t in target if OURS.fullmatch(t.name)}
    ours_source = {s.guid: s for s in source if OURS.fullmatch(s.name) and (any_tag or s.target == target_tag)}
    points = []
    for guid in set(ours_target) | set(ours_source):
        snap = on_source.get(guid) or ours_target[guid]
        points.append((snap.creation, snap.name, RecoveryPoint(
            snapshot_name=snap.name,
            guid=str(guid),
            created_at=datetime.fromtimestamp(snap.creation, timezone.utc).isoformat(),
            bytes=sent_bytes if guid == sent.guid else None,
            on_source=guid in on_source,
            on_target=guid in ours_target,
        )))
    return tuple(point for _, _, point in sorted(points, key=lambda p: (p[0], p[1])))
