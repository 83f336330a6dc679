"""Kept SSH sessions and masters are shared only between rows that trust and log in alike."""

from __future__ import annotations

import dataclasses
import time

from handlers.backends.zfs.connections import SessionPool, _identity
from handlers.backends.zfs.ssh import Peer
from handlers.backends.zfs.validate import parse_host_key
from handlers.types import SSHEndpoint

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHp8Sr0yVEb3JKEVyuLkR8s7kZ2Yd+gi/0pxM7ykfbIp"


def peer(host_key: str = KEY_A, secret: str = "-----KEY 1-----", port: int = 22, user: str = "root") -> Peer:
    endpoint = SSHEndpoint("dr.example", port, user, "dr-key", host_key)
    return Peer(endpoint, parse_host_key(host_key, "replication_targets.ssh_host_key"), secret, "replication_targets.ssh")


def test_the_same_row_shares_and_any_trust_or_login_change_does_not() -> None:
    base = _identity(peer(), "aes128-gcm@openssh.com")
    assert _identity(peer(), "aes128-gcm@openssh.com") == base
    assert _identity(peer(host_key=KEY_B), "aes128-gcm@openssh.com") != base  # the pinned key changed
    assert _identity(peer(secret="-----KEY 2-----"), "aes128-gcm@openssh.com") != base  # the private key rotated
    assert _identity(peer(port=2222), "aes128-gcm@openssh.com") != base
    assert _identity(peer(user="zfs"), "aes128-gcm@openssh.com") != base
    assert _identity(peer(), "chacha20-poly1305@openssh.com") != base
    # The secret itself never appears in the name (it becomes a socket path).
    assert "KEY 1" not in base and dataclasses.replace(peer()).key_text not in base


class _Client:
    """Stands for a paramiko client: open until closed."""

    def __init__(self) -> None:
        self.closed = False

    def get_transport(self) -> "_Client":
        return self

    def is_active(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def test_a_session_nobody_takes_back_is_closed_after_its_idle_time() -> None:
    pool = SessionPool(idle_seconds=0.4)
    kept, dead = _Client(), _Client()
    dead.close()
    pool.checkin(peer(), "aes128-gcm@openssh.com", kept)  # type: ignore[arg-type]
    pool.checkin(peer(), "aes128-gcm@openssh.com", dead)  # type: ignore[arg-type]  # not kept at all
    time.sleep(0.1)
    assert not kept.closed
    deadline = time.monotonic() + 5
    while not kept.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kept.closed, "an idle session outlived its idle time with no job coming"
