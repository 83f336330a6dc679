"""Stop is not cancel, and attempts never touch each other's holds: against real ZFS.

The engine stops an attempt (shutdown, lease lost) with ``StopSignal.stop``; a person's cancel is
``StopSignal.cancel`` (tests/integration/test_zfs_backend.py covers that one). A stopped attempt
kills its processes but keeps the partial receive (OpenZFS: ``receive_resume_token``) and its holds;
the next attempt resumes and releases them. Holds carry the attempt: an old attempt's clean-up
releases only its own, a retry releases those of earlier attempts only.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

import pytest

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Result
from handlers.backends.zfs.holds import Holds, job_tag
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.context import StopSignal
from handlers.errors import OperationStopped
from handlers.replication import ReplicationProgress
from tests.integration.test_zfs_backend import (  # noqa: F401  (fixtures)
    assert_no_holds,
    assert_same,
    backend,
    names,
    replicate,
    replicate_retrying,
    request,
)
from tests.support.platforms import FUSE_LOCAL, OPENZFS, MiB, Platform, guids, held, matrix, resume_token, write, zfs_get
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.zfs


class HostRunner:
    """The backend's Runner over a test host's own ``run`` (local zfs-fuse, or ssh into the guest)."""

    def __init__(self, host: ZFSHost) -> None:
        self.host = host
        self.label = self.cache_key = f"test:{host.name}"

    def run(self, argv: Sequence[str], timeout: float = 300.0) -> Result:
        done: subprocess.CompletedProcess[bytes] = self.host.run(list(argv), check=False)
        return Result(tuple(argv), done.returncode, done.stdout.decode(), done.stderr.decode())

    def run_many(self, commands: Sequence[Sequence[str]], timeout: float = 300.0) -> list[Result]:
        return [self.run(c, timeout) for c in commands]


def refs(host: ZFSHost, snapshot: str) -> int:
    return int(zfs_get(host, "userrefs", snapshot))


@pytest.mark.parametrize("platform,transport", matrix(["ssh", "paramiko"], ["ssh"]), indirect=["platform"])
def test_stop_keeps_resumable_state_and_holds_for_the_next_attempt(
        backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str], transport: str) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "disk.vmdk", 1 * MiB)
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport))
    write(p.source, src, "disk-flat.vmdk", p.size(48, 24))
    req = replace(request(str(uuid.uuid4()), src, dst, p, transport), attempt=1)
    stop = StopSignal()
    full, stopped_at = [0], [0.0]

    def stop_late(progress: ReplicationProgress) -> None:
        full[0] = progress.bytes_estimated or full[0]
        if progress.bytes_transferred > p.size(2, 16) and not stop.is_set():
            stopped_at[0] = time.monotonic()
            stop.stop("lease lost")

    with pytest.raises(OperationStopped):
        replicate(backend, req, stop_late, stop)
    # Killed, not cleaned up: a few commands less than a cancel.
    assert time.monotonic() - stopped_at[0] < (3 if p.source.local else 10)
    before = guids(p.source, src)
    attempt = next(name for name in before if name != first.snapshot_name)
    if p.has("resume"):
        time.sleep(1.0)  # the killed receive exits on the target
        assert resume_token(p.target, dst), "a stop must not run zfs receive -A"
    if p.has("hold"):
        assert held(p.source, f"{src}@{attempt}") and held(p.source, f"{src}@{first.snapshot_name}")
        assert held(p.target, f"{dst}@{first.snapshot_name}")
    outcome = replicate_retrying(backend, req)  # attempts 2, 3, ... as the dispatcher numbers them
    assert outcome.snapshot_name == attempt and guids(p.source, src) == before
    assert_same(p, src, dst, attempt)
    if p.has("resume"):
        assert any("resumed" in n for n in outcome.notes), outcome.notes
        assert 0 < outcome.bytes_transferred < 0.6 * full[0], (outcome.bytes_transferred, full[0])
        assert resume_token(p.target, dst) is None
    assert_no_holds(p, src, dst)


@pytest.mark.parametrize("platform", [FUSE_LOCAL, OPENZFS], indirect=True)
def test_an_old_attempts_clean_up_never_releases_a_newer_attempts_holds(platform: Platform,
                                                                        names: tuple[str, str]) -> None:
    host, (src, _) = platform.source, names
    host.run(["zfs", "snapshot", f"{src}@base"])
    snapshot, runner, job = f"{src}@base", HostRunner(host), str(uuid.uuid4())
    notes: list[str] = []
    old, new = Holds(job, 1, notes.append), Holds(job, 2, notes.append)
    new.hold(runner, src, "base")
    old.hold(runner, src, "base")
    assert refs(host, snapshot) == 2
    old.release()  # the fenced attempt's `finally`
    assert refs(host, snapshot) == 1
    zombie = Holds(job, 1, notes.append)  # even one that adopts what it finds held
    zombie.adopt(runner, src, ops.snapshots(runner, src, ops.Caps(False, False, False, True)) or [])
    zombie.release()
    assert refs(host, snapshot) == 1
    assert host.run(["zfs", "destroy", snapshot], check=False).returncode != 0  # still held by attempt 2
    # A hold of the tag used before attempts had one, and attempt 2's: attempt 3 releases both.
    host.run(["zfs", "hold", job_tag(job), snapshot])
    later = Holds(job, 3, notes.append)
    later.adopt(runner, src, ops.snapshots(runner, src, ops.Caps(False, False, False, True)) or [])
    later.release()
    assert refs(host, snapshot) == 0 and notes == []
    host.run(["zfs", "destroy", snapshot])


@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
def test_one_failed_hold_does_not_disable_holds_for_the_host(platform: Platform, names: tuple[str, str]) -> None:
    host, (src, _) = platform.source, names
    host.run(["zfs", "snapshot", f"{src}@base"])
    runner, job = HostRunner(host), str(uuid.uuid4())
    notes: list[str] = []
    holds = Holds(job, 1, notes.append)
    holds.hold(runner, src, "gone")  # no such snapshot: this hold fails ...
    assert notes and "zfs hold failed" in notes[0] and ops.holds_supported(runner)
    holds.hold(runner, src, "base")  # ... the next one is tried, and holds
    assert refs(host, f"{src}@base") == 1
    holds.release()
    assert refs(host, f"{src}@base") == 0
