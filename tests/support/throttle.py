"""A loopback TCP relay that forwards at most ``rate`` bytes per second each way, per connection.

Put in front of a test sshd it turns a loopback link into a slow WAN one, so a replication
lasts long enough to be interrupted where the test wants (a 60 Mbit/s link is 7.5 MB/s).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Throttle:
    def __init__(self, target_port: int, rate: float, target_host: str = "127.0.0.1") -> None:
        self._target, self._rate = (target_host, target_port), rate
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port = self._listen.getsockname()[1]
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="throttle", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        started, moved = time.monotonic(), 0
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                moved += len(data)
                ahead = moved / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # one side ended: end the other, as a link would
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._listen.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@contextmanager
def throttled(target_port: int, rate: float) -> Iterator[Throttle]:
    relay = Throttle(target_port, rate)
    try:
        yield relay
    finally:
        relay.close()
