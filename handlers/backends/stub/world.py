"""An imagined outside world for the stub backends, shared by every process that points at it.

With ``ZERFAUX_STUB_WORLD=<directory>`` the stubs keep the state that makes the real systems
idempotent in files under that directory (a DR shell VM exists once, a VM sits on one datastore,
a job's snapshot is made once and received once), so a retry in another listener process sees
what an earlier attempt did, exactly as it would against a real vCenter or ZFS. Every effect is
also written to ``journal.jsonl``, one line per effect, so tests can count effects rather than
statuses: a duplicated side effect shows up as a second "created" or "sent" line.

Why files: listeners under test are separate processes (some SIGKILLed mid-operation), so the
world must outlive any of them and be safe under concurrent writers without a server. Creation is
``link(2)`` of a fully written temporary file (atomic, fails with EEXIST like ``O_EXCL``, and a
reader never sees half a file); journal lines are single ``O_APPEND`` writes well under
``PIPE_BUF``; a per-object ``flock`` serialises work on one object and is released by the kernel
when its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
_MAX_LINE = 1024  # far below PIPE_BUF (4096): one write(2) with O_APPEND never interleaves


class StubWorld:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._worker = f"{socket.gethostname()}-{os.getpid()}"

    def _path(self, *key: str) -> Path:
        # quote() with nothing safe is injective: 'tank/vm' and 'tank_vm' stay distinct files.
        return self.root.joinpath(*(quote(part, safe="") for part in key))

    def record(self, kind: str, subject: str, effect: str, **detail: Any) -> None:
        """Append one effect to the journal (one atomic write)."""
        entry = {"kind": kind, "subject": subject, "effect": effect, "worker": self._worker,
                 "pid": os.getpid(), "at": round(time.time(), 6), **detail}
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        if len(line) > _MAX_LINE:
            raise ValueError(f"journal line of {len(line)} bytes would not be written atomically")
        fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        log.debug("stub world: %s %s %s", kind, subject, effect)

    def create_once(self, *key: str, content: str) -> bool:
        """Create the object holding ``content``; False (and nothing written) if it exists."""
        path = self._path(*key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
        tmp.write_text(content)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self, *key: str) -> str | None:
        try:
            return self._path(*key).read_text()
        except FileNotFoundError:
            return None

    def write(self, *key: str, content: str) -> None:
        """Replace the object's content atomically (rename over it)."""
        path = self._path(*key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
        tmp.write_text(content)
        os.replace(tmp, path)

    def remove(self, *key: str) -> None:
        """Delete the object if it exists."""
        self._path(*key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, *key: str) -> Iterator[None]:
        """Hold the object's lock (blocking), as a vCenter lets one task at a time touch a VM."""
        path = self._path(*key)
        path = path.with_name(path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock; so does the process dying

    def journal(self) -> list[dict[str, Any]]:
        """Every effect recorded so far, in order of writing."""
        try:
            text = (self.root / JOURNAL).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]
