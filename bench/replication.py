"""Replication throughput: Zerfaux's transports against a raw ``zfs send | ssh | zfs receive`` and syncoid.

Run as root on a machine with zfs-fuse and openssh-server (Debian):
    .venv/bin/python -m bench.replication [--size-mib 1024] [--rounds 3]

1 GiB of incompressible data on a zfs-fuse pool made for the run, an sshd on a loopback port made
for the run, the same cipher everywhere. Each full transfer runs ``--rounds`` times (best kept, so
zfs-fuse's cache treats all alike); then a 10 MiB change is replicated incrementally. Everything is
removed afterwards. Every transfer is bounded by a watchdog.

Like with like: the raw pipe gets the same 32 MiB pipe buffer Zerfaux uses, and each side is
measured twice, with a fresh SSH handshake (the raw pipe's own connection; a new backend for
Zerfaux, as after a listener start) and over an OpenSSH master already up (``ControlMaster``
started before the round; Zerfaux's kept master). ``RATIO`` is the fresh pair; the warm pair is
printed on the same line. Zerfaux's seconds include what a job does besides its stream
(probes, snapshot, holds, verify); what each host's ZFS can do is cached per process, so a
fresh backend does not probe again.

Then the OpenZFS section (skip with ``--no-openzfs``): the OpenZFS 2.1 QEMU guest of the test suite
(docs/openzfs-guest.md) with source and target pools both inside it, so that both ends are reached
over SSH exactly as Zerfaux reaches a remote storage host and a DR host: ``ssh guest zfs send |
ssh guest zfs receive -u`` from this machine against Zerfaux's ``ssh`` transport for the same
snapshot (``--openzfs-mib``, tens of MiB: the guest's disks are small). Software emulation makes the
absolute figures meaningless; only the ratio counts. It is printed as ``OPENZFS RATIO`` (fresh
handshakes on both sides; the warm pair beside it) before the final line, which stays the zfs-fuse
``RATIO``.

Then the WAN section (skip with ``--no-wan``; bench/wan.py): the DR sshd in a network namespace
behind 200 Mbit/s, 0.1 % loss and 40 ms of round trip, raw pipe against Zerfaux's ``ssh`` and
``paramiko`` transports on ``--wan-mib`` of data (``WAN RATIO`` lines), the paramiko window, and a
50 Mbit/s bandwidth limit measured over 30 s (``WAN LIMIT``). Printed above the final ``RATIO``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from bench.wan import wan_section
from bench.wire import text_and_zeros
from handlers.backends.zfs.pipe import grow_pipe  # the raw pipe gets Zerfaux's buffer too
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.replication import ReplicationRequest
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint
from tests.support.openzfs import Guest, GuestError, OpenZFSHost, build_guest
from tests.support.netns import wan
from tests.support.zfs import Sshd, pool, sshd_running, zfs_fuse_running

CIPHER = "aes128-gcm@openssh.com"
WATCHDOG_SECONDS = 600.0
MB = 1_000_000


def zfs(*argv: str) -> str:
    done = subprocess.run(["zfs", *argv], capture_output=True, check=False, timeout=WATCHDOG_SECONDS)
    if done.returncode != 0:
        raise RuntimeError(f"zfs {shlex.join(argv)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def write_random(path: str, size: int) -> None:
    chunk = 4 << 20
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n
    subprocess.run(["sync"], check=False)


def ssh_argv(sshd: Sshd, key: str, known: str, remote: list[str], master: str | None = None) -> list[str]:
    """``master``: a ControlPath whose master is already up (the warm case); None: a fresh handshake."""
    shared = ["-o", "ControlMaster=auto", "-o", f"ControlPath={master}", "-o", "ControlPersist=120"] if master \
        else ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return ["ssh", "-F", "/dev/null", "-T", "-c", CIPHER, "-i", key, "-o", "IdentitiesOnly=yes", *shared,
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-p", str(sshd.port),
            "root@127.0.0.1", shlex.join(remote)]


def timed(fn: Callable[[], None]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def raw_pipe(snapshot: str, target: str, sshd: Sshd, key: str, known: str, master: str | None = None) -> None:
    send = subprocess.Popen(["zfs", "send", snapshot], stdout=subprocess.PIPE)
    assert send.stdout is not None
    grow_pipe(send.stdout.fileno())
    recv = subprocess.Popen(ssh_argv(sshd, key, known, ["zfs", "receive", "-u", target], master), stdin=send.stdout)
    send.stdout.close()
    if recv.wait(WATCHDOG_SECONDS) != 0 or send.wait(WATCHDOG_SECONDS) != 0:
        raise RuntimeError("raw zfs send | ssh | zfs receive failed")


def plain_syncoid(source: str, target: str, sshd: Sshd, key: str, known: str) -> None:
    argv = ["syncoid", "--no-sync-snap", "--no-rollback", "--no-privilege-elevation", "--compress=none",
            "--recvoptions=u", f"--sshkey={key}", f"--sshport={sshd.port}", f"--sshcipher={CIPHER}",
            "--sshoption=StrictHostKeyChecking=yes", f"--sshoption=UserKnownHostsFile={known}",
            "--quiet", source, f"root@127.0.0.1:{target}"]
    subprocess.run(argv, check=True, capture_output=True, timeout=WATCHDOG_SECONDS)


def replicate_bounded(backend: ZFSReplicationReal, request: ReplicationRequest) -> int:
    """One replication, cancelled by a watchdog if it outlives WATCHDOG_SECONDS; bytes sent."""
    cancel = threading.Event()
    watchdog = threading.Timer(WATCHDOG_SECONDS, cancel.set)
    watchdog.start()
    try:
        return backend.replicate(request, lambda p: None, cancel).bytes_transferred
    finally:
        watchdog.cancel()


def zerfaux(backend: ZFSReplicationReal, sshd: Sshd, source: str, target: str, transport: str) -> int:
    endpoint = SSHEndpoint("127.0.0.1", sshd.port, "root", "bench", sshd.host_key)
    return replicate_bounded(backend, ReplicationRequest(str(uuid.uuid4()), source, target, transport, endpoint, None, None, None))


def stream_size(snapshot: str) -> int:
    """Reads the whole stream once: its size, and zfs-fuse's cache warmed for every contender."""
    send = subprocess.Popen(["zfs", "send", snapshot], stdout=subprocess.PIPE)
    assert send.stdout is not None
    total = 0
    while chunk := send.stdout.read(1 << 20):
        total += len(chunk)
    send.stdout.close()
    send.wait()
    return total


def guest_endpoint(host: OpenZFSHost) -> SSHEndpoint:
    return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, "guest", host.host_key)


def guest_raw_pipe(source: OpenZFSHost, target: OpenZFSHost, snapshot: str, dataset: str, warm: bool) -> None:
    """``ssh guest zfs send | ssh guest zfs receive -u``: the stream crosses this machine, as Zerfaux's does."""
    def ssh(host: OpenZFSHost, remote: list[str]) -> list[str]:
        # Fresh: connections of its own. Warm: the fixture's multiplexed master, already up. ssh keeps
        # the first value of an option, so the override comes first.
        fresh = [] if warm else ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        return ["ssh", *fresh, *host.ssh_options, "-c", CIPHER,
                "-p", str(host.ssh_port), "root@127.0.0.1", shlex.join(remote)]

    send = subprocess.Popen(ssh(source, ["zfs", "send", snapshot]), stdout=subprocess.PIPE)
    assert send.stdout is not None
    grow_pipe(send.stdout.fileno())
    recv = subprocess.Popen(ssh(target, ["zfs", "receive", "-u", dataset]), stdin=send.stdout)
    send.stdout.close()
    if recv.wait(WATCHDOG_SECONDS) != 0 or send.wait(WATCHDOG_SECONDS) != 0:
        raise RuntimeError("raw ssh zfs send | ssh zfs receive in the guest failed")


def openzfs_section(size_mib: int, rounds: int) -> tuple[float, float]:
    """Best raw and best Zerfaux (ssh transport) throughput in the guest; returns Zerfaux / raw (fresh, warm)."""
    work = tempfile.mkdtemp(prefix="zerfaux-bench-openzfs-")
    guest = Guest(build_guest(), Path(work))
    backend: ZFSReplicationReal | None = None
    try:
        started = time.monotonic()
        guest.start()
        print(f"OpenZFS guest up in {time.monotonic() - started:.0f} s", flush=True)
        source, target = guest.host("src"), guest.host("dst")
        secrets_ = SecretResolver({"ZERFAUX_SECRET_GUEST": source.private_key})
        backend = live = ZFSReplicationReal(secrets_, cipher=CIPHER)
        dataset = f"{source.pool}/vm"
        print(f"writing {size_mib} MiB of random data in the guest ...", flush=True)
        make = (f"zfs create {dataset} && head -c {size_mib}M /dev/urandom > /{dataset}/disk-flat.vmdk"
                f" && sync && zfs snapshot {dataset}@bench")
        source.run(["sh", "-c", make])
        counted = source.run(["sh", "-c", f"zfs send {dataset}@bench | wc -c"])  # never > /dev/null on OpenZFS 2.1
        stream = int(counted.stdout.decode())
        print(f"full stream: {stream / MB:.1f} MB", flush=True)

        def zerfaux_guest(with_backend: ZFSReplicationReal, into: str) -> int:
            return replicate_bounded(with_backend, ReplicationRequest(
                str(uuid.uuid4()), dataset, into, "ssh", guest_endpoint(target), guest_endpoint(source), None, None))

        # Warm the capability cache, as a long-lived listener has it, with an untimed tiny replication.
        source.run(["zfs", "create", f"{source.pool}/warm"])
        zerfaux_guest(live, f"{target.pool}/warm")
        best: dict[str, float] = {}

        def record(label: str, nbytes: int, seconds: float, round_: int) -> None:
            best[label] = max(best.get(label, 0.0), nbytes / MB / seconds)
            print(f"  round {round_} {label:<28} {nbytes / MB / seconds:8.2f} MB/s ({seconds:.2f} s)", flush=True)

        for round_ in range(1, rounds + 1):
            for warm in (False, True):
                into = f"{target.pool}/raw"
                seconds = timed(lambda: guest_raw_pipe(source, target, f"{dataset}@bench", into, warm))
                target.run(["zfs", "destroy", "-r", into])
                record("raw, " + ("warm master" if warm else "fresh handshake"), stream, seconds, round_)
                into = f"{target.pool}/zerfaux"
                moved = [0]
                fresh = None if warm else ZFSReplicationReal(secrets_, cipher=CIPHER)
                try:
                    seconds = timed(lambda: moved.__setitem__(0, zerfaux_guest(fresh or live, into)))
                finally:
                    if fresh is not None:
                        fresh.close()
                record("zerfaux ssh, " + ("warm master" if warm else "fresh handshake"), moved[0], seconds, round_)
                if round_ == rounds and warm:  # what a replication costs besides its stream
                    fixed = timed(lambda: moved.__setitem__(0, zerfaux_guest(live, into)))
                    print(f"  zerfaux with nothing changed: {fixed:.2f} s (connections, probes, snapshot, holds, verify)",
                          flush=True)
                target.run(["zfs", "destroy", "-r", into])
        return (best["zerfaux ssh, fresh handshake"] / best["raw, fresh handshake"],
                best["zerfaux ssh, warm master"] / best["raw, warm master"])
    finally:
        if backend is not None:
            backend.close()
        guest.stop()
        subprocess.run(["rm", "-rf", work], check=False)


def wan_figures(args: argparse.Namespace, work: str, src_pool: str, dst_pool: str, sshd: Sshd) -> list[str]:
    """The namespace WAN (bench/wan.py) on its own dataset; its lines go above the final RATIO."""
    source = f"{src_pool}/wanvm"
    zfs("create", "-o", f"mountpoint={work}/wansrc", source)
    print(f"WAN: writing {args.wan_mib} MiB of random data ...", flush=True)
    write_random(f"{work}/wansrc/disk-flat.vmdk", args.wan_mib << 20)
    zfs("snapshot", f"{source}@bench")
    stream = stream_size(f"{source}@bench")
    image = f"{src_pool}/wanimage"  # compressible: what a guest's disk mostly holds (bench/wire.py)
    zfs("create", "-o", f"mountpoint={work}/wanimage", image)
    text_and_zeros(f"{work}/wanimage/disk-flat.vmdk", args.wan_mib // 2)
    zfs("snapshot", f"{image}@bench")
    try:
        with wan(sshd, work) as link:
            return wan_section(link, sshd, work, source, dst_pool, stream, args.wan_rounds, image)
    except (Exception, pytest.skip.Exception) as exc:  # netns.wan reports a missing piece as a test skip
        return [f"WAN RATIO unavailable: {exc}"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--change-mib", type=int, default=10)
    parser.add_argument("--openzfs-mib", type=int, default=32)
    parser.add_argument("--openzfs-rounds", type=int, default=2)
    parser.add_argument("--no-openzfs", action="store_true", help="skip the OpenZFS guest section")
    parser.add_argument("--wan-mib", type=int, default=224, help="data for the WAN section (bench/wan.py)")
    parser.add_argument("--wan-rounds", type=int, default=1)
    parser.add_argument("--no-wan", action="store_true", help="skip the WAN section")
    args = parser.parse_args()
    size = args.size_mib << 20
    suffix = secrets.token_hex(3)
    with ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="zerfaux-bench-")
        stack.callback(subprocess.run, ["rm", "-rf", work], check=False)
        stack.enter_context(zfs_fuse_running(work))
        src_pool = stack.enter_context(pool(f"zxbs{suffix}", work, size * 2 + (512 << 20)))
        dst_pool = stack.enter_context(pool(f"zxbd{suffix}", work, size * 3 + (512 << 20)))
        sshd = stack.enter_context(sshd_running(work))
        key = os.path.join(sshd.directory, "user_ed25519")
        known = os.path.join(work, "known_hosts")
        with open(known, "w") as fh:
            fh.write(sshd.host_key + "\n")
        master = os.path.join(work, "raw-master.sock")  # the raw pipe's warm case
        subprocess.run(ssh_argv(sshd, key, known, ["true"], master), check=True, timeout=60)
        stack.callback(subprocess.run, ["ssh", "-o", f"ControlPath={master}", "-O", "exit", "x"],
                       capture_output=True, check=False, timeout=30)
        backend = ZFSReplicationReal(SecretResolver({"ZERFAUX_SECRET_BENCH": sshd.private_key}), cipher=CIPHER)
        stack.callback(backend.close)

        source = f"{src_pool}/vm"
        zfs("create", "-o", f"mountpoint={work}/src", source)
        print(f"writing {args.size_mib} MiB of random data ...", flush=True)
        write_random(f"{work}/src/disk-flat.vmdk", size)
        zfs("snapshot", f"{source}@bench")
        stream = stream_size(f"{source}@bench")
        print(f"full stream: {stream / MB:.1f} MB", flush=True)

        # A listener is long-lived: what each host's ZFS can do is detected once and cached. Warm that
        # cache (and zfs-fuse's) with a tiny untimed replication so every contender starts alike.
        zfs("create", "-o", "mountpoint=none", f"{src_pool}/warm")
        zerfaux(backend, sshd, f"{src_pool}/warm", f"{dst_pool}/warm", "ssh")
        zfs("destroy", "-r", f"{dst_pool}/warm")

        best: dict[str, float] = {}
        rates: dict[str, list[float]] = {}

        def record(label: str, nbytes: int, seconds: float) -> None:
            rate = nbytes / MB / seconds
            print(f"  {label:<32} {rate:8.1f} MB/s  ({nbytes / MB:.1f} MB in {seconds:.2f} s)", flush=True)
            best[label] = max(best.get(label, 0.0), rate)
            rates.setdefault(label, []).append(rate)

        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}", flush=True)
            target = f"{dst_pool}/raw"
            record("raw, fresh handshake", stream, timed(lambda: raw_pipe(f"{source}@bench", target, sshd, key, known)))
            zfs("destroy", "-r", target)
            record("raw, warm master", stream,
                   timed(lambda: raw_pipe(f"{source}@bench", target, sshd, key, known, master)))
            zfs("destroy", "-r", target)
            for transport in ("ssh", "paramiko", "syncoid"):
                target = f"{dst_pool}/zerfaux_{transport}"
                moved = [0]
                seconds = timed(lambda: moved.__setitem__(0, zerfaux(backend, sshd, source, target, transport)))
                # The syncoid transport counts through pv; fall back to the stream size if it could not.
                record(f"zerfaux {transport}" + (", warm master" if transport == "ssh" else ""), moved[0] or stream, seconds)
                zfs("destroy", "-r", target)
            # A listener keeps its SSH sessions and masters between jobs (the rows above); the first
            # job to a host after a start shakes hands like the raw pipe does. That one, too:
            target = f"{dst_pool}/zerfaux_cold"
            cold = ZFSReplicationReal(SecretResolver({"ZERFAUX_SECRET_BENCH": sshd.private_key}), cipher=CIPHER)
            try:
                moved = [0]
                seconds = timed(lambda: moved.__setitem__(0, zerfaux(cold, sshd, source, target, "ssh")))
            finally:
                cold.close()
            record("zerfaux ssh, fresh handshake", moved[0], seconds)
            zfs("destroy", "-r", target)
            target = f"{dst_pool}/syncoid"
            record("syncoid", stream, timed(lambda: plain_syncoid(source, target, sshd, key, known)))
            zfs("destroy", "-r", target)

        print(f"incremental: {args.change_mib} MiB changed", flush=True)
        target = f"{dst_pool}/incr"
        zerfaux(backend, sshd, source, target, "ssh")
        write_random(f"{work}/src/change.bin", args.change_mib << 20)
        ratios = []
        for transport in ("ssh", "paramiko", "syncoid"):
            moved = [0]
            seconds = timed(lambda: moved.__setitem__(0, zerfaux(backend, sshd, source, target, transport)))
            changed = args.change_mib << 20
            ratios.append(moved[0] / changed)
            print(f"  zerfaux {transport:<9} incremental {moved[0] / MB:7.2f} MB sent for {changed / MB:.2f} MB "
                  f"changed ({moved[0] / changed:.3f}x) in {seconds:.2f} s", flush=True)
            write_random(f"{work}/src/change.bin", changed)
        zfs("destroy", "-r", target)  # the source goes with its pool

        raw = best["raw, fresh handshake"]
        raw_median = statistics.median(rates["raw, fresh handshake"])
        print("best of rounds (MB/s), and the median of rounds (x raw: against the raw pipe's fresh handshake):")
        for label, rate in best.items():
            median = statistics.median(rates[label])
            print(f"  {label:<32} {rate:8.1f}  ({rate / raw:.2f}x raw)   median {median:8.1f}  ({median / raw_median:.2f}x raw)")
        print(f"incremental sends: at most {max(ratios):.3f}x the changed bytes", flush=True)
        wan_lines = [] if args.no_wan else wan_figures(args, work, src_pool, dst_pool, sshd)
    # The zfs-fuse pools and sshd are gone before the guest boots: the guest wants both cores.
    if not args.no_openzfs:
        print(f"OpenZFS 2.1 in a QEMU guest (software emulation), {args.openzfs_mib} MiB", flush=True)
        try:
            fresh, warm = openzfs_section(args.openzfs_mib, args.openzfs_rounds)
            print(f"OPENZFS RATIO {fresh:.3f} replication throughput vs raw ssh zfs send | ssh zfs receive "
                  f"(both pools in the guest), both with fresh SSH handshakes; both over a warm master: {warm:.3f}")
        except (GuestError, OSError, subprocess.SubprocessError, RuntimeError) as exc:
            print(f"OPENZFS RATIO unavailable: {exc}")
    for line in wan_lines:
        print(line)
    fresh = best["zerfaux ssh, fresh handshake"] / raw
    warm = best["zerfaux ssh, warm master"] / best["raw, warm master"]
    print(f"RATIO {fresh:.3f} replication throughput vs raw zfs send | ssh | zfs receive, both with a fresh SSH "
          f"handshake and 32 MiB pipes; both over a warm OpenSSH master: {warm:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
