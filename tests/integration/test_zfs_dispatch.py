"""replication.run through the real dispatcher with ZERFAUX_USE_STUBS=false: rows in, ZFS out.

On zfs-fuse with the source on the listener's machine, and on OpenZFS in the QEMU guest with the
source and the target both reached over SSH (the group's source_ssh_* columns). Includes the crash
that matters most: a listener SIGKILLed in the middle of a send, and the retry (by another listener,
once the lease expires) completing with identical data; on OpenZFS the retry resumes from the
target's receive_resume_token and releases the holds the killed attempt left.
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import GROUP, TARGET
from tests.support.engine import drain, engine_settings, eventually, running, spawn
from tests.support.pg import Database
from tests.support.platforms import (
    FUSE_LOCAL,
    OPENZFS,
    MiB,
    Platform,
    checksums,
    create_dataset,
    guids,
    held,
    resume_token,
    write,
)
from tests.support.workload import Proc
from tests.support.zfshost import ZFSHost

pytestmark = [pytest.mark.zfs, pytest.mark.parametrize("platform", [FUSE_LOCAL, OPENZFS], indirect=True)]


@dataclass
class Real:
    db: Database
    env: dict[str, str]
    source: str
    target_root: str

    @property
    def target(self) -> str:
        return f"{self.target_root}/{self.source.rsplit('/', 1)[1]}"


@pytest.fixture
def real(world: Database, platform: Platform, tmp_path: Path) -> Iterator[Real]:
    source_host, target_host = platform.source, platform.target
    tag = uuid.uuid4().hex[:8]
    source = f"{source_host.pool}/vm{tag}"
    root = f"{target_host.pool}/dr{tag}"
    create_dataset(source_host, source, "dispatch-" + tag)
    target_host.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for name, host in (("dr-key", target_host), ("src-key", source_host)):
        (secrets / name).write_text(host.private_key)
        (secrets / name).chmod(0o600)
    world.sql(
        "update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
        " ssh_host_key = %s, target_root = %s, transport = 'ssh' where id = %s",
        (target_host.ssh_host, target_host.ssh_port, target_host.ssh_user, target_host.host_key, root, TARGET),
    )
    world.sql("update protection_groups set source_dataset = %s, rpo_minutes = null, retention_snapshots = 3"
              " where id = %s", (source, GROUP))
    if platform.mode == "ssh":
        world.sql("update protection_groups set source_ssh_host = %s, source_ssh_port = %s, source_ssh_user = %s,"
                  " source_ssh_key_secret = 'src-key', source_ssh_host_key = %s where id = %s",
                  (source_host.ssh_host, source_host.ssh_port, source_host.ssh_user, source_host.host_key, GROUP))
    yield Real(world, {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets)}, source, root)
    source_host.run(["zfs", "destroy", "-R", source], check=False)
    target_host.run(["zfs", "destroy", "-R", root], check=False)


def same_data(real: Real, source: ZFSHost, target: ZFSHost, snap: str) -> None:
    assert guids(target, real.target)[snap] == guids(source, real.source)[snap]
    assert checksums(target, f"{real.target}@{snap}") == checksums(source, f"{real.source}@{snap}")


async def test_jobs_replicate_through_the_dispatcher(real: Real, platform: Platform) -> None:
    zfs_source, zfs_target = platform.source, platform.target
    write(zfs_source, real.source, "disk-flat.vmdk", platform.size(8, 8))
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    first = real.db.one("select * from replication_jobs")
    assert first["status"] == "completed", first["error"]
    assert first["target_dataset"] == real.target and first["bytes_transferred"] > 8 * MiB
    same_data(real, zfs_source, zfs_target, first["snapshot_name"])

    write(zfs_source, real.source, "delta", 1 * MiB)
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    second = real.db.one("select * from replication_jobs order by created_at desc limit 1")
    assert second["status"] == "completed", second["error"]
    assert second["base_snapshot"] == first["snapshot_name"]
    assert second["bytes_transferred"] < 2 * MiB
    same_data(real, zfs_source, zfs_target, second["snapshot_name"])


async def test_a_diverged_target_fails_the_job_in_words(real: Real, platform: Platform) -> None:
    zfs_target = platform.target
    zfs_source = platform.source
    write(zfs_source, real.source, "a", 1 * MiB)
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    zfs_target.run(["zfs", "snapshot", f"{real.target}@made-at-dr"])
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    row = real.db.one("select status, error, attempts from replication_jobs order by created_at desc limit 1")
    assert row["status"] == "failed" and "diverged" in row["error"] and "made-at-dr" in row["error"]
    assert "made-at-dr" in guids(zfs_target, real.target)


async def test_sigkill_mid_send_then_the_retry_completes_with_identical_data(real: Real, platform: Platform) -> None:
    source, target = platform.source, platform.target
    write(source, real.source, "disk-flat.vmdk", platform.size(384, 40))
    listener = spawn(real.db.url, "run", env=real.env)
    try:
        job = real.db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
        # Half way where the estimate says (resume then has visibly less to do), else at the first bytes.
        await eventually(lambda: real.db.value("select bytes_transferred > coalesce(bytes_estimated / 2, 0)"
                                               " from replication_jobs"), timeout=120)
        listener.send_signal(signal.SIGKILL)
    finally:
        listener.kill()
        listener.communicate(timeout=30)
    crashed = real.db.one("select status, snapshot_name, bytes_estimated from replication_jobs")
    assert crashed["status"] == "running"  # nobody finished it
    snaps_after_crash = guids(source, real.source)
    assert len(snaps_after_crash) == 1
    if platform.has("resume"):
        # The killed listener's ssh ends die with their pipes; the receive keeps what it got.
        assert await eventually(lambda: resume_token(target, real.target), timeout=60)
    if platform.has("hold"):  # SIGKILL leaves the attempt's hold: the retry of the same job releases it
        assert held(source, f"{real.source}@{crashed['snapshot_name']}")

    async with running(engine_settings(real.db.url, **real.env)):
        await eventually(lambda: real.db.value("select status from replication_jobs") in ("completed", "failed"),
                         timeout=180, interval=0.5)
    row = real.db.one("select * from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed", row["error"]
    assert guids(source, real.source) == snaps_after_crash  # the retry reused the crashed attempt's snapshot
    assert row["snapshot_name"] in snaps_after_crash
    same_data(real, source, target, row["snapshot_name"])
    assert not held(source, f"{real.source}@{row['snapshot_name']}")
    if platform.has("resume"):
        assert "resumed" in (row["notes"] or ""), row["notes"]
        full = crashed["bytes_estimated"]
        assert full and row["bytes_estimated"], (crashed, row["bytes_estimated"])
        assert 0 < row["bytes_transferred"] < 0.6 * full, (row["bytes_transferred"], full)
        assert resume_token(target, real.target) is None
    else:
        assert "resume not supported" in (row["notes"] or ""), row["notes"]
    # The killed listener's private-key directory was swept by the next backend to start.
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"zerfaux-ssh-{listener.pid}-")]


async def test_sigterm_mid_send_keeps_the_partial_receive_and_the_next_listener_resumes(
        real: Real, platform: Platform) -> None:
    """A deploy (SIGTERM) stops, it does not cancel: no zfs receive -A, the holds stay, the next
    listener resumes from the token (OpenZFS) and sends well under a full stream."""
    source, target = platform.source, platform.target
    write(source, real.source, "disk-flat.vmdk", platform.size(384, 40))
    listener = Proc(real.db.url, "run", env={**real.env, "ZERFAUX_WORKER_ID": "deployed",
                                              "ZERFAUX_SHUTDOWN_GRACE_SECONDS": "0"})
    try:
        listener.wait_for_line("listening as")
        job = real.db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
        await eventually(lambda: real.db.value("select bytes_transferred > coalesce(bytes_estimated / 2, 0)"
                                               " from replication_jobs"), timeout=120)
        listener.popen.send_signal(signal.SIGTERM)
        code = listener.wait(60)
    finally:
        listener.stop(signal.SIGKILL)
    assert code == 0, listener.output[-3000:]
    stopped = real.db.one("select snapshot_name, bytes_estimated from replication_jobs where id = %s", (job,))
    op = real.db.one("select status, attempts, last_error from zerfaux.operations where kind = 'replication.run'")
    assert (op["status"], op["attempts"]) == ("queued", 0), op  # released for the next listener (the attempt given back)
    snaps = guids(source, real.source)
    assert list(snaps) == [stopped["snapshot_name"]]
    if platform.has("resume"):
        assert resume_token(target, real.target), "a stop must not run zfs receive -A"
        before = token_guid(source, str(resume_token(target, real.target)))
    if platform.has("hold"):  # kept for the next attempt, which releases them
        assert held(source, f"{real.source}@{stopped['snapshot_name']}")

    async with running(engine_settings(real.db.url, **real.env)):
        await eventually(lambda: real.db.value("select status from replication_jobs") in ("completed", "failed"),
                         timeout=180, interval=0.5)
    row = real.db.one("select * from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed", row["error"]
    assert row["snapshot_name"] == stopped["snapshot_name"] and guids(source, real.source) == snaps
    same_data(real, source, target, row["snapshot_name"])
    assert not held(source, f"{real.source}@{row['snapshot_name']}")
    if platform.has("resume"):
        assert before == guids(source, real.source)[row["snapshot_name"]]  # the token was for our snapshot
        assert "resumed" in (row["notes"] or ""), row["notes"]
        full = stopped["bytes_estimated"]
        assert full and 0 < row["bytes_transferred"] < 0.6 * full, (row["bytes_transferred"], full)
        assert resume_token(target, real.target) is None


def token_guid(source: ZFSHost, token: str) -> int:
    """The GUID of the snapshot a partial receive is for, from ``zfs send -nv -t`` of its token."""
    out = source.run(["zfs", "send", "-nv", "-t", token], check=False)
    text = (out.stdout + out.stderr).decode()
    line = next(line for line in text.splitlines() if line.strip().startswith("toguid"))
    return int(line.split("=")[1].strip(), 0)
