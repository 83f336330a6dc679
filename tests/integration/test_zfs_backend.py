"""ZFSReplicationReal against real ZFS through a real sshd, on every platform of tests/support/platforms.py.

zfs-fuse here (a local source, or one over SSH) and OpenZFS 2.1 in a QEMU guest (source and target
both over SSH). Test bodies are shared; what only OpenZFS can do (resume, holds it can list, size
estimates) is asserted where ``platform.has(...)`` says so, and its absence is asserted elsewhere
(the job's notes say what was missing). Every test makes its own datasets under the run's pools.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import paramiko
import pytest

from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.errors import OperationCancelled, PermanentError, TransientError
from handlers.replication import (
    ReplicationOutcome,
    ReplicationProgress,
    ReplicationRequest,
)
from handlers.types import SSHEndpoint
from tests.support.platforms import (
    FUSE_LOCAL,
    FUSE_SSH,
    OPENZFS,
    MiB,
    Platform,
    checksums,
    create_dataset,
    guids,
    held,
    matrix,
    mount,
    resume_token,
    write,
    zfs_get,
)
from tests.support.zfs import secret_env
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.zfs

__all__ = ["MiB", "checksums", "guids", "write"]  # other suites import these from here


class Interrupted(Exception):
    """Stands for the listener dying mid-send."""


def endpoint(host: ZFSHost, secret: str) -> SSHEndpoint:
    return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, secret, host.host_key)


@pytest.fixture
def backend(platform: Platform) -> Iterator[ZFSReplicationReal]:
    b = ZFSReplicationReal(secret_env(platform.target, platform.source))
    yield b
    b.close()


@pytest.fixture
def names(platform: Platform) -> Iterator[tuple[str, str]]:
    """A fresh source dataset (mounted, for writing files) and the target dataset name."""
    source, target = platform.source, platform.target
    tag = uuid.uuid4().hex[:8]
    src = f"{source.pool}/vm{tag}"
    create_dataset(source, src, "src-" + tag)
    target.run(["zfs", "create", "-p", "-o", "mountpoint=none", f"{target.pool}/dr"], check=False)
    yield src, f"{target.pool}/dr/vm{tag}"
    source.run(["zfs", "destroy", "-R", src], check=False)
    target.run(["zfs", "destroy", "-R", f"{target.pool}/dr/vm{tag}"], check=False)


def request(job: str, src: str, dst: str, p: Platform, transport: str = "ssh",
            retention: int | None = None) -> ReplicationRequest:
    return ReplicationRequest(
        job_id=job, source_dataset=src, target_dataset=dst, transport=transport,
        target=endpoint(p.target, "key-0"),
        source=endpoint(p.source, "key-1") if p.mode == "ssh" else None,
        retention_snapshots=retention, last_snapshot=None,
    )


def replicate(backend: ZFSReplicationReal, req: ReplicationRequest,
              sink: Callable[[ReplicationProgress], None] | None = None,
              cancel: threading.Event | None = None) -> ReplicationOutcome:
    seen: list[ReplicationProgress] = []
    return backend.replicate(req, sink or seen.append, cancel or threading.Event())


def replicate_retrying(backend: ZFSReplicationReal, req: ReplicationRequest, attempts: int = 5) -> ReplicationOutcome:
    """What the dispatcher does with a TransientError: try again after a pause (the killed attempt's
    remote receive may still be exiting), each retry with the next attempt number."""
    for n in range(1, attempts):
        try:
            return replicate(backend, replace(req, attempt=req.attempt + n))
        except TransientError:
            time.sleep(1.0)
    return replicate(backend, replace(req, attempt=req.attempt + attempts))


def assert_same(p: Platform, src: str, dst: str, snap: str) -> None:
    assert guids(p.target, dst)[snap] == guids(p.source, src)[snap]
    assert checksums(p.target, f"{dst}@{snap}") == checksums(p.source, f"{src}@{snap}")


def assert_estimate(p: Platform, outcome: ReplicationOutcome) -> None:
    """OpenZFS: ``bytes_estimated`` from ``zfs send -nP`` within 10 % of the bytes that crossed."""
    if p.has("estimate"):
        assert outcome.bytes_estimated is not None, outcome
        assert abs(outcome.bytes_estimated - outcome.bytes_transferred) <= 0.10 * outcome.bytes_transferred, outcome
    else:
        assert outcome.bytes_estimated is None
        assert any("size estimate not supported" in n for n in outcome.notes), outcome.notes


def assert_no_holds(p: Platform, src: str, dst: str) -> None:
    for host, dataset in ((p.source, src), (p.target, dst)):
        for snap in guids(host, dataset):
            assert not held(host, f"{dataset}@{snap}"), f"{dataset}@{snap} still held on {host.name}"


@pytest.mark.parametrize("platform,transport", matrix(["ssh", "paramiko", "syncoid"], ["ssh", "syncoid"]),
                         indirect=["platform"])
def test_full_incremental_and_nothing_changed(backend: ZFSReplicationReal, platform: Platform,
                                              names: tuple[str, str], transport: str) -> None:
    p, (src, dst) = platform, names
    data = p.size(16, 8)
    write(p.source, src, "disk-flat.vmdk", data)
    progress: list[ReplicationProgress] = []
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport), progress.append)
    assert first.base_snapshot is None
    assert first.bytes_transferred > data
    assert progress and progress[-1].bytes_transferred == first.bytes_transferred
    assert_same(p, src, dst, first.snapshot_name)
    assert zfs_get(p.target, "mounted", dst) == "no"
    assert_estimate(p, first)
    assert ("resume not supported" in " ".join(first.notes)) != p.has("resume"), first.notes

    # The incremental's base is held on both sides while the stream flows, and released after.
    write(p.source, src, "delta.bin", 1 * MiB)
    during: list[tuple[bool, bool, bool]] = []

    def look_at_holds(progress: ReplicationProgress) -> None:
        if progress.bytes_transferred > 0 and not during and transport != "syncoid":
            during.append((held(p.source, f"{src}@{progress.base_snapshot}"),
                           held(p.target, f"{dst}@{progress.base_snapshot}"),
                           held(p.source, f"{src}@{progress.snapshot_name}")))

    second = replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport), look_at_holds)
    assert second.base_snapshot == first.snapshot_name
    assert 1 * MiB <= second.bytes_transferred < 2 * MiB  # only the change crossed
    assert_same(p, src, dst, second.snapshot_name)
    assert_estimate(p, second)
    if transport != "syncoid":  # syncoid's progress comes from pv, after our holds are gone at times
        assert during == [(p.has("hold"),) * 3]
    assert_no_holds(p, src, dst)
    assert zfs_get(p.target, "mounted", dst) == "no"

    third = replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport))
    assert third.base_snapshot == second.snapshot_name
    assert third.bytes_transferred < 64 * 1024  # nothing changed: an empty incremental
    assert guids(p.target, dst)[third.snapshot_name] == guids(p.source, src)[third.snapshot_name]


@pytest.mark.parametrize("platform", [FUSE_LOCAL, OPENZFS], indirect=True)
def test_same_job_twice_is_a_no_op(backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str]) -> None:
    src, dst = names
    write(platform.source, src, "a", 2 * MiB)
    req = request(str(uuid.uuid4()), src, dst, platform)
    first = replicate(backend, req)
    again = replicate(backend, req)
    assert again.snapshot_name == first.snapshot_name and again.bytes_transferred == 0
    assert len(guids(platform.source, src)) == 1


@pytest.mark.parametrize("platform,transport", matrix(["ssh", "paramiko"], ["ssh", "paramiko"]), indirect=["platform"])
def test_retry_after_interrupted_attempt(backend: ZFSReplicationReal, platform: Platform,
                                         names: tuple[str, str], transport: str) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "disk.vmdk", 1 * MiB)
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport))
    write(p.source, src, "disk-flat.vmdk", p.size(48, 24))
    req = request(str(uuid.uuid4()), src, dst, p, transport)  # an incremental from ``first``
    full = [0]

    def die(progress: ReplicationProgress) -> None:
        full[0] = progress.bytes_estimated or full[0]
        # Late in the stream, so a resumed retry has visibly less to send than a full one.
        if progress.bytes_transferred > p.size(2, 16):
            raise Interrupted()

    with pytest.raises(Interrupted):
        replicate(backend, req, die)
    before = guids(p.source, src)
    assert len(before) == 2  # the attempt's snapshot stays for the retry
    attempt = next(name for name in before if name != first.snapshot_name)
    if p.has("resume"):
        assert resume_token(p.target, dst), "an interrupted resumable receive leaves a token"
        # ... and its holds, which keep the snapshots the resume needs until the retry releases them.
        assert held(p.source, f"{src}@{attempt}") and held(p.source, f"{src}@{first.snapshot_name}")
    outcome = replicate_retrying(backend, req)
    assert guids(p.source, src) == before  # the retry reused it
    assert outcome.snapshot_name == attempt
    assert outcome.base_snapshot == first.snapshot_name  # a resumed stream too: its token names the base by GUID
    assert_same(p, src, dst, outcome.snapshot_name)
    if p.has("resume"):
        assert any("resumed" in n for n in outcome.notes), outcome.notes
        assert full[0] > 0
        assert 0 < outcome.bytes_transferred < 0.6 * full[0], (outcome.bytes_transferred, full[0])
        assert resume_token(p.target, dst) is None
    else:
        assert any("resume not supported" in n for n in outcome.notes), outcome.notes
    assert_no_holds(p, src, dst)


@pytest.mark.parametrize("platform", [FUSE_SSH, OPENZFS], indirect=True)
def test_diverged_target_is_refused_and_nothing_destroyed(backend: ZFSReplicationReal, platform: Platform,
                                                          names: tuple[str, str]) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "a", 2 * MiB)
    replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    p.target.run(["zfs", "snapshot", f"{dst}@operator-made"])
    write(p.source, src, "b", 1 * MiB)
    src_before, dst_before = guids(p.source, src), guids(p.target, dst)
    with pytest.raises(PermanentError, match="diverged.*operator-made.*never rolls back"):
        replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    assert guids(p.source, src) == src_before  # refused before snapshotting
    assert guids(p.target, dst) == dst_before


@pytest.mark.parametrize("platform", [FUSE_LOCAL, OPENZFS], indirect=True)
def test_modified_target_is_refused(backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str]) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "a", 2 * MiB)
    replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    mount(p.target, dst, "dr-" + uuid.uuid4().hex[:8])
    write(p.target, dst, "someone-wrote-here", 4096)
    write(p.source, src, "b", 1 * MiB)
    dst_before = guids(p.target, dst)
    with pytest.raises(PermanentError, match="changed since its newest snapshot"):
        replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    assert guids(p.target, dst) == dst_before
    where = zfs_get(p.target, "mountpoint", dst)
    assert p.target.run(["test", "-f", f"{where}/someone-wrote-here"], check=False).returncode == 0


@pytest.mark.parametrize("platform", [FUSE_LOCAL, OPENZFS], indirect=True)
def test_target_without_common_snapshot_is_refused(backend: ZFSReplicationReal, platform: Platform,
                                                   names: tuple[str, str]) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "a", 1 * MiB)
    p.target.run(["zfs", "create", "-o", "mountpoint=none", dst])
    p.target.run(["zfs", "snapshot", f"{dst}@unrelated"])
    with pytest.raises(PermanentError, match="shares no snapshot.*never does that"):
        replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    assert list(guids(p.target, dst)) == ["unrelated"]


# Validation and SSH trust happen before any ZFS command: one platform is enough for them.
@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
@pytest.mark.parametrize("field,bad", [
    ("source_dataset", "tank/vm;touch /tmp/pwned"),
    ("source_dataset", "-o mountpoint=/ tank"),
    ("target_dataset", "dr/$(reboot)"),
    ("target_dataset", "dr/a b"),
])
def test_malicious_names_rejected_before_any_process(backend: ZFSReplicationReal, platform: Platform,
                                                     monkeypatch: pytest.MonkeyPatch, field: str, bad: str) -> None:
    started: list[object] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr(paramiko.SSHClient, "connect", lambda *a, **k: started.append(a))
    kwargs = {"source_dataset": f"{platform.source.pool}/ok", "target_dataset": f"{platform.target.pool}/dr/ok",
              field: bad}
    req = request(str(uuid.uuid4()), kwargs["source_dataset"], kwargs["target_dataset"], platform)
    expected = "protection_groups.source_dataset" if field == "source_dataset" else "replication_jobs.target_dataset"
    with pytest.raises(PermanentError, match=expected):
        replicate(backend, req)
    assert started == []


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_host_key_mismatch_shows_both_fingerprints(platform: Platform, names: tuple[str, str],
                                                   tmp_path: object) -> None:
    keyfile = os.path.join(str(tmp_path), "other")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keyfile], check=True)
    with open(keyfile + ".pub") as fh:
        other = fh.read().split()
    target = platform.target
    wrong = SSHEndpoint(target.ssh_host, target.ssh_port, "root", "key-0", f"{other[0]} {other[1]}")
    src, dst = names
    req = ReplicationRequest(str(uuid.uuid4()), src, dst, "ssh", wrong, None, None, None)
    with pytest.raises(PermanentError, match="host key mismatch") as info:
        ZFSReplicationReal(secret_env(target)).replicate(req, lambda p: None, threading.Event())
    assert str(info.value).count("SHA256:") == 2
    assert guids(platform.source, src) == {}  # nothing ran on the source


@pytest.mark.parametrize("platform", [FUSE_SSH], indirect=True)
def test_auth_failure_and_refused_connection(platform: Platform, names: tuple[str, str], tmp_path: object) -> None:
    keyfile = os.path.join(str(tmp_path), "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keyfile], check=True)
    from handlers.secrets import SecretResolver
    with open(keyfile) as fh:
        resolver = SecretResolver({"ZERFAUX_SECRET_KEY_0": fh.read()})
    src, dst = names
    target = platform.target
    req = ReplicationRequest(str(uuid.uuid4()), src, dst, "ssh", endpoint(target, "key-0"), None, None, None)
    with pytest.raises(PermanentError, match="authentication"):
        ZFSReplicationReal(resolver).replicate(req, lambda p: None, threading.Event())
    closed = SSHEndpoint("127.0.0.1", 9, "root", "key-0", target.host_key)
    req = ReplicationRequest(str(uuid.uuid4()), src, dst, "ssh", closed, None, None, None)
    with pytest.raises(TransientError, match="cannot reach"):
        ZFSReplicationReal(secret_env(target)).replicate(req, lambda p: None, threading.Event())


@pytest.mark.parametrize("platform,transport", matrix(["ssh", "paramiko", "syncoid"], ["ssh"]), indirect=["platform"])
def test_cancel_stops_within_seconds(backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str],
                                     transport: str) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "a", 2 * MiB)
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport))
    write(p.source, src, "b", p.size(96, 24))
    cancel = threading.Event()
    started = [0.0]

    def cancel_on_first_bytes(progress: ReplicationProgress) -> None:
        if progress.bytes_transferred > 0 and not cancel.is_set():
            started[0] = time.monotonic()
            cancel.set()

    def cancel_now() -> None:
        started[0] = time.monotonic()
        cancel.set()

    if transport == "syncoid":  # pv reports every half second: cancel from outside instead
        threading.Timer(1.0, cancel_now).start()
    with pytest.raises(OperationCancelled):
        replicate(backend, request(str(uuid.uuid4()), src, dst, p, transport), cancel_on_first_bytes, cancel)
    # Stopping includes aborting the partial receive (zfs receive -A): a few commands in the guest.
    assert time.monotonic() - started[0] < (5 if p.source.local else 15)
    assert first.snapshot_name in guids(p.source, src)  # the chain is intact
    assert len(guids(p.source, src)) == 2
    time.sleep(0.5)
    assert list(guids(p.target, dst)) == [first.snapshot_name]  # no partial snapshot on the target
    assert resume_token(p.target, dst) is None  # nor partial receive state
    assert_no_holds(p, src, dst)
    # The next job converges (a transient "not there yet" is retried, as the dispatcher would).
    final = replicate_retrying(backend, request(str(uuid.uuid4()), src, dst, p, transport))
    assert_same(p, src, dst, final.snapshot_name)


def test_retention_keeps_what_it_must(backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str]) -> None:
    p, (src, dst) = platform, names
    made = []
    for i in range(5):
        write(p.source, src, f"f{i}", 256 * 1024)
        if i == 1:
            p.source.run(["zfs", "snapshot", f"{src}@operator-daily"])  # not ours: never pruned
        outcome = replicate(backend, request(str(uuid.uuid4()), src, dst, p, retention=2))
        made.append(outcome.snapshot_name)
        if i == 0:  # held by someone else on the source, and on the target: never pruned
            p.source.run(["zfs", "hold", "keep-me", f"{src}@{outcome.snapshot_name}"])
        if i == 1:
            p.target.run(["zfs", "hold", "keep-me", f"{dst}@{outcome.snapshot_name}"])
        time.sleep(1.05)  # snapshot names carry the second
    on_source, on_target = guids(p.source, src), guids(p.target, dst)
    assert set(on_source) == {made[0], "operator-daily", made[3], made[4]}  # held, foreign, newest two
    assert set(on_target) == {made[1], made[3], made[4]}  # held, newest two; -i sends no intermediate snapshot
    p.source.run(["zfs", "release", "keep-me", f"{src}@{made[0]}"])
    p.target.run(["zfs", "release", "keep-me", f"{dst}@{made[1]}"])


def _masters(backend: ZFSReplicationReal) -> set[int]:
    """Pids of the OpenSSH masters the backend keeps (their process title names their socket)."""
    directory = backend.shared.directory
    if directory is None:
        return set()
    found = subprocess.run(["pgrep", "-f", directory], capture_output=True, text=True, check=False)
    return {int(pid) for pid in found.stdout.split()}


@pytest.mark.parametrize("platform", [FUSE_LOCAL, FUSE_SSH], indirect=True)
def test_connections_are_kept_between_jobs_and_replaced_when_they_drop(
        backend: ZFSReplicationReal, platform: Platform, names: tuple[str, str], zfs_sshd: object) -> None:
    p, (src, dst) = platform, names
    write(p.source, src, "a", 1 * MiB)
    replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    opened, masters = backend.sessions.opened, _masters(backend)
    assert opened == (1 if p.mode == "local" else 2) and len(masters) == 1, (opened, masters)

    write(p.source, src, "b", 1 * MiB)
    second = replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    assert_same(p, src, dst, second.snapshot_name)
    assert backend.sessions.opened == opened, "the second job to the same host shook hands again"
    assert _masters(backend) == masters

    # The host drops every connection (a restarted sshd, a network blip): the next job reconnects.
    sshd_pid = getattr(zfs_sshd, "process").pid
    subprocess.run(["pkill", "-KILL", "-P", str(sshd_pid)], check=False)
    write(p.source, src, "c", 1 * MiB)
    third = replicate(backend, request(str(uuid.uuid4()), src, dst, p))
    assert third.base_snapshot == second.snapshot_name
    assert_same(p, src, dst, third.snapshot_name)
    assert backend.sessions.opened > opened
    assert _masters(backend) and not _masters(backend) & masters

    directory = backend.shared.directory
    backend.close()
    deadline = time.monotonic() + 10
    while _masters_in(directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _masters_in(directory), "an ssh master outlived the backend"
    assert directory and not os.path.exists(directory)


def _masters_in(directory: str | None) -> list[str]:
    if directory is None:
        return []
    return subprocess.run(["pgrep", "-f", directory], capture_output=True, text=True, check=False).stdout.split()


@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
def test_one_dataset_to_two_replicas_keeps_both_bases(backend: ZFSReplicationReal, platform: Platform,
                                                      names: tuple[str, str]) -> None:
    """Two groups replicating one dataset: each one's retention of 1 leaves the other's base alone."""
    p, (src, dst) = platform, names
    replicas = [dst, dst + "-b"]
    try:
        last: dict[str, str] = {}
        for round_ in range(3):
            write(p.source, src, f"f{round_}", 256 * 1024)
            for replica in replicas:
                outcome = replicate(backend, request(str(uuid.uuid4()), src, replica, p, retention=1))
                assert outcome.base_snapshot == last.get(replica), (round_, replica, outcome)  # incremental after the first
                assert_same(p, src, replica, outcome.snapshot_name)
                last[replica] = outcome.snapshot_name
                time.sleep(1.05)  # snapshot names carry the second
        assert set(guids(p.source, src)) == set(last.values())  # each replica's newest, nothing else
        for replica in replicas:
            assert list(guids(p.target, replica)) == [last[replica]]
        tags = {zfs_get(p.source, "zerfaux:target", f"{src}@{snap}") for snap in last.values()}
        assert tags == {f"{p.target.ssh_host}:{p.target.ssh_port}/{replica}" for replica in replicas}
    finally:
        p.target.run(["zfs", "destroy", "-R", dst + "-b"], check=False)
