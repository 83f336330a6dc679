"""SSH plumbing for ZFS replication: pinned host keys, key files, paramiko sessions, fault words.

Trust is never on first use: the only host key accepted is the row's ``ssh_host_key``, both for
paramiko (``RejectPolicy`` with that key alone in its host-key table) and for the OpenSSH client
(``StrictHostKeyChecking=yes`` against a known_hosts file made for the run). Private keys live in
0600 files inside a 0700 directory that is removed when the replication ends.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paramiko

from handlers.backends.zfs.validate import PinnedKey
from handlers.errors import PermanentError, TransientError
from handlers.types import SSHEndpoint

log = logging.getLogger(__name__)

# A large channel window keeps a fast stream from stalling on window updates every 2 MiB.
WINDOW_BYTES = 64 * 1024 * 1024
CONNECT_TIMEOUT = 15.0


def fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` form, what ``ssh-keygen -lf`` prints and operators compare."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def host_key_algorithms(key_type: str) -> str:
    # An RSA key is offered under the SHA-2 signature names by current servers.
    if key_type == "ssh-rsa":
        return "rsa-sha2-512,rsa-sha2-256,ssh-rsa"
    return key_type


def load_private_key(text: str, field: str) -> paramiko.PKey:
    classes: list[Any] = [paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey]
    for cls in classes:
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError, IndexError, TypeError):
            continue
    raise PermanentError(
        f"the secret named by {field} is not an unencrypted OpenSSH private key (ed25519, ecdsa or rsa)"
    )


@dataclass(frozen=True)
class Peer:
    """One SSH host we talk to, fully resolved: where, as whom, which key, which host key."""

    endpoint: SSHEndpoint
    pinned: PinnedKey
    key_text: str
    field: str  # column prefix for messages: replication_targets.ssh | protection_groups.source_ssh

    @property
    def label(self) -> str:
        return f"{self.endpoint.user}@{self.endpoint.host}:{self.endpoint.port}"


KEY_DIR_PREFIX = "zerfaux-ssh-"


def sweep_stale_key_dirs(base: str | None = None) -> int:
    """Remove key directories of processes that no longer exist (a listener killed mid-send)."""
    base = base or tempfile.gettempdir()
    removed = 0
    for name in os.listdir(base):
        if not name.startswith(KEY_DIR_PREFIX):
            continue
        pid = name[len(KEY_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or reused: then we leave it, harmlessly)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d key directories left by processes that died", removed)
    return removed


class KeyFiles:
    """Key and known_hosts files for the OpenSSH client and syncoid; removed by ``close``."""

    def __init__(self) -> None:
        # mkdtemp makes it 0700; the pid in the name lets a later process remove what a killed one left.
        self.dir = tempfile.mkdtemp(prefix=f"{KEY_DIR_PREFIX}{os.getpid()}-")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self._keys: dict[str, str] = {}
        self._lines: list[str] = []

    def key_for(self, peer: Peer) -> str:
        path = self._keys.get(peer.key_text)
        if path is None:
            path = os.path.join(self.dir, f"id_{len(self._keys)}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(peer.key_text if peer.key_text.endswith("\n") else peer.key_text + "\n")
            self._keys[peer.key_text] = path
        line = f"{known_hosts_name(peer.endpoint.host, peer.endpoint.port)} {peer.pinned.key_type} {peer.pinned.b64}"
        if line not in self._lines:
            self._lines.append(line)
            with open(self.known_hosts, "w") as fh:
                fh.write("\n".join(self._lines) + "\n")
        return path

    def ssh_options(self, peer: Peer, cipher: str) -> list[str]:
        """Options shared by our own ssh command lines and syncoid's (which takes only ``-o``)."""
        return [
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            f"UserKnownHostsFile={self.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "CheckHostIP=no",
            "UpdateHostKeys=no",
            "IdentitiesOnly=yes",
            f"IdentityFile={self.key_for(peer)}",
            f"HostKeyAlgorithms={host_key_algorithms(peer.pinned.key_type)}",
            f"ConnectTimeout={int(CONNECT_TIMEOUT)}",
            "ServerAliveInterval=10",
            "ServerAliveCountMax=3",
            "LogLevel=ERROR",
            f"Ciphers={cipher}",
        ]

    def ssh_argv(self, peer: Peer, cipher: str, remote: str, extra: Sequence[str] = ()) -> list[str]:
        """``ssh ... host -- remote``; ``remote`` is already shlex-quoted by the caller."""
        argv = ["ssh", "-F", "/dev/null", "-T", "-x"]
        for option in [*self.ssh_options(peer, cipher), *extra]:
            argv += ["-o", option]
        argv += ["-p", str(peer.endpoint.port), "-l", peer.endpoint.user, peer.endpoint.host, "--", remote]
        return argv

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _PinnedReject(paramiko.RejectPolicy):  # type: ignore[misc]  # paramiko's policy classes are untyped
    """RejectPolicy that remembers what the server offered, so the error can show its fingerprint."""

    def __init__(self) -> None:
        self.offered: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.offered = key
        super().missing_host_key(client, hostname, key)


def _mismatch(peer: Peer, offered: paramiko.PKey) -> PermanentError:
    e = peer.endpoint
    return PermanentError(
        f"host key mismatch for {peer.field}_host {e.host}:{e.port}: expected {peer.pinned.key_type} "
        f"{fingerprint(peer.pinned.blob)} (from {peer.field}_host_key), the host offered "
        f"{offered.get_name()} {fingerprint(offered.asbytes())}. If the host was reinstalled, check the "
        f"new key out of band and update {peer.field}_host_key; otherwise the connection may be intercepted"
    )


def connect(peer: Peer, cipher: str) -> paramiko.SSHClient:
    """A paramiko session to ``peer`` that accepts only the pinned host key."""
    e = peer.endpoint
    pkey = load_private_key(peer.key_text, f"{peer.field}_key_secret")
    try:
        pinned = paramiko.PKey.from_type_string(peer.pinned.key_type, peer.pinned.blob)
    except Exception as exc:
        raise PermanentError(f"{peer.field}_host_key: key type {peer.pinned.key_type} is not supported") from exc
    client = paramiko.SSHClient()
    policy = _PinnedReject()
    client.set_missing_host_key_policy(policy)
    client.get_host_keys().add(known_hosts_name(e.host, e.port), peer.pinned.key_type, pinned)

    def transport_factory(sock: socket.socket, **kwargs: Any) -> paramiko.Transport:
        # Without TCP_NODELAY each small SSH packet waits on the peer's delayed ACK (about 40 ms on
        # Linux): a handshake took 120 ms and every control command 50 ms; with it, 22 ms and 3 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = paramiko.Transport(sock, default_window_size=WINDOW_BYTES, **kwargs)
        opts = t.get_security_options()
        if cipher in opts.ciphers:
            opts.ciphers = (cipher,) + tuple(c for c in opts.ciphers if c != cipher)
        return t

    try:
        client.connect(
            e.host, port=e.port, username=e.user, pkey=pkey, allow_agent=False, look_for_keys=False,
            timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
            transport_factory=transport_factory,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise _mismatch(peer, exc.key) from None
    except paramiko.AuthenticationException:
        client.close()
        raise PermanentError(
            f"SSH authentication as {e.user} to {e.host}:{e.port} failed: add the public half of the key "
            f"named by {peer.field}_key_secret to ~{e.user}/.ssh/authorized_keys on that host"
        ) from None
    except paramiko.SSHException as exc:
        client.close()
        if policy.offered is not None:
            raise _mismatch(peer, policy.offered) from None
        raise TransientError(f"SSH to {e.host}:{e.port} failed: {exc}") from None
    except (OSError, EOFError) as exc:  # refused, unreachable, timed out, reset
        client.close()
        raise TransientError(f"cannot reach {peer.field}_host {e.host}:{e.port}: {exc}") from None
    log.debug("paramiko session to %s open", peer.label)
    return client


def classify_ssh_failure(stderr: str, peer: Peer) -> PermanentError | TransientError | None:
    """Words for an OpenSSH client that exited 255; None when stderr is not an SSH-level failure."""
    e = peer.endpoint
    if "Host key verification failed" in stderr or "HOST IDENTIFICATION HAS CHANGED" in stderr:
        return PermanentError(
            f"host key verification failed for {peer.field}_host {e.host}:{e.port}: the host did not offer "
            f"the key pinned in {peer.field}_host_key ({fingerprint(peer.pinned.blob)})"
        )
    if "Permission denied" in stderr or "Too many authentication failures" in stderr:
        return PermanentError(
            f"SSH authentication as {e.user} to {e.host}:{e.port} failed: add the public half of the key "
            f"named by {peer.field}_key_secret to ~{e.user}/.ssh/authorized_keys on that host"
        )
    lowered = stderr.lower()
    for word in ("connection refused", "connection reset", "connection closed", "timed out",
                 "broken pipe", "no route to host", "network is unreachable", "lost connection"):
        if word in lowered:
            return TransientError(f"SSH connection to {e.host}:{e.port} failed: {stderr.strip()[-300:]}")
    return None

