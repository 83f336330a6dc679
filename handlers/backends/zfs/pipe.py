"""Moving a ``zfs send`` stream into a ``zfs receive`` through the listener, counting bytes.

Every stream passes through this process (source -> listener -> target), which is what lets us
count ``bytes_transferred`` live and lets two storage hosts replicate with no trust between them.
Between two pipes we use ``splice(2)``: the kernel moves pages, so counting costs nothing and
the ``ssh`` transport runs at the speed of a raw ``zfs send | ssh`` pipe. Paramiko channels are
read and written from Python.

A watcher thread turns ``cancel`` (a person's cancel or the engine's stop) into killing both ends
within a fraction of a second, which also unblocks whatever the relay loop is waiting on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

import paramiko

from handlers.backends.zfs.stopping import interrupted
from handlers.errors import TransientError
from handlers.throttle import Bucket

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PIPE_BYTES = 32 << 20  # zrepl's choice; falls back to what the kernel allows
STALL_SECONDS = 120.0
PROGRESS_EVERY = 0.1
ORPHAN_SECONDS = 2.0  # a producer still running this long after its consumer failed is not the cause


class Ended(Exception):
    """An end of the pipeline finished badly; ``where`` says which, ``stderr`` what it said."""

    def __init__(self, where: str, rc: int, stderr: str) -> None:
        super().__init__(f"{where} exited {rc}: {stderr.strip()}")
        self.where, self.rc, self.stderr = where, rc, stderr


def grow_pipe(fd: int) -> None:
    """Give a pipe zrepl's 32 MiB buffer, or 1 MiB, or leave it as the kernel allows."""
    for size in (PIPE_BYTES, 1 << 20):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


class ProcEnd:
    """A local process (``zfs`` or ``ssh``): the producer's stdout or the consumer's stdin."""

    def __init__(self, argv: Sequence[str], where: str, role: str) -> None:
        self.where = where
        self._err: IO[bytes] = tempfile.TemporaryFile()
        producer = role == "producer"
        # Own session: a kill reaches the whole command, and terminal signals do not reach it.
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL if producer else subprocess.PIPE,
            stdout=subprocess.PIPE if producer else subprocess.DEVNULL, stderr=self._err,
            start_new_session=True,
        )
        pipe = self.proc.stdout if producer else self.proc.stdin
        assert pipe is not None
        self.pipe = pipe
        self.fd = pipe.fileno()
        grow_pipe(self.fd)

    def read(self, most: int = CHUNK) -> bytes:
        return os.read(self.fd, most)

    def write(self, data: memoryview) -> int:
        return os.write(self.fd, data)

    def close_input(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.close()

    def finish(self, timeout: float | None) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self._err.seek(0)
        return rc, self._err.read().decode(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        # Only a command still running is killed: once it was reaped its group id may be reused,
        # and an ssh master it left (ControlPersist) lives in a session of its own.
        if self.proc.poll() is None:
            self.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.pipe.close()
            self.proc.wait(5)
        self._err.close()


class ChannelEnd:
    """A command running on a host over a paramiko channel."""

    def __init__(self, client: paramiko.SSHClient, argv: Sequence[str], where: str) -> None:
        self.where = where
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            raise TransientError(f"SSH session to {where} was lost")
        self.chan = transport.open_session(timeout=30)
        self.chan.settimeout(0.5)  # so the relay loop notices cancel and stalls
        self.chan.exec_command(shlex.join(argv))
        self._stderr = bytearray()

    def _drain_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            self._stderr += self.chan.recv_stderr(65536)

    def read(self, most: int = CHUNK) -> bytes:
        self._drain_stderr()
        data: bytes = self.chan.recv(most)
        return data

    def write(self, data: memoryview) -> int:
        self._drain_stderr()
        # send, not sendall: a sendall that times out cannot say how much it sent.
        sent: int = self.chan.send(data)
        return sent

    def close_input(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.chan.shutdown_write()

    def finish(self, timeout: float | None) -> tuple[int, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.chan.exit_status_ready():
            self._drain_stderr()
            if self.chan.closed and not self.chan.exit_status_ready():
                return 255, self._stderr.decode(errors="replace") + "\nSSH channel closed"
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.where, timeout or 0)
            self.chan.status_event.wait(0.1)
        self._drain_stderr()
        return self.chan.recv_exit_status(), self._stderr.decode(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.close()

    def close(self) -> None:
        self.kill()


End = ProcEnd | ChannelEnd


def relay(
    producer: End,
    consumer: End,
    on_bytes: Callable[[int], None],
    cancel: threading.Event,
    bucket: Bucket | None = None,
) -> int:
    """Copy producer -> consumer until EOF; both must then exit 0. Returns the bytes moved.

    With a ``bucket`` the bytes are taken from it as they move (the target's bandwidth limit,
    shared with every other stream to that target).

    Raises ``OperationCancelled`` or ``OperationStopped`` (as ``cancel.reason`` says) when ``cancel``
    is set, ``Ended`` when an end fails, and lets
    an exception from ``on_bytes`` through after killing both ends.
    """
    done = threading.Event()
    killed = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            if cancel.is_set():
                killed.set()
                producer.kill()
                consumer.kill()
                return

    watcher = threading.Thread(target=watch, name="zfs-relay-cancel", daemon=True)
    watcher.start()
    total = 0
    try:
        total = _copy(producer, consumer, on_bytes, cancel, killed, bucket or Bucket())
        consumer.close_input()
        if killed.is_set() or cancel.is_set():
            raise interrupted(cancel, f"after {total} bytes")
        crc, cerr = consumer.finish(STALL_SECONDS)
        if crc != 0:
            try:
                prc, perr = producer.finish(ORPHAN_SECONDS)
            except subprocess.TimeoutExpired:
                # The consumer died first (a link that went down): the producer is blocked writing
                # into a stream nobody reads any more, and would wait there for ever.
                producer.kill()
                raise Ended(consumer.where, crc, cerr) from None
        else:
            prc, perr = producer.finish(STALL_SECONDS)
        if killed.is_set():
            raise interrupted(cancel, f"after {total} bytes")
        # Name the end that failed first: a sender's "Broken pipe" only echoes the receiver's death,
        # and a receiver's "failed to read from stream" only echoes the sender's.
        if prc != 0 and "broken pipe" not in perr.lower():
            raise Ended(producer.where, prc, perr)
        if crc != 0:
            raise Ended(consumer.where, crc, cerr)
        if prc != 0:
            raise Ended(producer.where, prc, perr)
        on_bytes(total)
        return total
    except subprocess.TimeoutExpired as exc:
        raise TransientError(f"{exc.cmd} did not finish {STALL_SECONDS:.0f} s after the stream ended") from None
    finally:
        done.set()
        producer.close()
        consumer.close()


def _copy(producer: End, consumer: End, on_bytes: Callable[[int], None],
          cancel: threading.Event, killed: threading.Event, bucket: Bucket) -> int:
    total = 0
    reported = time.monotonic()
    if isinstance(producer, ProcEnd) and isinstance(consumer, ProcEnd):
        while True:
            try:
                moved = os.splice(producer.fd, consumer.fd, bucket.chunk(PIPE_BYTES))
            except BrokenPipeError:
                return total  # the consumer ended; its exit status says why
            if moved == 0:
                return total
            total += moved
            bucket.take(moved, killed)
            now = time.monotonic()
            if now - reported >= PROGRESS_EVERY:
                on_bytes(total)
                reported = now
    last_move = time.monotonic()
    while not killed.is_set():
        try:
            data = producer.read(bucket.chunk(CHUNK))
        except socket.timeout:
            if time.monotonic() - last_move > STALL_SECONDS:
                raise TransientError(f"no data from {producer.where} for {STALL_SECONDS:.0f} s") from None
            continue
        except OSError:
            return total
        if not data:
            return total
        view = memoryview(data)
        while view and not killed.is_set():
            try:
                sent = consumer.write(view)
            except socket.timeout:
                if time.monotonic() - last_move > STALL_SECONDS:
                    raise TransientError(f"{consumer.where} accepted no data for {STALL_SECONDS:.0f} s") from None
                continue
            except (BrokenPipeError, OSError, EOFError):
                return total
            if sent <= 0:
                return total  # a closed channel sends nothing
            view = view[sent:]
            total += sent
            last_move = time.monotonic()
        bucket.take(len(data), killed)
        if last_move - reported >= PROGRESS_EVERY:
            on_bytes(total)
            reported = last_move
    return total
