"""Replication throughput: Zerfaux's transports against a raw ``zfs send | ssh | zfs receive`` and syncoid.

Run as root on a machine with zfs-fuse and openssh-server (Debian):
    .venv/bin/python -m bench.replication [--size-mib 1024] [--rounds 3]

1 GiB of incompressible data on a zfs-fuse pool made for the run, an sshd on a loopback port made
for the run, the same cipher everywhere. Each full transfer runs ``--rounds`` times (best kept, so
zfs-fuse's cache treats all alike); then a 10 MiB change is replicated incrementally. Everything is
removed afterwards. Every transfer is bounded by a watchdog.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack

from handlers.backends.zfs_real import ZFSReplicationReal
from handlers.replication import ReplicationRequest
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint
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


def ssh_argv(sshd: Sshd, key: str, known: str, remote: list[str]) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-T", "-c", CIPHER, "-i", key, "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-p", str(sshd.port),
            "root@127.0.0.1", shlex.join(remote)]


def timed(fn: Callable[[], None]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def raw_pipe(snapshot: str, target: str, sshd: Sshd, key: str, known: str) -> None:
    send = subprocess.Popen(["zfs", "send", snapshot], stdout=subprocess.PIPE)
    recv = subprocess.Popen(ssh_argv(sshd, key, known, ["zfs", "receive", "-u", target]), stdin=send.stdout)
    assert send.stdout is not None
    send.stdout.close()
    if recv.wait(WATCHDOG_SECONDS) != 0 or send.wait(WATCHDOG_SECONDS) != 0:
        raise RuntimeError("raw zfs send | ssh | zfs receive failed")


def plain_syncoid(source: str, target: str, sshd: Sshd, key: str, known: str) -> None:
    argv = ["syncoid", "--no-sync-snap", "--no-rollback", "--no-privilege-elevation", "--compress=none",
            "--recvoptions=u", f"--sshkey={key}", f"--sshport={sshd.port}", f"--sshcipher={CIPHER}",
            "--sshoption=StrictHostKeyChecking=yes", f"--sshoption=UserKnownHostsFile={known}",
            "--quiet", source, f"root@127.0.0.1:{target}"]
    subprocess.run(argv, check=True, capture_output=True, timeout=WATCHDOG_SECONDS)


def zerfaux(backend: ZFSReplicationReal, sshd: Sshd, source: str, target: str, transport: str) -> int:
    endpoint = SSHEndpoint("127.0.0.1", sshd.port, "root", "bench", sshd.host_key)
    request = ReplicationRequest(str(uuid.uuid4()), source, target, transport, endpoint, None, None, None)
    cancel = threading.Event()
    watchdog = threading.Timer(WATCHDOG_SECONDS, cancel.set)
    watchdog.start()
    try:
        return backend.replicate(request, lambda p: None, cancel).bytes_transferred
    finally:
        watchdog.cancel()


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--change-mib", type=int, default=10)
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
        backend = ZFSReplicationReal(SecretResolver({"ZERFAUX_SECRET_BENCH": sshd.private_key}), cipher=CIPHER)

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

        def record(label: str, nbytes: int, seconds: float) -> None:
            rate = nbytes / MB / seconds
            print(f"  {label:<28} {rate:8.1f} MB/s  ({nbytes / MB:.1f} MB in {seconds:.2f} s)", flush=True)
            best[label] = max(best.get(label, 0.0), rate)

        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}", flush=True)
            target = f"{dst_pool}/raw"
            record("raw zfs send | ssh", stream, timed(lambda: raw_pipe(f"{source}@bench", target, sshd, key, known)))
            zfs("destroy", "-r", target)
            for transport in ("ssh", "paramiko", "syncoid"):
                target = f"{dst_pool}/zerfaux_{transport}"
                moved = [0]
                seconds = timed(lambda: moved.__setitem__(0, zerfaux(backend, sshd, source, target, transport)))
                # The syncoid transport counts through pv; fall back to the stream size if it could not.
                record(f"zerfaux {transport}", moved[0] or stream, seconds)
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

        raw = best["raw zfs send | ssh"]
        print("best of rounds (MB/s):")
        for label, rate in best.items():
            print(f"  {label:<28} {rate:8.1f}  ({rate / raw:.2f}x raw)")
        print(f"incremental sends: at most {max(ratios):.3f}x the changed bytes")
        print(f"RATIO {best['zerfaux ssh'] / raw:.3f} replication throughput vs raw zfs send | ssh | zfs receive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
