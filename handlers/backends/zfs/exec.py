"""Where ZFS control commands run: this machine (subprocess) or a host over a paramiko session.

Commands are argument lists. Locally they go to ``subprocess`` without a shell; remotely the
list is joined with ``shlex.join`` so the remote shell sees each argument as one word.
"""

from __future__ import annotations

import logging
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import paramiko

from handlers.backends.zfs.ssh import Peer
from handlers.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 300.0

# stderr of a failed zfs command that no retry can fix; anything else is retried.
_PERMANENT = (
    "does not exist",
    "permission denied",
    "has been modified",
    "does not match incremental source",
    "invalid option",
    "unrecognized command",
    "out of space",
)


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Runner(Protocol):
    label: str  # "local" or user@host:port, for messages and notes
    cache_key: str  # capabilities are detected once per key

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Result: ...

    def run_many(self, commands: Sequence[Sequence[str]], timeout: float = COMMAND_TIMEOUT) -> list[Result]:
        """Several independent commands, each with its own result, in as few round trips as the host allows."""
        ...


def zfs_error(result: Result, where: str, what: str) -> PermanentError | TransientError:
    """A failed zfs command in words, carrying its stderr."""
    err = result.err.strip() or result.out.strip() or f"exit status {result.rc}"
    message = f"{what} failed on {where} ({shlex.join(result.argv)}): {err}"
    if any(p in err.lower() for p in _PERMANENT):
        return PermanentError(message)
    return TransientError(message)


def check(result: Result, where: str, what: str) -> Result:
    if not result.ok:
        raise zfs_error(result, where, what)
    return result


class LocalRunner:
    label = "local"
    cache_key = "local"

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Result:
        args = list(argv)
        started = time.monotonic()
        try:
            done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        except FileNotFoundError as exc:
            raise PermanentError(f"{args[0]} is not installed on the listener's machine") from exc
        except subprocess.TimeoutExpired as exc:
            raise TransientError(f"{shlex.join(args)} did not finish within {timeout:.0f} s") from exc
        log.debug("local: %s (exit %d, %.0f ms)", shlex.join(args), done.returncode, (time.monotonic() - started) * 1000)
        return Result(tuple(args), done.returncode, done.stdout.decode(errors="replace"),
                      done.stderr.decode(errors="replace"))

    def run_many(self, commands: Sequence[Sequence[str]], timeout: float = COMMAND_TIMEOUT) -> list[Result]:
        # Here a command costs a fork, not a round trip: run them side by side, never through a shell.
        if len(commands) == 1:
            return [self.run(commands[0], timeout)]
        with ThreadPoolExecutor(max_workers=len(commands), thread_name_prefix="zfs-local") as pool:
            return list(pool.map(lambda argv: self.run(argv, timeout), commands))


class ParamikoRunner:
    def __init__(self, client: paramiko.SSHClient, peer: Peer) -> None:
        self.client = client
        self.peer = peer
        self.label = peer.label
        e = peer.endpoint
        self.cache_key = f"{e.user}@{e.host}:{e.port}"

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Result:
        args = tuple(argv)
        command = shlex.join(args)
        started = time.monotonic()
        try:
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise TransientError(f"SSH session to {self.label} was lost")
            chan = transport.open_session(timeout=30)
            chan.settimeout(1.0)
            chan.exec_command(command)
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                # sshd may send the exit status before the last of the output (the child exited while
                # its pipe still held data): wait for the channel's EOF too, or a listing comes back short.
                if chan.exit_status_ready() and (chan.eof_received or chan.closed) \
                        and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    chan.close()
                    raise TransientError(f"{command} on {self.label} did not finish within {timeout:.0f} s")
                if not transport.is_active():
                    raise TransientError(f"SSH session to {self.label} dropped during {command}")
                chan.status_event.wait(0.05)
            rc = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransientError(f"SSH session to {self.label} failed during {command}: {exc}") from None
        log.debug("%s: %s (exit %d, %.0f ms)", self.label, command, rc, (time.monotonic() - started) * 1000)
        return Result(args, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def run_many(self, commands: Sequence[Sequence[str]], timeout: float = COMMAND_TIMEOUT) -> list[Result]:
        """All the commands in one session, one after another: one round trip instead of one each.

        Each command is shlex-quoted as ``run`` does; the script only adds separators that carry
        each command's exit status. The separator holds a fresh random word, so no output can
        forge one.
        """
        if len(commands) == 1:
            return [self.run(commands[0], timeout)]
        script = batch_script(commands, mark := "zerfaux-" + secrets.token_hex(8))
        whole = self.run(["sh", "-c", script], timeout)
        results = split_batch(commands, mark, whole.out, whole.err)
        if results is None:
            raise TransientError(
                f"a batch of {len(commands)} commands on {self.label} ended early "
                f"(exit {whole.rc}): {whole.err.strip()[-300:] or 'no output'}"
            )
        return results


def batch_script(commands: Sequence[Sequence[str]], mark: str) -> str:
    """A POSIX sh script running each command and then printing ``mark`` with its exit status."""
    steps = [f"{shlex.join(argv)} </dev/null; s=$?; echo; echo {mark} $s; echo >&2; echo {mark} >&2"
             for argv in commands]
    return "; ".join(steps)  # one line: the login shell that passes it to sh may not be a POSIX one


def split_batch(commands: Sequence[Sequence[str]], mark: str, out: str, err: str) -> list[Result] | None:
    """The results of ``batch_script``'s commands, or None when the output does not hold them all."""
    outs = re.split(rf"\n{mark} (\d+)\n", out)
    errs = re.split(rf"\n{mark}\n", err)
    if len(outs) != 2 * len(commands) + 1 or len(errs) != len(commands) + 1:
        return None
    return [Result(tuple(argv), int(outs[2 * i + 1]), outs[2 * i], errs[i]) for i, argv in enumerate(commands)]
