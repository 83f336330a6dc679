"""The WAN section of bench/replication.py: the namespace link of tests/support/netns.py.

200 Mbit/s (tbf on both veth ends), 0.1 % loss (nftables), 40 ms of round trip (the delay relay),
the DR host's sshd inside the namespace. On that link, in the same run:

* raw ``zfs send | ssh | zfs receive`` against Zerfaux's ``ssh`` and ``paramiko`` transports
  (``WAN RATIO ssh`` and ``WAN RATIO paramiko``: best Zerfaux rate / best raw rate), fresh
  handshakes and warm connections both;
* the paramiko window: a pull across the WAN (source behind the link, target on loopback), where
  the window of the channel carrying ``zfs send`` is ours (ssh.WINDOW_BYTES), at Zerfaux's 64 MiB
  and at 256 KiB, a window below the link's bandwidth-delay product (200 Mbit/s × 40 ms = 1 MB);
* a bandwidth limit of 50 Mbit/s: the stream's rate (bytes_transferred) and the link's (the veth's
  tx counter: the stream plus SSH framing; with GSO one TCP/IP header per segment) over 30 s;
* wire compression (``replication_targets.wire_compression``, handlers/backends/zfs/wire.py) across
  the link on a VM image of text and zeros (bench/wire.py's) and on the random stream, against none
  (``WAN WIRE`` lines); ``COMPRESSION_CONTENDERS`` adds more of them to the contenders above.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from handlers.backends.zfs import ssh as zfs_ssh
from handlers.backends.zfs.pipe import grow_pipe
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.replication import ReplicationProgress, ReplicationRequest
from handlers.secrets import SecretResolver
from handlers.throttle import MBIT, THROTTLES
from handlers.types import SSHEndpoint
from tests.support.netns import Wan
from tests.support.zfs import Sshd

CIPHER = "aes128-gcm@openssh.com"
WATCHDOG_SECONDS = 600.0
MB = 1_000_000
LIMIT_MBPS = 50.0
LIMIT_WINDOW = 30.0
SMALL_WINDOW = 256 * 1024

# (label, transport, ReplicationRequest fields to replace): more contenders on the random stream, measured
# like ssh and paramiko and printed as "WAN RATIO <label>", e.g. ("ssh+zstd", "ssh", {"wire_compression": "zstd"}).
COMPRESSION_CONTENDERS: list[tuple[str, str, dict[str, object]]] = []
WIRE_CODECS = ("off", "lz4", "zstd")


MBUFFER = "128M"  # mbuffer's memory on each end, for the buffered raw pipe


def _zfs(*argv: str) -> None:
    subprocess.run(["zfs", *argv], check=True, capture_output=True, timeout=WATCHDOG_SECONDS)


def _ssh(link: Wan, key: str, known: str, remote: list[str], master: str | None) -> list[str]:
    shared = ["-o", "ControlMaster=auto", "-o", f"ControlPath={master}", "-o", "ControlPersist=120"] if master \
        else ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return ["ssh", "-F", "/dev/null", "-T", "-c", CIPHER, "-i", key, "-o", "IdentitiesOnly=yes", *shared,
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-p", str(link.ssh_port),
            f"root@{link.ssh_host}", shlex.join(remote)]


def _raw(link: Wan, key: str, known: str, snapshot: str, target: str, master: str | None,
         buffered: bool = False) -> None:
    """``zfs send | ssh | zfs receive``; ``buffered``: with an mbuffer of MBUFFER on each end, the
    buffer against latency the issue asks to measure before choosing one."""
    send = subprocess.Popen(["zfs", "send", snapshot], stdout=subprocess.PIPE)
    assert send.stdout is not None
    grow_pipe(send.stdout.fileno())
    stages = [send]
    feed = send.stdout
    remote = ["zfs", "receive", "-u", target]
    if buffered:
        local = subprocess.Popen(["mbuffer", "-q", "-m", MBUFFER], stdin=feed, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
        feed.close()
        assert local.stdout is not None
        stages.append(local)
        feed = local.stdout
        remote = ["sh", "-c", f"mbuffer -q -m {MBUFFER} 2>/dev/null | {shlex.join(remote)}"]
    recv = subprocess.Popen(_ssh(link, key, known, remote, master), stdin=feed)
    feed.close()
    if recv.wait(WATCHDOG_SECONDS) != 0 or any(p.wait(WATCHDOG_SECONDS) != 0 for p in stages):
        raise RuntimeError("raw zfs send | ssh | zfs receive across the WAN failed")


def _replicate(backend: ZFSReplicationReal, request: ReplicationRequest,
               progress: Callable[[ReplicationProgress], None] = lambda p: None) -> int:
    cancel = threading.Event()
    watchdog = threading.Timer(WATCHDOG_SECONDS, cancel.set)
    watchdog.start()
    try:
        return backend.replicate(request, progress, cancel).bytes_transferred
    finally:
        watchdog.cancel()


class _Flow:
    """A progress sink that remembers when the stream's first and last bytes were counted."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0

    def __call__(self, p: ReplicationProgress) -> None:
        now = time.monotonic()
        if p.bytes_transferred and self.first is None:
            self.first = now
        self.last = now

    def seconds(self) -> float:
        return self.last - self.first if self.first is not None else float("inf")


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.monotonic()
    out = fn()
    return time.monotonic() - start, out


def wan_section(link: Wan, sshd: Sshd, work: str, source: str, dst_pool: str, stream: int,
                rounds: int = 1, compressible: str | None = None) -> list[str]:
    """Run the WAN contenders; returns the lines to print above the final RATIO."""
    key = os.path.join(sshd.directory, "user_ed25519")
    known = os.path.join(work, "known_hosts_wan")
    with open(known, "w") as fh:
        fh.write(link.sshd_host_key + "\n")
    master = os.path.join(work, "wan-master.sock")
    subprocess.run(_ssh(link, key, known, ["true"], master), check=True, timeout=60)
    resolver = SecretResolver({"ZERFAUX_SECRET_BENCH": sshd.private_key})
    wan_end = SSHEndpoint(link.ssh_host, link.ssh_port, "root", "bench", link.sshd_host_key)
    loop_end = SSHEndpoint("127.0.0.1", sshd.port, "root", "bench", sshd.host_key)
    snapshot = f"{source}@bench"
    best: dict[str, float] = {}

    def record(label: str, nbytes: int, seconds: float) -> None:
        rate = nbytes / MB / seconds
        best[label] = max(best.get(label, 0.0), rate)
        print(f"  WAN {label:<36} {rate:7.2f} MB/s ({nbytes / MB:.1f} MB in {seconds:.2f} s)", flush=True)

    def request(into: str, transport: str, target: SSHEndpoint = wan_end, src: SSHEndpoint | None = None,
                target_id: str = "") -> ReplicationRequest:
        return ReplicationRequest(str(uuid.uuid4()), source, into, transport, target, src, None, None,
                                  target_id=target_id)

    kept = ZFSReplicationReal(resolver, cipher=CIPHER)
    try:
        _zfs("create", "-o", "mountpoint=none", f"{source.split('/')[0]}/wanwarm")
        _replicate(kept, ReplicationRequest(str(uuid.uuid4()), f"{source.split('/')[0]}/wanwarm",
                                            f"{dst_pool}/wanwarm", "ssh", wan_end, None, None, None))
        for round_ in range(1, rounds + 1):
            print(f"WAN round {round_} (200 Mbit/s, 0.1 % loss, 40 ms round trip)", flush=True)
            for warm in (False, True):
                into = f"{dst_pool}/wanraw"
                seconds, _ = _timed(lambda: _raw(link, key, known, snapshot, into, master if warm else None))
                _zfs("destroy", "-r", into)
                record("raw, " + ("warm master" if warm else "fresh handshake"), stream, seconds)
            if shutil.which("mbuffer"):
                into = f"{dst_pool}/wanraw"
                seconds, _ = _timed(lambda: _raw(link, key, known, snapshot, into, master, buffered=True))
                _zfs("destroy", "-r", into)
                record("raw with mbuffer, warm master", stream, seconds)
            contenders = [("ssh", "ssh", {}), ("paramiko", "paramiko", {}), *COMPRESSION_CONTENDERS]
            for label, transport, fields in contenders:
                into = f"{dst_pool}/wan_{label.replace('+', '_')}"
                flow = _Flow()
                asked = replace(request(into, transport), **fields)  # type: ignore[arg-type]
                seconds, moved = _timed(lambda: _replicate(kept, asked, flow))
                record(f"zerfaux {label}, kept connections", int(moved), seconds)  # type: ignore[arg-type]
                record(f"zerfaux {label}, its stream alone", int(moved), flow.seconds())  # type: ignore[arg-type]
                if label == "ssh" and round_ == rounds:
                    idle, _ = _timed(lambda: _replicate(kept, request(into, transport)))
                    print(f"  WAN zerfaux with nothing changed: {idle:.2f} s (control commands at 40 ms a round trip)",
                          flush=True)
                _zfs("destroy", "-r", into)
            into = f"{dst_pool}/wan_cold"
            cold = ZFSReplicationReal(resolver, cipher=CIPHER)
            try:
                seconds, moved = _timed(lambda: _replicate(cold, request(into, "ssh")))
            finally:
                cold.close()
            record("zerfaux ssh, fresh handshake", int(moved), seconds)  # type: ignore[arg-type]
            _zfs("destroy", "-r", into)
            for window in (zfs_ssh.WINDOW_BYTES, SMALL_WINDOW):
                saved, zfs_ssh.WINDOW_BYTES = zfs_ssh.WINDOW_BYTES, window
                pull = ZFSReplicationReal(resolver, cipher=CIPHER)
                into = f"{dst_pool}/wan_pull"
                try:
                    seconds, moved = _timed(lambda: _replicate(pull, request(into, "paramiko", loop_end, wan_end)))
                finally:
                    pull.close()
                    zfs_ssh.WINDOW_BYTES = saved
                record(f"zerfaux paramiko pull, {window >> 10} KiB window", int(moved), seconds)  # type: ignore[arg-type]
                _zfs("destroy", "-r", into)
        wire_lines = []
        for data, dataset in (("text+zeros", compressible), ("random", source)):
            if dataset is None:
                continue
            took: dict[str, float] = {}
            for codec in WIRE_CODECS:
                into = f"{dst_pool}/wan_wire"
                asked = replace(request(into, "ssh"), source_dataset=dataset, wire_compression=codec)
                took[codec], moved = _timed(lambda: _replicate(kept, asked))
                print(f"  WAN wire {codec:<5} {data:<10} {took[codec]:6.2f} s, {int(moved) / MB:7.1f} MB on the wire",  # type: ignore[call-overload]
                      flush=True)
                _zfs("destroy", "-r", into)
            wire_lines.append(f"WAN WIRE {data}: " + ", ".join(
                f"{c} {took['off'] / took[c]:.2f}x" for c in WIRE_CODECS if c != "off") + " the speed of none")
        limit_line = _limit(kept, link, request(f"{dst_pool}/wan_limit", "ssh", target_id="bench-wan-limit"))
        _zfs("destroy", "-r", f"{dst_pool}/wan_limit")
    finally:
        kept.close()
        subprocess.run(["ssh", "-o", f"ControlPath={master}", "-O", "exit", "x"], capture_output=True,
                       check=False, timeout=30)
    lines = []
    for label in ("ssh", "paramiko", *(c[0] for c in COMPRESSION_CONTENDERS)):
        lines.append(f"WAN RATIO {label} {best[f'zerfaux {label}, kept connections'] / best['raw, warm master']:.3f} "
                     f"(kept connections vs raw over a warm master)")
    for label in ("ssh", "paramiko"):
        lines.append(f"WAN RATIO {label} stream {best[f'zerfaux {label}, its stream alone'] / best['raw, warm master']:.3f} "
                     "(the stream from its first byte to its last, without the job's control commands)")
    if "raw with mbuffer, warm master" in best:
        lines.append(f"WAN BUFFER mbuffer {MBUFFER} on each end: "
                     f"{best['raw with mbuffer, warm master'] / best['raw, warm master']:.3f}x the raw pipe's speed")
    lines.append(f"WAN RATIO ssh, fresh handshakes {best['zerfaux ssh, fresh handshake'] / best['raw, fresh handshake']:.3f}")
    big, small = (best[f"zerfaux paramiko pull, {w >> 10} KiB window"] for w in (zfs_ssh.WINDOW_BYTES, SMALL_WINDOW))
    lines.append(f"WAN paramiko window: {zfs_ssh.WINDOW_BYTES >> 20} MiB {big:.2f} MB/s, "
                 f"{SMALL_WINDOW >> 10} KiB {small:.2f} MB/s ({small / big:.2f}x)")
    lines += wire_lines
    lines.append(limit_line)
    return lines


def _limit(backend: ZFSReplicationReal, link: Wan, request: ReplicationRequest) -> str:
    """A 50 Mbit/s limit on the WAN target: the rates over a 30 s window after the first 3 s."""
    THROTTLES.set_limit(request.target_id, LIMIT_MBPS)
    samples: list[tuple[float, int, int]] = []
    lock = threading.Lock()

    def progress(p: ReplicationProgress) -> None:
        with lock:
            samples.append((time.monotonic(), p.bytes_transferred, link.tx_bytes()))

    try:
        _replicate(backend, request, progress)
    finally:
        THROTTLES.set_limit(request.target_id, None)
    start = samples[0][0] + 3.0
    window = [s for s in samples if start <= s[0] <= start + LIMIT_WINDOW]
    if len(window) < 2 or window[-1][0] - window[0][0] < LIMIT_WINDOW * 0.9:
        return f"WAN LIMIT unavailable: the stream lasted {samples[-1][0] - samples[0][0]:.1f} s (--wan-mib too small)"
    (t0, b0, x0), (t1, b1, x1) = window[0], window[-1]
    stream_rate, link_rate = (b1 - b0) / (t1 - t0), (x1 - x0) / (t1 - t0)
    limit = LIMIT_MBPS * MBIT
    return (f"WAN LIMIT {LIMIT_MBPS:g} Mbit/s over {t1 - t0:.1f} s: stream {stream_rate * 8 / 1e6:.2f} Mbit/s "
            f"({stream_rate / limit - 1:+.1%}), link {link_rate * 8 / 1e6:.2f} Mbit/s ({link_rate / limit - 1:+.1%}, "
            "with SSH framing; the veth counts one TCP/IP header per GSO segment)")
