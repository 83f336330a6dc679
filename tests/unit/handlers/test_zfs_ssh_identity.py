"""Kept SSH sessions and masters are shared only between rows that trust and log in alike."""

from __future__ import annotations

import dataclasses

from handlers.backends.zfs_ssh import Peer, _identity
from handlers.backends.zfs_validate import parse_host_key
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
