"""One transfer of one attempt: ``zfs send`` into ``zfs receive`` by the transport the target row asks for.

``ssh`` and ``paramiko`` run the stream through the listener (zfs/pipe.py); ``syncoid`` hands it to
syncoid (zfs/syncoid.py) where syncoid can do what was planned, and says in the notes when it could
not and the ``ssh`` transport carried the transfer instead. Failures come back in words.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import paramiko

from handlers.backends.zfs.connections import SharedConnections
from handlers.backends.zfs.flags import StreamFlags
from handlers.backends.zfs.pipe import ChannelEnd, Ended, ProcEnd, relay
from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.ssh import KeyFiles, Peer, classify_ssh_failure
from handlers.backends.zfs.syncoid import run_syncoid, syncoid_argv
from handlers.backends.zfs.wire import Wire
from handlers.errors import PermanentError, TransientError
from handlers.throttle import Bucket

log = logging.getLogger(__name__)


@dataclass
class Links:
    """How this attempt reaches the hosts: the row's peers, their paramiko sessions, ssh's files and masters."""

    cipher: str
    files: KeyFiles
    shared: SharedConnections
    target: Peer
    source: Peer | None
    target_client: paramiko.SSHClient
    source_client: paramiko.SSHClient | None
    bucket: Bucket | None = None  # the target's bandwidth limit, shared by its streams (handlers/throttle.py)


class Transfer:
    def __init__(self, job_id: str, transport: str, sides: Sides, links: Links, cancel: threading.Event) -> None:
        self.job_id, self.transport = job_id, transport
        self.sides, self.links, self.cancel = sides, links, cancel
        self.target_exists = True  # until listed: syncoid's listing of a remote target needs `zfs get -t`
        # Set by the attempt for its own stream (a resume's token carries its flags): zfs/flags.py, wire.py.
        self.flags = StreamFlags()
        self.wire: Wire | None = None
        self.recv_options: list[str] = []  # -o zerfaux:send_flags=... on a seed
        self.from_bookmark = False  # the base is a cursor: syncoid cannot be told to send from it

    def recv_argv(self) -> list[str]:
        return ["zfs", "receive", "-u"] + (["-s"] if self.sides.resumable else []) + self.recv_options + \
            [self.sides.tgt_ds]

    def run(self, send: list[str], on_bytes: Callable[[int], None], sending: Snap | None = None) -> int:
        """Run one transfer; ``sending`` is the snapshot the stream ends at (None for a resume token's)."""
        s, links = self.sides, self.links
        transport = self._choose(sending)
        started = time.monotonic()
        receive = self.recv_argv()
        if self.wire is not None and transport != "syncoid":
            send, receive = self.wire.sending(send), self.wire.receiving(receive)
        try:
            if transport == "syncoid":
                return self._syncoid(on_bytes)
            if transport == "paramiko":
                producer: ProcEnd | ChannelEnd = (
                    ChannelEnd(links.source_client, send, f"zfs send on {s.src.label}") if links.source_client
                    else ProcEnd(send, "zfs send (local)", "producer"))
                consumer: ProcEnd | ChannelEnd = ChannelEnd(links.target_client, receive,
                                                            f"zfs receive on {s.tgt.label}")
                return relay(producer, consumer, on_bytes, self.cancel, links.bucket)
            with ExitStack() as stack:
                if links.source:
                    shared = stack.enter_context(links.shared.options(links.source, links.cipher))
                    producer = ProcEnd(links.files.ssh_argv(links.source, links.cipher, shlex.join(send), shared),
                                       f"zfs send on {s.src.label}", "producer")
                else:
                    producer = ProcEnd(send, f"zfs send on {s.src.label}", "producer")
                shared = stack.enter_context(links.shared.options(links.target, links.cipher))
                consumer = ProcEnd(links.files.ssh_argv(links.target, links.cipher, shlex.join(receive), shared),
                                   f"zfs receive on {s.tgt.label}", "consumer")
                return relay(producer, consumer, on_bytes, self.cancel, links.bucket)
        except Ended as exc:
            raise self._explain(exc) from None
        finally:
            log.debug("job %s: transfer ran %.3f s", self.job_id, time.monotonic() - started)

    def _choose(self, sending: Snap | None) -> str:
        if self.transport != "syncoid":
            return self.transport
        s = self.sides
        if self.from_bookmark:
            s.note("syncoid cannot be told to send from Zerfaux's bookmark: this transfer used the ssh transport")
            return "ssh"
        if not self._syncoid_can_list():
            s.note("syncoid cannot list snapshots over SSH on this ZFS (zfs get has no -t, and syncoid 2.1's "
                   "fallback for remote hosts is broken): this transfer used the ssh transport")
            return "ssh"
        newer = [] if sending is None else [snap.name for snap in s.source_snapshots() if snap.txg > sending.txg]
        if newer:
            # syncoid --no-sync-snap sends up to the source's newest snapshot and (2.1) cannot be told
            # another; the plan, the holds and the verify are for ours.
            assert sending is not None
            s.note(f"{s.src_ds}@{newer[-1]} is newer than {sending.name}, and syncoid 2.1 sends up to the "
                   "newest snapshot (it cannot be told which): this transfer used the ssh transport")
            return "ssh"
        return "syncoid"

    def _syncoid_can_list(self) -> bool:
        """syncoid lists the source's snapshots, and the target's once it exists, with `zfs get -t`."""
        source_ok = self.links.source is None or self.sides.scaps.get_types
        return source_ok and (not self.target_exists or self.sides.tcaps.get_types)

    def _syncoid(self, on_bytes: Callable[[int], None]) -> int:
        s, links = self.sides, self.links
        e = links.target.endpoint
        src = s.src_ds
        if links.source is not None:
            src = f"{links.source.endpoint.user}@{links.source.endpoint.host}:{s.src_ds}"
        argv = syncoid_argv(src, f"{e.user}@{e.host}:{s.tgt_ds}", links.target, links.source,
                            links.files, links.cipher, s.resumable, self.flags.letters,
                            "u" + "".join(f" o {value}" for value in self.recv_options[1::2]))
        rate = links.bucket.rate if links.bucket else None
        if rate is not None:
            # syncoid's own limit (mbuffer -r on the target): fixed when the stream starts, per stream.
            argv[-2:-2] = [f"--target-bwlimit={int(rate)}"]
            s.note(f"syncoid limited this stream to {rate * 8 / 1e6:g} Mbit/s with mbuffer on the target: "
                   "the limit is not shared with other streams and a change applies from the next job")
        moved = run_syncoid(argv, links.target, on_bytes, self.cancel)
        if moved == 0:
            s.note("syncoid reported no byte count (pv missing on the listener): bytes_transferred is 0")
        return moved

    def _explain(self, exc: Ended) -> PermanentError | TransientError:
        s = self.sides
        peer = self.links.target if exc.where.startswith("zfs receive") else self.links.source
        if exc.rc == 255 and peer is not None:
            fault = classify_ssh_failure(exc.stderr, peer)
            if fault is not None:
                return fault
        if exc.rc == 255 and peer is not None and not exc.stderr.strip():
            # What ssh says when the peer goes silent ("Timeout, server not responding") is below LogLevel=ERROR.
            return TransientError(
                f"{exc.where}: the SSH connection to {peer.label} ended without a message (exit 255): the host "
                "stopped answering (ssh gives up after 30 s of silence) or the link dropped; the next attempt "
                "connects again")
        err = exc.stderr.strip()[-800:] or f"exit status {exc.rc}"
        lowered = err.lower()
        if "has been modified" in lowered or "does not match incremental source" in lowered:
            return PermanentError(
                f"target {s.tgt_ds} on {s.tgt.label} changed since its newest snapshot, so the incremental "
                f"receive was refused ({err}). Zerfaux never rolls back a replica: inspect it, roll it back yourself "
                "if the change may be discarded, then run the job again"
            )
        # "already exists" is not here: an earlier attempt's receive may still be finishing; the retry re-plans.
        if "out of space" in lowered or "permission denied" in lowered:
            return PermanentError(f"{exc.where} failed: {err}")
        return TransientError(f"{exc.where} failed (exit {exc.rc}): {err}")
