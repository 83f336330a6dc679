"""The replication cursor (a bookmark on the source) and the last-received hold (on the target).

After each successful replication the sent snapshot is bookmarked on the source as
``<dataset>#zerfaux_<target hash>_<snapshot>``, one cursor per target (like zrepl's replication
cursor), and the target's newest received snapshot is held with ``zerfaux_last_received``. A
bookmark keeps the snapshot's GUID and creation txg but no data, and can be the base of an
incremental send (``zfs send -i pool/ds#bm pool/ds@new``): source retention (or an outside
pruner, sanoid issue 525) may then destroy every snapshot but the newest and the next job still
sends incrementally. The hold keeps the other end of that cursor on the target.

Where ZFS has no bookmarks (zfs-fuse) nothing here runs, and retention keeps today's rule: never
the newest common snapshot. A bookmark cannot be held, cannot be a receive target, and a size
estimate from one is not offered (FACTS): the plan treats cursors as bases only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner
from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.sides import Sides

log = logging.getLogger(__name__)

LAST_RECEIVED = "zerfaux_last_received"
CURSOR_PREFIX = "zerfaux_"


def cursor_prefix(target_tag: str) -> str:
    """``zerfaux_<10 hex>_``: the cursors made for one replica (the ``zerfaux:target`` value hashed)."""
    return f"{CURSOR_PREFIX}{hashlib.sha256(target_tag.encode()).hexdigest()[:10]}_"


def is_bookmark(name: str) -> bool:
    return name.startswith("#")


def ref(dataset: str, name: str) -> str:
    """``pool/ds@snap`` or ``pool/ds#bookmark`` (a plan's base may be either)."""
    return f"{dataset}{name}" if is_bookmark(name) else f"{dataset}@{name}"


def cursors(runner: Runner, dataset: str, caps: ops.Caps) -> list[Snap]:
    """Our bookmarks of ``dataset`` as Snaps named ``#<bookmark>``, oldest first ([] without bookmarks)."""
    if not caps.bookmarks:
        return []
    result = runner.run(["zfs", "list", "-H", "-p", "-t", "bookmark", "-d", "1", "-o", "name,guid,createtxg", dataset])
    if not result.ok:
        return []  # the dataset does not exist (yet), or no bookmarks: the plan uses snapshots only
    found = []
    for line in result.out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and "#" in parts[0] and parts[1].isdigit() and parts[2].isdigit():
            name = parts[0].split("#", 1)[1]
            if name.startswith(CURSOR_PREFIX):
                found.append(Snap("#" + name, int(parts[1]), int(parts[2])))
    return sorted(found, key=lambda s: s.txg)


def with_cursors(snaps: Sequence[Snap], marks: Sequence[Snap]) -> list[Snap]:
    """Snapshots plus the cursors whose snapshot is gone: what the plan may send from."""
    have = {s.guid for s in snaps}
    return sorted([*snaps, *(m for m in marks if m.guid not in have)], key=lambda s: s.txg)


def advance(sides: Sides, sent: Snap, target_tag: str, target_snaps: Sequence[Snap]) -> bool:
    """Move this target's cursor to ``sent`` and the last-received hold to its replica.

    Returns whether the cursor now stands on ``sent`` (retention may then prune the snapshot).
    Failures are notes, not errors: the replication itself succeeded.
    """
    s = sides
    if not s.scaps.bookmarks:
        return False
    prefix = cursor_prefix(target_tag)
    name = prefix + sent.name
    made = s.src.run(["zfs", "bookmark", f"{s.src_ds}@{sent.name}", f"{s.src_ds}#{name}"])
    if not made.ok and "already exists" not in made.err:
        s.note(f"could not bookmark {s.src_ds}@{sent.name} on {s.src.label}: {made.err.strip()} "
               "(the snapshot stays the next job's base)")
        return False
    old = [m.name for m in cursors(s.src, s.src_ds, s.scaps) if m.name.startswith("#" + prefix) and m.name != "#" + name]
    if old:
        for argv, result in zip(old, s.src.run_many([["zfs", "destroy", f"{s.src_ds}{m}"] for m in old])):
            if not result.ok:
                log.warning("destroying the old cursor %s%s on %s failed: %s", s.src_ds, argv, s.src.label,
                            result.err.strip())
    if s.tcaps.bookmarks:  # OpenZFS, whose holds can be listed: the cursor's other end stays held
        _hold_last_received(s, sent, target_snaps)
    return True


def _hold_last_received(s: Sides, sent: Snap, target_snaps: Sequence[Snap]) -> None:
    if not ops.hold(s.tgt, LAST_RECEIVED, s.tgt_ds, sent.name):
        s.note(f"could not hold {s.tgt_ds}@{sent.name} on {s.tgt.label} with {LAST_RECEIVED}")
        return
    earlier = [t.name for t in target_snaps if t.guid != sent.guid and t.userrefs != 0]
    if earlier:
        results = s.tgt.run_many([["zfs", "release", LAST_RECEIVED, f"{s.tgt_ds}@{n}"] for n in earlier])
        for snap, result in zip(earlier, results):
            if not result.ok and "no such tag" not in result.err:
                log.warning("releasing %s on %s@%s failed: %s", LAST_RECEIVED, s.tgt_ds, snap, result.err.strip())
