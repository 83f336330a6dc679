"""The stub replica's snapshots, so stub mode has recovery points too.

Each target dataset keeps the list of snapshots the stub "received" (in the shared world when
there is one, else in this process), with GUIDs made up from the dataset and the snapshot name
(64-bit, like ZFS's, so they exceed bigint as real ones do). Retention follows the group's
policy as the real backend does: the target grid (the source grid is not modelled: the stub's
source keeps what the target keeps), or the newest ``retention_snapshots``; never the newest.
A listing holds what is left (on both sides) and what this job pruned (on neither). Without a
shared world it is marked partial (``recovery_points_partial``), so the database does not take
the points this process never heard of for removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from datetime import datetime, timezone
from urllib.parse import quote

from handlers.backends.stub.world import StubWorld
from handlers.backends.zfs.grid import fit, parse
from handlers.replication import RecoveryPoint, ReplicationRequest

Entry = tuple[str, int]  # snapshot name, creation (epoch seconds)


def fake_guid(dataset: str, snapshot: str) -> str:
    digest = hashlib.sha256(f"guid/{dataset}@{snapshot}".encode()).digest()
    return str(int.from_bytes(digest[:8], "big") | 1 << 63)  # above bigint, as many real GUIDs are


class StubReplica:
    def __init__(self, world: StubWorld | None) -> None:
        self._world = world
        self._memory: dict[str, list[Entry]] = {}
        self._lock = threading.Lock()

    def received(self, request: ReplicationRequest, snapshot: str, sent_bytes: int | None
                 ) -> tuple[tuple[RecoveryPoint, ...], tuple[str, ...]]:
        """Record ``snapshot`` on the replica, apply retention: (the points left, the names pruned)."""
        # The replica's listing, whichever way the data flows (reverse: the replica is the sender).
        dataset = request.source_dataset if request.direction == "reverse" else request.target_dataset
        shared = self._world.locked("replica", dataset) if self._world else contextlib.nullcontext()
        with self._lock, shared:
            entries = self._load(dataset)
            if snapshot not in {name for name, _ in entries}:
                entries.append((snapshot, int(time.time())))
            grid = parse(request.retention_grid)
            if grid is not None:
                kept, pruned = fit(grid, entries, lambda e: e[1])
            elif request.retention_snapshots is not None:
                cut = max(0, len(entries) - request.retention_snapshots)
                kept, pruned = entries[cut:], entries[:cut]
            else:
                kept, pruned = entries, []
            held = [e for e in pruned if self._held(dataset, e[0])]
            if held:  # a hold (a test's clone of it): never pruned, as `zfs destroy` refuses it
                kept, pruned = sorted(kept + held, key=lambda e: e[1]), [e for e in pruned if e not in held]
            self._store(dataset, kept)
        points = tuple(RecoveryPoint(
            snapshot_name=name, guid=fake_guid(dataset, name),
            created_at=datetime.fromtimestamp(created, timezone.utc).isoformat(),
            bytes=sent_bytes if name == snapshot else None, on_source=present, on_target=present,
        ) for entries_, present in ((pruned, False), (kept, True)) for name, created in entries_)
        return points, tuple(name for name, _ in pruned)

    def _held(self, dataset: str, snapshot: str) -> bool:
        """Whether the recovery stubs placed a hold on it (handlers/backends/stub/recovery.py)."""
        if self._world is None:
            return False
        where = self._world.root / "holds" / quote(f"{dataset}@{snapshot}", safe="")
        return where.is_dir() and any(not p.name.startswith(".") and not p.name.endswith(".lock")
                                      for p in where.iterdir())

    @property
    def complete(self) -> bool:
        """Whether a listing names every snapshot of the replica: only with a shared world. In one
        process's memory, a replica replicated by another (or an earlier) process is partly unknown."""
        return self._world is not None

    def _load(self, dataset: str) -> list[Entry]:
        if self._world is None:
            return list(self._memory.get(dataset, []))
        text = self._world.read("replica", dataset)
        return [(str(name), int(created)) for name, created in json.loads(text)] if text else []

    def _store(self, dataset: str, entries: list[Entry]) -> None:
        if self._world is None:
            self._memory[dataset] = entries
        else:
            self._world.write("replica", dataset, content=json.dumps(entries))
