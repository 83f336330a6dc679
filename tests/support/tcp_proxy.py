"""A TCP relay the test controls, to put between a listener and Postgres (or any peer).

``cut()`` stops forwarding in both directions while keeping every socket open: the client sees a
half-open connection (writes are accepted, nothing comes back), the nastiest kind of outage, where
no error tells the client that the peer is gone. New connections are accepted and then stall too.
``restore()`` forwards again, including what was buffered meanwhile. ``drop()`` closes every
relayed connection (a reset), and ``close()`` ends the relay.

Only loopback: the relay listens on 127.0.0.1 and connects where it is told.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    pending: dict[socket.socket, bytearray] = field(default_factory=dict)

    def other(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.setblocking(False)
        self.host, self.port = "127.0.0.1", self._listen.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._pairs: dict[socket.socket, _Pair] = {}
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0  # accepted so far
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def forwarding(self) -> bool:
        return self._forwarding.is_set()

    def url_for(self, url: str) -> str:
        """``url`` (postgresql://user@host:port/db) with host and port replaced by the relay's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        return urlunsplit(parts._replace(netloc=f"{auth}{self.host}:{self.port}"))

    def cut(self) -> None:
        self._forwarding.clear()

    def restore(self) -> None:
        self._forwarding.set()

    def drop(self) -> None:
        with self._lock:
            for sock in list(self._pairs):
                self._forget(sock)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.drop()
        self._listen.close()
        self._sel.close()

    def _loop(self) -> None:
        while not self._closed.is_set():
            if not self._forwarding.is_set():
                # Read nothing (readable sockets would wake select at once): connections stall.
                self._accept()
                time.sleep(0.05)
                continue
            for key, _ in self._sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listen:
                    self._accept()
                else:
                    self._relay(sock)
            self._flush()

    def _accept(self) -> None:
        try:
            client, _ = self._listen.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self.connections += 1
            pair = _Pair(client, server, {client: bytearray(), server: bytearray()})
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._pairs[sock] = pair
                self._sel.register(sock, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        with self._lock:
            pair = self._pairs.get(sock)
            if pair is None:
                return
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._forget(sock)
                return
            pair.pending[pair.other(sock)] += data

    def _flush(self) -> None:
        with self._lock:
            for sock, pair in list(self._pairs.items()):
                buf = pair.pending.get(sock)
                if not buf:
                    continue
                try:
                    sent = sock.send(buf)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    self._forget(sock)
                    continue
                del buf[:sent]

    def _forget(self, sock: socket.socket) -> None:
        pair = self._pairs.get(sock)
        if pair is None:
            return
        for s in (pair.client, pair.server):
            self._pairs.pop(s, None)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()


@contextmanager
def tcp_proxy(target_host: str, target_port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target_host, target_port)
    try:
        yield proxy
    finally:
        proxy.close()
