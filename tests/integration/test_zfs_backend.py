"""ZFSReplicationReal against real ZFS (zfs-fuse here) through a real sshd.

Hosts come from fixtures (``zfs_target``, ``zfs_source``) so the suite can be parametrized over
other ZFS hosts later. Every test makes its own datasets under the run's pools.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paramiko
import pytest

from handlers.backends.zfs_real import ZFSReplicationReal
from handlers.errors import OperationCancelled, PermanentError, TransientError
from handlers.replication import ReplicationOutcome, ReplicationProgress, ReplicationRequest
from handlers.types import SSHEndpoint
from tests.support.zfs import mountpoint, secret_env
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.zfs

MiB = 1024 * 1024


class Interrupted(Exception):
    """Stands for the listener dying mid-send."""


def endpoint(host: ZFSHost, secret: str) -> SSHEndpoint:
    return SSHEndpoint(host.ssh_host, host.ssh_port, host.ssh_user, secret, host.host_key)


@pytest.fixture(params=["local", "ssh"])
def source_mode(request: pytest.FixtureRequest, zfs_source: ZFSHost) -> str:
    if request.param == "local" and not zfs_source.local:
        pytest.skip("this source host has no local zfs")
    return str(request.param)


@pytest.fixture
def backend(zfs_target: ZFSHost, zfs_source: ZFSHost) -> Iterator[ZFSReplicationReal]:
    b = ZFSReplicationReal(secret_env(zfs_target, zfs_source))
    yield b
    b.close()


@pytest.fixture
def names(zfs_source: ZFSHost, zfs_target: ZFSHost) -> Iterator[tuple[str, str]]:
    """A fresh source dataset (mounted, for writing files) and the target dataset name."""
    tag = uuid.uuid4().hex[:8]
    src = f"{zfs_source.pool}/vm{tag}"
    zfs_source.run(["zfs", "create", "-o", f"mountpoint={mountpoint('src-' + tag)}", src])
    zfs_target.run(["zfs", "create", "-p", f"{zfs_target.pool}/dr"], check=False)
    yield src, f"{zfs_target.pool}/dr/vm{tag}"
    zfs_source.run(["zfs", "destroy", "-r", src], check=False)
    zfs_target.run(["zfs", "destroy", "-r", f"{zfs_target.pool}/dr/vm{tag}"], check=False)


def write(host: ZFSHost, dataset: str, name: str, size: int) -> None:
    mountpoint = host.run(["zfs", "get", "-H", "-o", "value", "mountpoint", dataset]).stdout.decode().strip()
    with open(os.path.join(mountpoint, name), "wb") as fh:
        fh.write(os.urandom(size))
    subprocess.run(["sync"], check=False)


def request(job: str, src: str, dst: str, target: ZFSHost, source: ZFSHost, mode: str,
            transport: str = "ssh", retention: int | None = None) -> ReplicationRequest:
    return ReplicationRequest(
        job_id=job, source_dataset=src, target_dataset=dst, transport=transport,
        target=endpoint(target, "key-0"),
        source=endpoint(source, "key-1") if mode == "ssh" else None,
        retention_snapshots=retention, last_snapshot=None,
    )


def replicate(backend: ZFSReplicationReal, req: ReplicationRequest,
              sink: Callable[[ReplicationProgress], None] | None = None,
              cancel: threading.Event | None = None) -> ReplicationOutcome:
    seen: list[ReplicationProgress] = []
    return backend.replicate(req, sink or seen.append, cancel or threading.Event())


def replicate_retrying(backend: ZFSReplicationReal, req: ReplicationRequest, attempts: int = 5) -> ReplicationOutcome:
    """What the dispatcher does with a TransientError: try again after a pause (the killed attempt's
    remote receive may still be exiting)."""
    for _ in range(attempts - 1):
        try:
            return replicate(backend, req)
        except TransientError:
            time.sleep(1.0)
    return replicate(backend, req)


def guids(host: ZFSHost, dataset: str) -> dict[str, int]:
    out = host.run(["zfs", "get", "-Hp", "-d", "1", "-o", "name,value", "guid", dataset]).stdout.decode()
    return {n.split("@", 1)[1]: int(v) for n, v in (l.split("\t") for l in out.splitlines()) if "@" in n}


def checksums(host: ZFSHost, snapshot: str) -> dict[str, str]:
    """File digests of a snapshot, read through a temporary clone so the replica itself is never mounted."""
    tag = uuid.uuid4().hex[:8]
    clone = f"{host.pool}/verify{tag}"
    where = mountpoint(f"verify-{tag}")
    host.run(["zfs", "clone", "-o", f"mountpoint={where}", snapshot, clone])
    try:
        result = {}
        for name in sorted(os.listdir(where)):
            with open(os.path.join(where, name), "rb") as fh:
                result[name] = hashlib.sha256(fh.read()).hexdigest()
        return result
    finally:
        host.run(["zfs", "destroy", clone], check=False)


def assert_same(source: ZFSHost, src: str, target: ZFSHost, dst: str, snap: str) -> None:
    assert guids(target, dst)[snap] == guids(source, src)[snap]
    assert checksums(target, f"{dst}@{snap}") == checksums(source, f"{src}@{snap}")


@pytest.mark.parametrize("transport", ["ssh", "paramiko", "syncoid"])
def test_full_incremental_and_nothing_changed(backend: ZFSReplicationReal, zfs_source: ZFSHost, zfs_target: ZFSHost,
                                              names: tuple[str, str], source_mode: str, transport: str) -> None:
    src, dst = names
    write(zfs_source, src, "disk-flat.vmdk", 16 * MiB)
    progress: list[ReplicationProgress] = []
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport),
                      progress.append)
    assert first.base_snapshot is None
    assert first.bytes_transferred > 16 * MiB
    assert progress and progress[-1].bytes_transferred == first.bytes_transferred
    assert_same(zfs_source, src, zfs_target, dst, first.snapshot_name)
    assert zfs_target.run(["zfs", "get", "-H", "-o", "value", "mounted", dst]).stdout.strip() == b"no"

    write(zfs_source, src, "delta.bin", 1 * MiB)
    second = replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport))
    assert second.base_snapshot == first.snapshot_name
    assert 1 * MiB <= second.bytes_transferred < 2 * MiB  # only the change crossed
    assert_same(zfs_source, src, zfs_target, dst, second.snapshot_name)

    third = replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport))
    assert third.base_snapshot == second.snapshot_name
    assert third.bytes_transferred < 64 * 1024  # nothing changed: an empty incremental
    assert guids(zfs_target, dst)[third.snapshot_name] == guids(zfs_source, src)[third.snapshot_name]


def test_same_job_twice_is_a_no_op(backend: ZFSReplicationReal, zfs_source: ZFSHost, zfs_target: ZFSHost,
                                   names: tuple[str, str]) -> None:
    src, dst = names
    write(zfs_source, src, "a", 2 * MiB)
    req = request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "local")
    first = replicate(backend, req)
    again = replicate(backend, req)
    assert again.snapshot_name == first.snapshot_name and again.bytes_transferred == 0
    assert len(guids(zfs_source, src)) == 1


@pytest.mark.parametrize("transport", ["ssh", "paramiko"])
def test_retry_after_interrupted_attempt(backend: ZFSReplicationReal, zfs_source: ZFSHost, zfs_target: ZFSHost,
                                         names: tuple[str, str], source_mode: str, transport: str) -> None:
    src, dst = names
    write(zfs_source, src, "disk-flat.vmdk", 48 * MiB)
    req = request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport)

    def die(p: ReplicationProgress) -> None:
        if p.bytes_transferred > 2 * MiB:
            raise Interrupted()

    with pytest.raises(Interrupted):
        replicate(backend, req, die)
    before = guids(zfs_source, src)
    assert len(before) == 1  # the attempt's snapshot stays for the retry
    outcome = replicate_retrying(backend, req)
    assert guids(zfs_source, src) == before  # the retry reused it
    assert outcome.snapshot_name in before
    assert_same(zfs_source, src, zfs_target, dst, outcome.snapshot_name)


def test_diverged_target_is_refused_and_nothing_destroyed(backend: ZFSReplicationReal, zfs_source: ZFSHost,
                                                          zfs_target: ZFSHost, names: tuple[str, str]) -> None:
    src, dst = names
    write(zfs_source, src, "a", 2 * MiB)
    replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "ssh"))
    zfs_target.run(["zfs", "snapshot", f"{dst}@operator-made"])
    write(zfs_source, src, "b", 1 * MiB)
    src_before, dst_before = guids(zfs_source, src), guids(zfs_target, dst)
    with pytest.raises(PermanentError, match="diverged.*operator-made.*never rolls back"):
        replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "ssh"))
    assert guids(zfs_source, src) == src_before  # refused before snapshotting
    assert guids(zfs_target, dst) == dst_before


def test_modified_target_is_refused(backend: ZFSReplicationReal, zfs_source: ZFSHost, zfs_target: ZFSHost,
                                    names: tuple[str, str]) -> None:
    src, dst = names
    write(zfs_source, src, "a", 2 * MiB)
    replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "local"))
    where = mountpoint("dr-" + uuid.uuid4().hex[:8])
    zfs_target.run(["zfs", "set", f"mountpoint={where}", dst])
    zfs_target.run(["zfs", "mount", dst], check=False)
    write(zfs_target, dst, "someone-wrote-here", 4096)
    write(zfs_source, src, "b", 1 * MiB)
    dst_before = guids(zfs_target, dst)
    with pytest.raises(PermanentError, match="changed since its newest snapshot"):
        replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "local"))
    assert guids(zfs_target, dst) == dst_before
    assert os.path.exists(os.path.join(where, "someone-wrote-here"))


def test_target_without_common_snapshot_is_refused(backend: ZFSReplicationReal, zfs_source: ZFSHost,
                                                   zfs_target: ZFSHost, names: tuple[str, str]) -> None:
    src, dst = names
    write(zfs_source, src, "a", 1 * MiB)
    zfs_target.run(["zfs", "create", "-o", "mountpoint=none", dst])
    zfs_target.run(["zfs", "snapshot", f"{dst}@unrelated"])
    with pytest.raises(PermanentError, match="shares no snapshot.*never does that"):
        replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "local"))
    assert list(guids(zfs_target, dst)) == ["unrelated"]


@pytest.mark.parametrize("field,bad", [
    ("source_dataset", "tank/vm;touch /tmp/pwned"),
    ("source_dataset", "-o mountpoint=/ tank"),
    ("target_dataset", "dr/$(reboot)"),
    ("target_dataset", "dr/a b"),
])
def test_malicious_names_rejected_before_any_process(backend: ZFSReplicationReal, zfs_source: ZFSHost,
                                                     zfs_target: ZFSHost, monkeypatch: pytest.MonkeyPatch,
                                                     field: str, bad: str) -> None:
    started: list[object] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr(paramiko.SSHClient, "connect", lambda *a, **k: started.append(a))
    kwargs = {"source_dataset": f"{zfs_source.pool}/ok", "target_dataset": f"{zfs_target.pool}/dr/ok", field: bad}
    req = request(str(uuid.uuid4()), kwargs["source_dataset"], kwargs["target_dataset"], zfs_target, zfs_source, "ssh")
    expected = "protection_groups.source_dataset" if field == "source_dataset" else "replication_jobs.target_dataset"
    with pytest.raises(PermanentError, match=expected):
        replicate(backend, req)
    assert started == []


def test_host_key_mismatch_shows_both_fingerprints(zfs_source: ZFSHost, zfs_target: ZFSHost,
                                                   names: tuple[str, str], tmp_path: object) -> None:
    keyfile = os.path.join(str(tmp_path), "other")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keyfile], check=True)
    with open(keyfile + ".pub") as fh:
        other = fh.read().split()
    wrong = SSHEndpoint(zfs_target.ssh_host, zfs_target.ssh_port, "root", "key-0", f"{other[0]} {other[1]}")
    src, dst = names
    req = ReplicationRequest(str(uuid.uuid4()), src, dst, "ssh", wrong, None, None, None)
    with pytest.raises(PermanentError, match="host key mismatch") as info:
        ZFSReplicationReal(secret_env(zfs_target)).replicate(req, lambda p: None, threading.Event())
    assert str(info.value).count("SHA256:") == 2
    assert guids(zfs_source, src) == {}  # nothing ran on the source


def test_auth_failure_and_refused_connection(zfs_source: ZFSHost, zfs_target: ZFSHost,
                                             names: tuple[str, str], tmp_path: object) -> None:
    keyfile = os.path.join(str(tmp_path), "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keyfile], check=True)
    from handlers.secrets import SecretResolver
    with open(keyfile) as fh:
        resolver = SecretResolver({"ZERFAUX_SECRET_KEY_0": fh.read()})
    src, dst = names
    req = ReplicationRequest(str(uuid.uuid4()), src, dst, "ssh", endpoint(zfs_target, "key-0"), None, None, None)
    with pytest.raises(PermanentError, match="authentication"):
        ZFSReplicationReal(resolver).replicate(req, lambda p: None, threading.Event())
    closed = SSHEndpoint("127.0.0.1", 9, "root", "key-0", zfs_target.host_key)
    req = ReplicationRequest(str(uuid.uuid4()), src, dst, "ssh", closed, None, None, None)
    with pytest.raises(TransientError, match="cannot reach"):
        ZFSReplicationReal(secret_env(zfs_target)).replicate(req, lambda p: None, threading.Event())


@pytest.mark.parametrize("transport", ["ssh", "paramiko", "syncoid"])
def test_cancel_stops_within_seconds(backend: ZFSReplicationReal, zfs_source: ZFSHost, zfs_target: ZFSHost,
                                     names: tuple[str, str], source_mode: str, transport: str) -> None:
    src, dst = names
    write(zfs_source, src, "a", 2 * MiB)
    first = replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport))
    write(zfs_source, src, "b", 96 * MiB)
    cancel = threading.Event()
    started = [0.0]

    def cancel_on_first_bytes(p: ReplicationProgress) -> None:
        if p.bytes_transferred > 0 and not cancel.is_set():
            started[0] = time.monotonic()
            cancel.set()

    if transport == "syncoid":  # pv reports every half second: cancel from outside instead
        threading.Timer(1.0, lambda: (started.__setitem__(0, time.monotonic()), cancel.set())).start()
    with pytest.raises(OperationCancelled):
        replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport),
                  cancel_on_first_bytes, cancel)
    assert time.monotonic() - started[0] < 5
    assert first.snapshot_name in guids(zfs_source, src)  # the chain is intact
    assert len(guids(zfs_source, src)) == 2
    time.sleep(0.5)
    assert list(guids(zfs_target, dst)) == [first.snapshot_name]  # no partial snapshot on the target
    # The next job converges (a transient "not there yet" is retried, as the dispatcher would).
    final = replicate_retrying(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, source_mode, transport))
    assert_same(zfs_source, src, zfs_target, dst, final.snapshot_name)


def test_retention_keeps_what_it_must(backend: ZFSReplicationReal, zfs_source: ZFSHost, zfs_target: ZFSHost,
                                      names: tuple[str, str]) -> None:
    src, dst = names
    made = []
    for i in range(5):
        write(zfs_source, src, f"f{i}", 256 * 1024)
        if i == 1:
            zfs_source.run(["zfs", "snapshot", f"{src}@operator-daily"])  # not ours: never pruned
        outcome = replicate(backend, request(str(uuid.uuid4()), src, dst, zfs_target, zfs_source, "ssh", retention=2))
        made.append(outcome.snapshot_name)
        if i == 0:
            zfs_source.run(["zfs", "hold", "keep-me", f"{src}@{outcome.snapshot_name}"])
        time.sleep(1.05)  # snapshot names carry the second
    on_source, on_target = guids(zfs_source, src), guids(zfs_target, dst)
    assert set(on_source) == {made[0], "operator-daily", made[3], made[4]}  # held, foreign, newest two
    assert set(on_target) == {made[3], made[4]}  # -i sends no intermediate snapshot; nothing held there
    zfs_source.run(["zfs", "release", "keep-me", f"{src}@{made[0]}"])
