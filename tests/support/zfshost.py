"""The shape every ZFS test host takes, whatever runs it (zfs-fuse here, OpenZFS in a QEMU guest).

Fixtures in tests/support/zfs.py and tests/support/openzfs.py hand these out, so the replication
suite can be parametrized over platforms without knowing which one it got.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ZFSHost:
    name: str  # "zfs-fuse" | "openzfs"
    ssh_host: str  # loopback address sshd listens on
    ssh_port: int
    ssh_user: str
    private_key: str  # OpenSSH private key text: the value of an ssh_key_secret
    host_key: str  # known_hosts line for ssh_host_key
    pool: str  # a pool made for this run; datasets for tests go under it
    local: bool  # True when `zfs` also runs on this machine (zfs-fuse): a source may be local
    features: frozenset[str] = field(default_factory=frozenset)  # resume, hold, estimate

    def run(self, argv: Sequence[str], input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a command on the host: locally when ``local``, else through ssh with the run's key."""
        raise NotImplementedError  # each fixture module supplies a subclass
