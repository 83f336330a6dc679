"""SSH connections kept between replications, and one receive per target dataset at a time.

A listener replicates to the same few hosts again and again; a handshake per job cost more than
everything else a job does besides its stream. Paramiko sessions (control commands, the paramiko
transport) wait in a ``SessionPool``; the ``ssh`` transport's client shares an OpenSSH master
(``SharedConnections``). Both are keyed by everything that decided whom a connection trusts and
as whom it logged in, so a changed row never rides on an old connection.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import paramiko

from handlers.backends.zfs.exec import ParamikoRunner
from handlers.backends.zfs.ssh import KEY_DIR_PREFIX, Peer, connect
from handlers.backends.zfs.stopping import interrupted
from handlers.errors import TransientError
from handlers.types import SSHEndpoint

log = logging.getLogger(__name__)


def _identity(peer: Peer, cipher: str) -> str:
    """A digest of everything that decided whom a connection trusts and as whom it logged in."""
    e = peer.endpoint
    secret = hashlib.sha256(peer.key_text.encode()).hexdigest()
    parts = (e.host, str(e.port), e.user, peer.pinned.key_type, peer.pinned.b64, secret, cipher)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class SharedConnections:
    """OpenSSH connection sharing for the stream's ``ssh`` client, kept between replications.

    The first stream to a host starts a master connection (``ControlMaster=auto``) that stays
    ``ControlPersist`` seconds after its last use; later streams to the same host ride on it and
    skip the handshake (about 240 ms per job here, with OpenSSH's default key exchange). The
    master's data path is the same: the client hands its pipe to the master, which reads it.
    A master is named by a digest of host, port, user, pinned host key, private key and cipher,
    so a changed row gets a new master that verifies the host key again. Its socket lives in a
    0700 directory of this process. A second stream to a host while one runs gets its own
    connection (one master encrypts on one core). A stale socket (a master that was killed) is
    removed by ssh itself, which then connects afresh.
    """

    def __init__(self, persist_seconds: int = 120) -> None:
        self.persist_seconds = persist_seconds
        self._dir: str | None = None
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> str | None:
        """Where the masters' sockets are (None before the first stream); their process titles name it."""
        return self._dir

    def _directory(self) -> str:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix=f"{KEY_DIR_PREFIX}{os.getpid()}-mux-")
            return self._dir

    @contextmanager
    def options(self, peer: Peer, cipher: str) -> Iterator[list[str]]:
        """``-o`` options for one stream's ssh: the shared master, or none while it is in use."""
        name = _identity(peer, cipher)[:24]
        path = os.path.join(self._directory(), name)
        with self._lock:
            busy = self._busy.get(name, 0)
            self._busy[name] = busy + 1
        try:
            if busy or len(path) > 100:  # in use, or too long for a unix socket name
                yield ["ControlMaster=no", "ControlPath=none"]
            else:
                yield ["ControlMaster=auto", f"ControlPath={path}", f"ControlPersist={self.persist_seconds}"]
        finally:
            with self._lock:
                self._busy[name] -= 1

    def close(self) -> None:
        """Ask every master to exit, then remove their directory."""
        with self._lock:
            directory, self._dir = self._dir, None
        if directory is None:
            return
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            try:
                subprocess.run(["ssh", "-F", "/dev/null", "-o", f"ControlPath={path}", "-O", "exit", "zerfaux-master"],
                               capture_output=True, timeout=10, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("could not stop the SSH master %s: %s", path, exc)
        shutil.rmtree(directory, ignore_errors=True)


class SessionPool:
    """Paramiko sessions kept open between replications, so a listener does not shake hands per job.

    A session is lent to one replication at a time and given back only when that replication
    succeeded; a failed one closes its sessions. Sessions are keyed by everything that decided
    whom they trust and as whom they log in (host, port, user, pinned host key, private key,
    cipher): a row changed in any of these gets a new, newly verified session. A lent session is
    first asked to run ``true``: one that stopped answering is closed and replaced.
    """

    def __init__(self, idle_seconds: float = 120.0, ping_seconds: float = 10.0) -> None:
        self.idle_seconds = idle_seconds
        self.ping_seconds = ping_seconds
        self._idle: dict[str, list[tuple[float, paramiko.SSHClient]]] = {}
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self.opened = 0  # sessions opened; read by tests and the benchmark

    def _expire_locked(self, now: float) -> list[paramiko.SSHClient]:
        """Drop sessions idle for ``idle_seconds``; returns them, to be closed outside the lock."""
        expired: list[paramiko.SSHClient] = []
        for k, entries in list(self._idle.items()):
            keep = [(t, c) for t, c in entries if now - t < self.idle_seconds]
            expired += [c for t, c in entries if now - t >= self.idle_seconds]
            if keep:
                self._idle[k] = keep
            else:
                del self._idle[k]
        return expired

    def _take_idle(self, key: str) -> paramiko.SSHClient | None:
        found: paramiko.SSHClient | None = None
        with self._lock:
            expired = self._expire_locked(time.monotonic())
            mine = self._idle.get(key)
            if mine:
                found = mine.pop()[1]
                if not mine:
                    del self._idle[key]
        for client in expired:
            client.close()
        return found

    def _reap(self) -> None:
        """Close sessions nobody took back in time; ends when none is left idle."""
        while True:
            time.sleep(min(30.0, self.idle_seconds / 2))
            with self._lock:
                expired = self._expire_locked(time.monotonic())
                done = not self._idle
                if done:
                    self._reaper = None
            for client in expired:
                client.close()
            if done:
                return

    def _answers(self, client: paramiko.SSHClient, peer: Peer) -> bool:
        try:
            return ParamikoRunner(client, peer).run(["true"], timeout=self.ping_seconds).ok
        except TransientError:
            return False

    def checkout(self, peer: Peer, cipher: str) -> paramiko.SSHClient:
        key = _identity(peer, cipher)
        while (client := self._take_idle(key)) is not None:
            if self._answers(client, peer):
                log.debug("reusing the SSH session to %s", peer.label)
                return client
            log.info("a kept SSH session to %s stopped answering: opening a new one", peer.label)
            client.close()
        client = connect(peer, cipher)
        with self._lock:
            self.opened += 1
        return client

    def checkout_both(self, target: Peer, source: Peer | None,
                      cipher: str) -> tuple[paramiko.SSHClient, paramiko.SSHClient | None]:
        """Sessions to the target and a source host at once; a failure closes the other one."""
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="zfs-connect") as pool:
            futures = [pool.submit(self.checkout, target, cipher)]
            if source:
                futures.append(pool.submit(self.checkout, source, cipher))
            wait(futures)
        failed = [exc for f in futures if (exc := f.exception()) is not None]
        if failed:
            for future in futures:
                if future.exception() is None:
                    future.result().close()
            raise failed[0]
        return futures[0].result(), futures[1].result() if source else None

    def checkin(self, peer: Peer, cipher: str, client: paramiko.SSHClient) -> None:
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            client.close()
            return
        with self._lock:
            self._idle.setdefault(_identity(peer, cipher), []).append((time.monotonic(), client))
            if self._reaper is None:  # an idle session is not kept open for ever when no job comes
                self._reaper = threading.Thread(target=self._reap, name="zfs-ssh-reaper", daemon=True)
                self._reaper.start()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for entries in idle.values():
            for _, client in entries:
                client.close()


_receive_locks: dict[tuple[str, int, str], threading.Lock] = {}
_receive_locks_guard = threading.Lock()


@contextmanager
def receive_lock(endpoint: SSHEndpoint, dataset: str, cancel: threading.Event) -> Iterator[None]:
    """One receive per target dataset in this process; across processes the DB runs one op per job."""
    key = (endpoint.host, endpoint.port, dataset)
    with _receive_locks_guard:
        lock = _receive_locks.setdefault(key, threading.Lock())
    while not lock.acquire(timeout=0.5):
        if cancel.is_set():
            raise interrupted(cancel, f"while waiting for another receive into {dataset}")
    try:
        yield
    finally:
        lock.release()
