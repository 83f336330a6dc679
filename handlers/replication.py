"""``replication.run``: snapshot the group's dataset and send it to the DR target."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

from handlers.context import OperationContext, StopSignal
from handlers.errors import PermanentError
from handlers.throttle import THROTTLES, Throttles
from handlers.types import Row, SSHEndpoint

SNAPSHOT_PREFIX = "zerfaux_"


@dataclass(frozen=True)
class ReplicationRequest:
    job_id: str
    source_dataset: str
    target_dataset: str
    transport: str  # ssh | paramiko | syncoid
    target: SSHEndpoint
    source: SSHEndpoint | None  # None: the dataset is on the listener's own machine
    retention_snapshots: int | None
    last_snapshot: str | None  # snapshot of the newest completed job of this pair, a hint only
    operation_id: str = ""  # the zerfaux.operations row this attempt runs for ("" outside the engine)
    attempt: int = 1  # zerfaux.operations.attempts: holds carry it, so attempts never release each other's
    retention_grid: str | None = None  # target side, zrepl form (handlers/backends/zfs/grid.py); None: the count
    source_retention_grid: str | None = None  # source side, the same form
    wire_compression: str = "off"  # replication_targets.wire_compression: auto | zstd | lz4 | off
    recursive: bool = False  # protection_groups.recursive: the dataset and every child (zfs/tree.py)
    target_id: str = ""  # replication_targets.id: streams to one target share its bandwidth limit
    bandwidth_limit_mbps: float | None = None  # the row's value when the job was claimed (None: no limit)
    # protection_groups.direction: 'reverse' sends the DR replica (source/source here) back to the
    # primary's dataset (target/target_dataset here); recovery points keep their sides' meaning.
    direction: str = "forward"


@dataclass(frozen=True)
class ReplicationProgress:
    snapshot_name: str
    base_snapshot: str | None
    bytes_transferred: int
    bytes_estimated: int | None


@dataclass(frozen=True)
class ReplicationOutcome:
    snapshot_name: str
    base_snapshot: str | None
    bytes_transferred: int
    bytes_estimated: int | None
    notes: tuple[str, ...] = ()  # what this ZFS could not do, e.g. "resume not supported"
    # Our snapshots of this replica after retention, GUID-matched across the two sides (docs/rpo.md).
    recovery_points: tuple[RecoveryPoint, ...] = ()
    pruned_source: tuple[str, ...] = ()  # snapshot names retention destroyed on the source
    pruned_target: tuple[str, ...] = ()  # and on the target
    recovery_points_partial: bool = False  # True: points not listed are unknown, not removed (the stub)
    # A recursive group: the children in this group snapshot, relative to the group's dataset
    # ("vm1", "vm1/disk0"), parent before child; each has the snapshot under the same name.
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecoveryPoint:
    """One of our snapshots of a replica, as ``zerfaux.complete_replication_run`` upserts it."""

    snapshot_name: str
    guid: str  # decimal text: ZFS GUIDs exceed bigint
    created_at: str  # ISO 8601, UTC: the snapshot's creation on the source
    bytes: int | None  # the incremental's size, for the snapshot this job sent; None for the others
    on_source: bool
    on_target: bool


ProgressSink = Callable[[ReplicationProgress], None]


class ZFSReplication(Protocol):
    def replicate(
        self, request: ReplicationRequest, progress: ProgressSink, cancel: StopSignal | threading.Event
    ) -> ReplicationOutcome:
        """Snapshot the source and bring the target up to that snapshot. Blocking.

        Idempotent: a retry reuses this job's snapshot if an earlier attempt made it, resumes
        a partial receive where the ZFS allows, and succeeds at once if the target already
        has the snapshot. Never rolls back or destroys the target: a diverged target or one
        with no common snapshot raises ``PermanentError`` saying what the operator can do.
        ``progress`` may be called often, from this thread. When ``cancel`` is set it kills its
        processes; for a person's cancel (``reason`` 'cancel', or a bare Event) it cleans partial
        receive state and raises ``OperationCancelled``; for the engine's stop (``reason`` 'stop':
        shutdown, lease lost) it keeps the partial receive and the holds a resume needs, runs no
        retention, and raises ``OperationStopped``.
        """
        ...


def snapshot_name(job_id: str, now: datetime | None = None) -> str:
    """``zerfaux_<job>_<UTC time>``: the job's identity, so only our snapshots are ever pruned."""
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{SNAPSHOT_PREFIX}{job_id.replace('-', '')[:12]}_{moment:%Y%m%dT%H%M%SZ}"


def build_request(payload: Mapping[str, Row]) -> ReplicationRequest:
    job, group, target = payload["job"], payload["group"], payload.get("target")
    if not target:
        raise PermanentError(
            f"protection group {group['name']!r} has no replication target: "
            "set protection_groups.replication_target_id"
        )
    return request_for(group, target, job_id=str(job["id"]), direction=str(group.get("direction") or "forward"),
                       job=job, last_snapshot=payload.get("last_snapshot"))  # type: ignore[arg-type]


def request_for(group: Row, target: Row, *, job_id: str, direction: str, keep_all: bool = False,
                job: Row | None = None, last_snapshot: str | None = None) -> ReplicationRequest:
    """The replication of ``group`` to or from its ``target`` row, in ``direction``.

    'forward': the group's ``source_dataset`` (on its source host, or this machine) to the replica
    ``<target_root>/<replica_name>`` on the target. 'reverse' (after a reprotect): the replica, the
    DR site's live dataset, back to the group's source host and ``source_dataset``; each side keeps
    its own retention (the target's grid now applies on the sending side). A job row, when given,
    names the datasets (its ``source_dataset`` is always the primary's, ``target_dataset`` the
    replica's, whichever way the data flows). ``keep_all``: no retention on either side, nothing
    pruned (a recovery run's replication never destroys a snapshot)."""
    if direction not in ("forward", "reverse"):
        raise PermanentError(f"protection_groups.direction {direction!r} is unknown: use forward or reverse")
    job = job or {}
    primary_dataset = job.get("source_dataset") or group.get("source_dataset")
    if not primary_dataset:
        raise PermanentError(
            f"protection group {group['name']!r} has no source_dataset: set protection_groups.source_dataset"
        )
    replica_dataset = job.get("target_dataset") or replica_of(group, target)
    if not replica_dataset:
        raise PermanentError(
            "replication_jobs.target_dataset is empty and the target has no target_root: "
            "set replication_targets.target_root"
        )
    retention = group.get("retention_snapshots")
    grids = {column: group.get(column) or None for column in ("retention_grid", "source_retention_grid")}
    primary = SSHEndpoint.source_from_group(group)
    dr = SSHEndpoint.target_from_row(target)
    if direction == "forward":
        source, source_dataset, to, target_dataset = primary, primary_dataset, dr, replica_dataset
        source_grid, target_grid = grids["source_retention_grid"], grids["retention_grid"]
    else:
        if primary is None:
            raise PermanentError(
                f"protection group {group['name']!r} has no source_ssh_host: a reverse replication (after a "
                "reprotect) sends to the original site over SSH; set protection_groups.source_ssh_host "
                "(and source_ssh_user, source_ssh_key_secret, source_ssh_host_key)"
            )
        source, source_dataset, to, target_dataset = dr, replica_dataset, primary, primary_dataset
        source_grid, target_grid = grids["retention_grid"], grids["source_retention_grid"]
    if keep_all:
        retention, source_grid, target_grid = None, None, None
    return ReplicationRequest(
        job_id=job_id,
        source_dataset=source_dataset,
        target_dataset=target_dataset,
        transport=target.get("transport") or "ssh",
        target=to,
        source=source,
        retention_snapshots=int(retention) if retention is not None else None,
        last_snapshot=last_snapshot,
        retention_grid=target_grid,
        source_retention_grid=source_grid,
        wire_compression=str(target.get("wire_compression") or "off"),
        recursive=bool(group.get("recursive")),
        target_id=str(target.get("id") or ""),
        bandwidth_limit_mbps=bandwidth_limit(target),
        direction=direction,
    )


def replica_of(group: Row, target: Row) -> str | None:
    """``<target_root>/<replica_name>`` (as the replication_jobs trigger fills target_dataset)."""
    root, source = target.get("target_root"), group.get("source_dataset")
    if not root or not source:
        return None
    name = group.get("replica_name") or str(source).rsplit("/", 1)[-1]
    return f"{root}/{name}"


def bandwidth_limit(target: Row) -> float | None:
    """``replication_targets.bandwidth_limit_mbps`` as a float; None (or a non-positive value): no limit."""
    value = target.get("bandwidth_limit_mbps")
    if value is None:
        return None
    mbps = float(value)
    return mbps if mbps > 0 else None


class ReplicationHandler:
    kind = "replication.run"

    def __init__(self, backend: ZFSReplication, progress_interval: float = 1.0,
                 throttles: Throttles = THROTTLES, reread_seconds: float = 3.0) -> None:
        self._backend = backend
        self._interval = progress_interval
        self._throttles = throttles
        self._reread_seconds = reread_seconds

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        request = replace(build_request(payload), operation_id=str(ctx.operation_id), attempt=ctx.attempt)
        if request.target_id:
            self._throttles.set_limit(request.target_id, request.bandwidth_limit_mbps)
        lock = threading.Lock()
        latest: list[ReplicationProgress] = []

        def sink(progress: ReplicationProgress) -> None:
            with lock:
                latest[:] = [progress]

        async def flush_forever() -> None:
            sent: dict[str, Any] | None = None
            rate = Rate()
            reread_at = time.monotonic() + self._reread_seconds
            while True:
                await asyncio.sleep(self._interval)
                with lock:
                    current = latest[0] if latest else None
                if current is not None:
                    report = asdict(current)
                    report["rate_bytes_per_second"] = rate.sample(current.bytes_transferred)
                    if report != sent:
                        await ctx.report(report)
                        sent = report
                if request.target_id and time.monotonic() >= reread_at:
                    reread_at = time.monotonic() + self._reread_seconds
                    await self._reread_limit(ctx, request.target_id)

        flusher = asyncio.create_task(flush_forever())
        try:
            outcome = await asyncio.to_thread(self._backend.replicate, request, sink, ctx.stop)
        finally:
            flusher.cancel()
        result = asdict(outcome)
        result["direction"] = request.direction  # complete_replication_run names the points' sides by it
        for key in ("notes", "recovery_points", "pruned_source", "pruned_target", "children"):
            result[key] = list(result[key])
        return result

    async def _reread_limit(self, ctx: OperationContext, target_id: str) -> None:
        """Apply the target row's bandwidth limit as it is now (an engine without ``reread``: as claimed)."""
        reread = getattr(ctx, "reread", None)
        if reread is None:
            return
        payload = await reread()
        target = (payload or {}).get("target")
        if target and str(target.get("id")) == target_id:
            self._throttles.set_limit(target_id, bandwidth_limit(target))


class Rate:
    """Bytes per second over the last few seconds, from the byte counts of successive reports."""

    def __init__(self, window: float = 3.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, moved: int, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        if self._samples and moved < self._samples[-1][1]:
            self._samples.clear()  # a new transfer (a resume, a restart): its count starts again
        self._samples.append((now, moved))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_t, first_b = self._samples[0]
        if now - first_t <= 0:
            return None
        return int((moved - first_b) / (now - first_t))
