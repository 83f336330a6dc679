"""The replication suite's platforms: one fixture, three ways of reaching real ZFS.

* ``zfs-fuse-local``: zfs-fuse pools on this machine, the source local to the listener;
* ``zfs-fuse-ssh``: the same pools, the source reached over the run's sshd;
* ``openzfs``: OpenZFS 2.1 in the QEMU guest, source and target both reached over SSH.

A test asks for ``platform`` and gets all three; ``@pytest.mark.parametrize("platform", [...],
indirect=True)`` narrows it. The guest boots only when an ``openzfs`` case runs (session-scoped,
once). Assertions that depend on what a ZFS can do branch on ``Platform.has(feature)``.

The helpers work on any ``ZFSHost``: files are written and read with commands run on the host,
so the same test body serves a pool on this machine and one inside the guest.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest

from handlers.backends.zfs.bookmarks import LAST_RECEIVED
from handlers.types import SSHEndpoint
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost

MiB = 1024 * 1024

FUSE_LOCAL = "zfs-fuse-local"
FUSE_SSH = "zfs-fuse-ssh"
# Marked so that `-m "not openzfs"` leaves the guest alone.
OPENZFS = pytest.param("openzfs", marks=pytest.mark.openzfs, id="openzfs")
ALL = [FUSE_LOCAL, FUSE_SSH, OPENZFS]


@dataclass(frozen=True)
class Platform:
    name: str
    source: ZFSHost
    target: ZFSHost
    mode: str  # "local": the source is on the listener's machine; "ssh": reached over SSH

    def has(self, feature: str) -> bool:
        """Whether both hosts' ZFS can do ``feature`` (resume, hold, estimate)."""
        return feature in self.source.features and feature in self.target.features

    def size(self, fuse_mib: int, guest_mib: int) -> int:
        """Bytes of test data: the guest's disks are small and its emulated CPU moves ~15 MB/s."""
        return (fuse_mib if self.source.local else guest_mib) * MiB

    def endpoint(self, host: ZFSHost, secret: str) -> SSHEndpoint:
        return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, secret, host.host_key)


@pytest.fixture(params=ALL)
def platform(request: pytest.FixtureRequest) -> Platform:
    name = str(request.param)
    if name == "openzfs":
        source, target = request.getfixturevalue("openzfs_source"), request.getfixturevalue("openzfs_target")
        return Platform(name, source, target, "ssh")
    source, target = request.getfixturevalue("zfs_source"), request.getfixturevalue("zfs_target")
    return Platform(name, source, target, "local" if name == FUSE_LOCAL else "ssh")


def create_dataset(host: ZFSHost, dataset: str, tag: str) -> None:
    """A mounted dataset to write files into: under the run's directory here, the pool's default in the guest."""
    where = ["-o", f"mountpoint={mountpoint(tag)}"] if host.local else []
    host.run(["zfs", "create", *where, dataset])


def mount(host: ZFSHost, dataset: str, tag: str) -> None:
    """Mount a (replica) dataset on purpose, e.g. to modify it behind the replication's back."""
    if host.local:
        host.run(["zfs", "set", f"mountpoint={mountpoint(tag)}", dataset])
    else:
        host.run(["zfs", "set", f"mountpoint=/{dataset}", dataset])
    host.run(["zfs", "mount", dataset], check=False)  # zfs-fuse mounts on `set` already


def zfs_get(host: ZFSHost, prop: str, dataset: str) -> str:
    return host.run(["zfs", "get", "-Hp", "-o", "value", prop, dataset]).stdout.decode().strip()


def write(host: ZFSHost, dataset: str, name: str, size: int) -> None:
    """``size`` random bytes into file ``name`` of the mounted ``dataset``, flushed to the pool."""
    where = os.path.join(zfs_get(host, "mountpoint", dataset), name)
    if host.local:
        with open(where, "wb") as fh:
            fh.write(os.urandom(size))
        subprocess.run(["sync"], check=False)
        return
    host.run(["sh", "-c", f"head -c {size} /dev/urandom > {shlex.quote(where)} && sync"])


def guids(host: ZFSHost, dataset: str) -> dict[str, int]:
    out = host.run(["zfs", "get", "-Hp", "-d", "1", "-o", "name,value", "guid", dataset]).stdout.decode()
    return {n.split("@", 1)[1]: int(v) for n, v in (line.split("\t") for line in out.splitlines()) if "@" in n}


def checksums(host: ZFSHost, snapshot: str) -> dict[str, str]:
    """File digests of a snapshot, read through a temporary clone so the replica itself is never mounted."""
    tag = uuid.uuid4().hex[:8]
    clone = f"{host.pool}/verify{tag}"
    if host.local:
        where = mountpoint(f"verify-{tag}")
        host.run(["zfs", "clone", "-o", f"mountpoint={where}", snapshot, clone])
    else:
        host.run(["zfs", "clone", snapshot, clone])
        where = f"/{clone}"
    try:
        if host.local:
            result = {}
            for name in sorted(os.listdir(where)):
                if not os.path.isfile(os.path.join(where, name)):
                    continue  # a child dataset's mountpoint directory (as the guest's branch skips them)
                with open(os.path.join(where, name), "rb") as fh:
                    result[name] = hashlib.sha256(fh.read()).hexdigest()
            return result
        out = host.run(["sh", "-c", 'cd "$1" && for f in *; do [ -f "$f" ] && sha256sum -- "$f"; done; true',
                        "sh", where]).stdout.decode()
        return {line.split(None, 1)[1].strip(): line.split()[0] for line in out.splitlines()}
    finally:
        _destroy_clone(host, clone)


def _destroy_clone(host: ZFSHost, clone: str) -> None:
    """Gone for sure: a clone left behind would keep its snapshot from ever being pruned."""
    for _ in range(20):
        done = host.run(["zfs", "destroy", "-f", clone], check=False)
        if done.returncode == 0 or b"does not exist" in done.stderr:
            return
        time.sleep(0.25)  # zfs-fuse: the mount may still be busy for a moment after the reads
    raise AssertionError(f"cannot destroy the verification clone {clone}: {done.stderr.decode(errors='replace')}")


def held(host: ZFSHost, snapshot: str, tag_prefix: str = "zerfaux_") -> bool:
    """Whether ``snapshot`` carries a hold by an attempt of Zerfaux.

    OpenZFS lists tags (``zfs holds``); zfs-fuse holds and counts (``userrefs``) but its
    ``zfs holds`` needs a helper Debian does not ship, so there any hold counts. The lasting
    ``zerfaux_last_received`` hold (OpenZFS only: zfs/bookmarks.py) is not an attempt's.
    """
    if "hold" not in host.features:
        return False
    if host.name == "openzfs":
        out = host.run(["zfs", "holds", "-H", snapshot]).stdout.decode()
        return any(line.split("\t")[1].startswith(tag_prefix) and line.split("\t")[1] != LAST_RECEIVED
                   for line in out.splitlines() if "\t" in line)
    return zfs_get(host, "userrefs", snapshot) not in ("0", "-", "")


def resume_token(host: ZFSHost, dataset: str) -> str | None:
    if "resume" not in host.features:
        return None
    value = host.run(["zfs", "get", "-H", "-o", "value", "receive_resume_token", dataset], check=False)
    token = value.stdout.decode().strip()
    return None if value.returncode != 0 or token in ("", "-") else token


def matrix(transports: list[str], on_openzfs: list[str]) -> list[object]:
    """(platform, transport) cases: every transport on zfs-fuse, ``on_openzfs`` in the guest.

    Each case in the guest costs seconds of emulated CPU and SSH handshakes, so a transport
    runs there only where OpenZFS takes a path zfs-fuse cannot (resume, holds, syncoid's listing).
    """
    cases: list[object] = [pytest.param(p, t, id=f"{p}-{t}") for p in (FUSE_LOCAL, FUSE_SSH) for t in transports]
    cases += [pytest.param("openzfs", t, marks=pytest.mark.openzfs, id=f"openzfs-{t}") for t in on_openzfs]
    return cases
