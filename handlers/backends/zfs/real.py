"""``ZFSReplicationReal``: ZFS replication over SSH that never destroys data.

The algorithm is in docs/replication.md. In short: validate every value, connect with pinned
host keys, learn what each ZFS can do (cached per host), resume a partial receive if there is
one, refuse a diverged target, snapshot the source (a retry reuses the job's snapshot), hold the
base, send incrementally from the newest common snapshot through the listener, verify the
target has the snapshot by GUID, release holds, prune only our own snapshots.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import cast

import paramiko

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import LocalRunner, ParamikoRunner, Runner
from handlers.backends.zfs.pipe import ChannelEnd, Ended, ProcEnd, relay
from handlers.backends.zfs.plan import Snap, find_job_snapshot, job_prefix, plan, prunable
from handlers.backends.zfs.connections import SessionPool, SharedConnections, receive_lock
from handlers.backends.zfs.ssh import KeyFiles, Peer, classify_ssh_failure, sweep_stale_key_dirs
from handlers.backends.zfs.syncoid import run_syncoid, syncoid_argv
from handlers.backends.zfs.validate import check_cipher, parse_host_key, validate_request
from handlers.errors import OperationCancelled, PermanentError, TransientError
from handlers.replication import ProgressSink, ReplicationOutcome, ReplicationProgress, ReplicationRequest, snapshot_name
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint

log = logging.getLogger(__name__)

_PENDING_GUID = 0  # no real snapshot has GUID 0: stands for "this job's snapshot, not made yet"

def missing_tools() -> list[str]:
    """Programs the real backend cannot work without (syncoid is checked when a job asks for it)."""
    return [tool for tool in ("ssh",) if shutil.which(tool) is None]


class ZFSReplicationReal:
    def __init__(self, secrets: SecretResolver, cipher: str = "aes128-gcm@openssh.com") -> None:
        self._secrets = secrets
        self._cipher = check_cipher(cipher)
        self.sessions = SessionPool()
        self.shared = SharedConnections()
        sweep_stale_key_dirs()

    def close(self) -> None:
        """Close the SSH sessions and masters kept between replications (key files live for one call)."""
        self.sessions.close()
        self.shared.close()

    def replicate(self, request: ReplicationRequest, progress: ProgressSink, cancel: threading.Event) -> ReplicationOutcome:
        validate_request(request)  # before anything runs or connects
        if cancel.is_set():
            raise OperationCancelled("cancelled before the replication started")
        target = self._peer(request.target, "replication_targets.ssh")
        source = self._peer(request.source, "protection_groups.source_ssh") if request.source else None
        with ExitStack() as stack, receive_lock(request.target, request.target_dataset, cancel):
            files = KeyFiles()
            stack.callback(files.close)
            target_client, source_client = self.sessions.checkout_both(target, source, self._cipher)
            clients = [(target, target_client)] + ([(source, source_client)] if source and source_client else [])
            if source_client is None and shutil.which("zfs") is None:
                for _, client in clients:
                    client.close()
                raise PermanentError("protection_groups.source_ssh_host is empty (a local source) but zfs is not installed here")
            run = _Run(self._cipher, request, files, self.shared, target, source, target_client, source_client,
                       progress, cancel)
            try:
                outcome = run.execute()
            except BaseException:
                for _, client in clients:
                    client.close()  # a session in an unknown state is not lent again
                raise
            for peer, client in clients:
                self.sessions.checkin(peer, self._cipher, client)
            return outcome

    def _peer(self, endpoint: SSHEndpoint, field: str) -> Peer:
        key = self._secrets.resolve(endpoint.key_secret, f"{field}_key_secret")
        return Peer(endpoint, parse_host_key(endpoint.host_key, f"{field}_host_key"), key, field)


class _Run:
    """One attempt of one job; holds the state the steps share."""

    def __init__(self, cipher: str, request: ReplicationRequest, files: KeyFiles, shared: SharedConnections,
                 target: Peer, source: Peer | None,
                 target_client: paramiko.SSHClient, source_client: paramiko.SSHClient | None,
                 progress: ProgressSink, cancel: threading.Event) -> None:
        self.cipher, self.req, self.files, self.shared = cipher, request, files, shared
        self.target_peer, self.source_peer = target, source
        self.target_client = target_client
        self.source_client = source_client
        self.tgt: Runner = ParamikoRunner(target_client, target)
        self.src: Runner = ParamikoRunner(self.source_client, source) if self.source_client and source else LocalRunner()
        self.progress, self.cancel = progress, cancel
        self.src_ds, self.tgt_ds = request.source_dataset, request.target_dataset
        self.notes: list[str] = []
        self.target_exists = True  # until listed: the resume path only runs on an existing target
        self.held: list[tuple[Runner, str, str]] = []
        self.streaming = False  # a stream was under way when the attempt failed: partial state may be left
        self.tag = job_prefix(snapshot_name(request.job_id)).rstrip("_")
        self.target_tag = ops.target_tag(request.target.host, request.target.port, request.target_dataset)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def execute(self) -> ReplicationOutcome:
        self.scaps, self.tcaps = ops.parallel(
            partial(ops.capabilities, self.src, self.src_ds.split("/")[0]),
            partial(ops.capabilities, self.tgt, self.tgt_ds.split("/")[0]),
        )
        self.resumable = self.scaps.resume and self.tcaps.resume
        if not self.resumable:
            side = self.tgt.label if not self.tcaps.resume else self.src.label
            self.note(f"resume not supported by this ZFS ({side}): an interrupted transfer restarts from the last common snapshot")
        try:
            return self._execute()
        except OperationCancelled:
            self._clean_partial()
            raise
        except Exception:
            if self.resumable and self.streaming:
                # The partial receive resumes from its base: keep the holds for the retry of this
                # job, which releases them (as after a SIGKILL, where nothing could release them).
                self.held = []
            raise
        finally:
            self._release()

    def _execute(self) -> ReplicationOutcome:
        # One look at the target (one round trip): a receive still running there (an earlier
        # attempt's may be exiting: its listing is not to be trusted until it has), its snapshots,
        # its parent, `written`, a resume token. The source's list is read meanwhile.
        state, src_snaps = ops.parallel(
            partial(ops.settled_target_state, self.tgt, self.tgt_ds, self.tcaps), self._source_snapshots)
        target = cast("ops.TargetState", state)
        source_snaps = cast("list[Snap]", src_snaps)
        prefix = job_prefix(snapshot_name(self.req.job_id))
        mine = find_job_snapshot(source_snaps, prefix)
        transferred, estimated, resumed_base = self._resume_partial(mine.name if mine else "", target.token,
                                                                    source_snaps)
        if transferred:
            source_snaps = self._source_snapshots()
            target = ops.target_state(self.tgt, self.tgt_ds, self.tcaps)
        name = mine.name if mine else snapshot_name(self.req.job_id)
        snap = mine or Snap(name, _PENDING_GUID, max((s.txg for s in source_snaps), default=0) + 1)
        tgt_snaps, written = target.snaps, target.written
        self.target_exists = tgt_snaps is not None
        if mine is not None:
            self._adopt_holds(source_snaps, tgt_snaps or [])
        if tgt_snaps is None and not target.parent_ok:
            parent = self.tgt_ds.rsplit("/", 1)[0]
            raise PermanentError(
                f"{parent} (replication_targets.target_root) does not exist on {self.tgt.label}: "
                f"create it there (zfs create -p {parent}) and run the job again"
            )
        # Decide before making the snapshot: a refused target leaves the source untouched.
        try:
            decided = plan(source_snaps, tgt_snaps, snap, self.tgt_ds, written)
        except PermanentError:
            tgt_snaps, written = self._settled_target(tgt_snaps, written)
            decided = plan(source_snaps, tgt_snaps, snap, self.tgt_ds, written)
        base = decided.base_name
        holds = [(self.src, self.src_ds, name)]
        if base:
            holds += [(self.src, self.src_ds, base), (self.tgt, self.tgt_ds, base)]
        if mine is None:
            ops.create_snapshot(self.src, self.src_ds, name, self.req.job_id, self.target_tag)
            log.info("job %s: snapshot %s@%s made on %s", self.req.job_id, self.src_ds, name, self.src.label)
        if decided.action != "uptodate":
            # Our snapshot exists now, so the base stays the newest common snapshot: hold it on both
            # sides (and our snapshot) while the stream flows, estimate, and read our GUID, all at once.
            found = ops.parallel(self._source_snapshots, partial(self._estimate, name, base),
                                 *(partial(self._hold, *h) for h in holds))
            source_snaps, estimated = cast("list[Snap]", found[0]), cast("int | None", found[1])
            made = find_job_snapshot(source_snaps, prefix)
            if made is None:
                raise TransientError(f"snapshot {self.src_ds}@{name} vanished right after it was made")
            snap = made
            decided = plan(source_snaps, tgt_snaps, snap, self.tgt_ds, written)
            if decided.base_name != base:
                raise TransientError(f"the snapshots of {self.src_ds} changed while the replication was planned "
                                     "(someone else made or destroyed one): the next attempt plans again")
            self.progress(ReplicationProgress(name, base, transferred, estimated))
            transferred += self._send(name, base, estimated)
        ops.parallel(partial(self._verify, snap), self._release)
        self._retain(snap)
        log.info("job %s: %s@%s is on %s (%s, %d bytes)", self.req.job_id, self.tgt_ds, name, self.tgt.label,
                 decided.action, transferred)
        if decided.action == "uptodate" and transferred:
            base = resumed_base  # the resume was the whole transfer: its base is the job's base
        return ReplicationOutcome(name, base, transferred, estimated, tuple(self.notes))

    def _settled_target(self, seen: list[Snap] | None, written: int | None,
                        reads: int = 5) -> tuple[list[Snap] | None, int | None]:
        """Read the target again before refusing it: only a listing that holds still is trusted.

        A receive aborted a moment ago (a cancel, a killed sender) can still be rolling back in
        the ZFS daemon after its client exited; zfs-fuse was seen listing no snapshots at all
        then. A refusal is permanent, so it must rest on two equal reads a second apart.
        """
        for _ in range(reads):
            time.sleep(1.0)
            again = ops.target_state(self.tgt, self.tgt_ds, self.tcaps)
            if again.snaps == seen and again.written == written:
                return again.snaps, again.written
            seen, written = again.snaps, again.written
        raise TransientError(
            f"{self.tgt_ds} on {self.tgt.label} kept changing while it was read (a receive may still be "
            "ending): the next attempt will look again"
        )

    def _source_snapshots(self) -> list[Snap]:
        found = ops.snapshots(self.src, self.src_ds, self.scaps)
        if found is None:
            raise PermanentError(f"protection_groups.source_dataset {self.src_ds} does not exist on {self.src.label}")
        return found

    def _release(self) -> None:
        held, self.held = self.held, []
        if held:
            ops.parallel(*(partial(ops.release, runner, self.tag, dataset, snap) for runner, dataset, snap in held))

    def _estimate(self, name: str, base: str | None) -> int | None:
        if not self.scaps.estimate:
            self.note(f"size estimate not supported by this ZFS ({self.src.label}): bytes_estimated left empty")
            return None
        return ops.estimate(self.src, self.src_ds, name, base, None)

    def _adopt_holds(self, src_snaps: list[Snap], tgt_snaps: list[Snap]) -> None:
        """A retry of this job: holds an earlier attempt left (killed, or failed mid-stream) are ours to
        release at the end. Which held snapshots carry our tag, only OpenZFS can list (zfs-fuse's
        `zfs holds` is broken), so every held one is released by tag: "no such tag" is ignored."""
        for runner, dataset, snaps in ((self.src, self.src_ds, src_snaps), (self.tgt, self.tgt_ds, tgt_snaps)):
            for snap in snaps:
                if snap.userrefs > 0 and (runner, dataset, snap.name) not in self.held:
                    self.held.append((runner, dataset, snap.name))

    def _hold(self, runner: Runner, dataset: str, snap: str) -> None:
        if ops.hold(runner, self.tag, dataset, snap):
            if (runner, dataset, snap) not in self.held:
                self.held.append((runner, dataset, snap))
        else:
            self.note(f"hold not supported by this ZFS ({runner.label}): {dataset}@{snap} was not held during the send")

    def _send(self, name: str, base: str | None, estimated: int | None) -> int:
        self.streaming = True
        send = ["zfs", "send"] + (["-i", f"{self.src_ds}@{base}"] if base else []) + [f"{self.src_ds}@{name}"]
        moved = self._stream(send, lambda n: self.progress(ReplicationProgress(name, base, n, estimated)))
        self.streaming = False
        return moved

    def _recv_argv(self) -> list[str]:
        return ["zfs", "receive", "-u"] + (["-s"] if self.resumable else []) + [self.tgt_ds]

    def _stream(self, send: list[str], on_bytes: Callable[[int], None]) -> int:
        """Run one transfer with the request's transport; translates failures into words."""
        transport = self.req.transport
        if transport == "syncoid" and not self._syncoid_can_list():
            transport = "ssh"
            self.note("syncoid cannot list snapshots over SSH on this ZFS (zfs get has no -t, and syncoid 2.1's "
                      "fallback for remote hosts is broken): this transfer used the ssh transport")
        started = time.monotonic()
        try:
            if transport == "syncoid":
                return self._syncoid(on_bytes)
            if transport == "paramiko":
                producer: ProcEnd | ChannelEnd = (
                    ChannelEnd(self.source_client, send, f"zfs send on {self.src.label}") if self.source_client
                    else ProcEnd(send, "zfs send (local)", "producer"))
                consumer: ProcEnd | ChannelEnd = ChannelEnd(self.target_client, self._recv_argv(), f"zfs receive on {self.tgt.label}")
                return relay(producer, consumer, on_bytes, self.cancel)
            with ExitStack() as stack:
                if self.source_peer:
                    shared = stack.enter_context(self.shared.options(self.source_peer, self.cipher))
                    producer = ProcEnd(self.files.ssh_argv(self.source_peer, self.cipher, shlex.join(send), shared),
                                       f"zfs send on {self.src.label}", "producer")
                else:
                    producer = ProcEnd(send, f"zfs send on {self.src.label}", "producer")
                shared = stack.enter_context(self.shared.options(self.target_peer, self.cipher))
                consumer = ProcEnd(self.files.ssh_argv(self.target_peer, self.cipher, shlex.join(self._recv_argv()), shared),
                                   f"zfs receive on {self.tgt.label}", "consumer")
                return relay(producer, consumer, on_bytes, self.cancel)
        except Ended as exc:
            raise self._explain(exc) from None
        finally:
            log.debug("job %s: transfer ran %.3f s", self.req.job_id, time.monotonic() - started)

    def _syncoid_can_list(self) -> bool:
        """syncoid lists the source's snapshots, and the target's once it exists, with `zfs get -t`."""
        source_ok = self.source_peer is None or self.scaps.get_types
        return source_ok and (not self.target_exists or self.tcaps.get_types)

    def _syncoid(self, on_bytes: Callable[[int], None]) -> int:
        e = self.target_peer.endpoint
        src = self.src_ds
        if self.source_peer is not None:
            s = self.source_peer.endpoint
            src = f"{s.user}@{s.host}:{self.src_ds}"
        argv = syncoid_argv(src, f"{e.user}@{e.host}:{self.tgt_ds}", self.target_peer, self.source_peer,
                            self.files, self.cipher, self.resumable)
        moved = run_syncoid(argv, self.target_peer, on_bytes, self.cancel)
        if moved == 0:
            self.note("syncoid reported no byte count (pv missing on the listener): bytes_transferred is 0")
        return moved

    def _explain(self, exc: Ended) -> PermanentError | TransientError:
        peer = self.target_peer if exc.where.startswith("zfs receive") else self.source_peer
        if exc.rc == 255 and peer is not None:
            fault = classify_ssh_failure(exc.stderr, peer)
            if fault is not None:
                return fault
        err = exc.stderr.strip()[-800:] or f"exit status {exc.rc}"
        lowered = err.lower()
        if "has been modified" in lowered or "does not match incremental source" in lowered:
            return PermanentError(
                f"target {self.tgt_ds} on {self.tgt.label} changed since its newest snapshot, so the incremental "
                f"receive was refused ({err}). Zerfaux never rolls back a replica: inspect it, roll it back yourself "
                "if the change may be discarded, then run the job again"
            )
        # "already exists" is not here: an earlier attempt's receive may still be finishing; the retry re-plans.
        if "out of space" in lowered or "permission denied" in lowered:
            return PermanentError(f"{exc.where} failed: {err}")
        return TransientError(f"{exc.where} failed (exit {exc.rc}): {err}")

    def _resume_partial(self, name: str, token: str | None,
                        source_snaps: list[Snap]) -> tuple[int, int | None, str | None]:
        """Finish an interrupted receive from its token; abandon it only if its snapshot is gone.

        Returns the bytes resumed, the resume stream's estimate (the job's ``bytes_estimated``
        when the resume was all that was left to send) and the name of the stream's base on the
        source (None for a full stream). The token names its base by GUID only; ``zfs send -nv -t``
        prints the token's contents, and the source's listing turns the GUID into a name."""
        if not self.resumable or not token:
            return 0, None, None
        # A dry run tells whether the token's snapshot still exists on the source (FACTS: -A only then).
        check = self.src.run(["zfs", "send", "-nvP", "-t", token])
        if not check.ok:
            if "no longer exists" in check.err or "does not exist" in check.err:
                ops.abort_partial(self.tgt, self.tgt_ds)
                self.note("a partial receive was abandoned (zfs receive -A): its snapshot no longer exists on the source")
                return 0, None, None
            raise TransientError(f"cannot resume into {self.tgt_ds}: zfs send -t failed on {self.src.label}: {check.err.strip()}")
        estimated = ops.parse_size(check.out + check.err)
        from_guid = ops.parse_token_from_guid(check.out + check.err)
        base = next((s.name for s in source_snaps if s.guid == from_guid), None) if from_guid else None
        log.info("job %s: resuming the partial receive into %s", self.req.job_id, self.tgt_ds)
        self.note("resumed an interrupted transfer from the target's receive_resume_token")
        self.streaming = True
        moved = self._stream(["zfs", "send", "-t", token],
                             lambda n: self.progress(ReplicationProgress(name, base, n, estimated)))
        self.streaming = False
        return moved, estimated, base

    def _clean_partial(self) -> None:
        """After a cancel: let the killed receive exit, then drop its partial receive state."""
        try:
            ops.settled_target_state(self.tgt, self.tgt_ds, self.tcaps)
        except (TransientError, PermanentError) as exc:
            log.warning("job %s: after cancel: %s", self.req.job_id, exc)
        if not self.resumable:
            return
        for _ in range(20):
            if ops.resume_token(self.tgt, self.tgt_ds, self.tcaps) is None:
                time.sleep(0.25)
                continue
            if ops.abort_partial(self.tgt, self.tgt_ds).ok:
                return
            time.sleep(0.25)

    def _verify(self, snap: Snap) -> None:
        tgt = ops.snapshots(self.tgt, self.tgt_ds, self.tcaps) or []
        if not any(t.guid == snap.guid for t in tgt):
            raise TransientError(
                f"the transfer ended but {self.tgt_ds} on {self.tgt.label} has no snapshot with GUID {snap.guid} "
                f"({snap.name}); the next attempt will try again"
            )

    def _retain(self, snap: Snap) -> None:
        keep = self.req.retention_snapshots
        if keep is None:
            return
        # On the source only the snapshots made for this replica count: another target's base stays.
        sides = [(self.src, self.src_ds, self.scaps, self.target_tag), (self.tgt, self.tgt_ds, self.tcaps, None)]
        ops.parallel(*(partial(self._prune, runner, dataset, caps, keep, snap, target)
                       for runner, dataset, caps, target in sides))

    def _prune(self, runner: Runner, dataset: str, caps: ops.Caps, keep: int, snap: Snap, target: str | None) -> None:
        if not caps.userrefs:
            self.note(f"retention skipped on {runner.label}: this ZFS cannot say which snapshots are held")
            return
        for old in prunable(ops.snapshots(runner, dataset, caps) or [], keep, protect={snap.guid}, target=target):
            result = ops.destroy_snapshot(runner, dataset, old.name)
            if not result.ok:
                self.note(f"retention could not destroy {dataset}@{old.name} on {runner.label}: {result.err.strip()}")
