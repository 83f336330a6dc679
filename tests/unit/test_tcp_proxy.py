"""The test relay forwards, stalls without closing when cut, forwards again when restored."""

from __future__ import annotations

import socket
import threading

from tests.support.tcp_proxy import tcp_proxy


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def test_cut_stalls_and_restore_delivers() -> None:
    server, port = _echo_server()
    try:
        with tcp_proxy("127.0.0.1", port) as proxy, socket.create_connection((proxy.host, proxy.port)) as c:
            c.settimeout(2)
            c.sendall(b"one")
            assert c.recv(10) == b"one"
            proxy.cut()
            c.sendall(b"two")
            c.settimeout(0.5)
            try:
                got = c.recv(10)
            except socket.timeout:
                got = None
            assert got is None  # no answer, and no close either
            proxy.restore()
            c.settimeout(2)
            assert c.recv(10) == b"two"
            proxy.drop()
            assert c.recv(10) == b""
    finally:
        server.close()
