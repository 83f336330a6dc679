"""replication.run through the real dispatcher with ZERFAUX_USE_STUBS=false: rows in, ZFS out.

Includes the crash that matters most: a listener SIGKILLed in the middle of a send, and the retry
(by another listener, once the lease expires) completing with identical data.
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
from tests.integration.test_zfs_backend import MiB, checksums, guids, write
from tests.support.engine import drain, engine_settings, eventually, running, spawn
from tests.support.pg import Database
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost

pytestmark = pytest.mark.zfs


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
def real(world: Database, zfs_source: ZFSHost, zfs_target: ZFSHost, tmp_path: Path) -> Iterator[Real]:
    if not zfs_source.local:
        pytest.skip("the dispatcher tests use a source on the listener's machine")
    tag = uuid.uuid4().hex[:8]
    source = f"{zfs_source.pool}/vm{tag}"
    root = f"{zfs_target.pool}/dr{tag}"
    zfs_source.run(["zfs", "create", "-o", f"mountpoint={mountpoint('dispatch-' + tag)}", source])
    zfs_target.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    key = secrets / "dr-key"
    key.write_text(zfs_target.private_key)
    key.chmod(0o600)
    world.sql(
        "update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
        " ssh_host_key = %s, target_root = %s, transport = 'ssh' where id = %s",
        (zfs_target.ssh_host, zfs_target.ssh_port, zfs_target.ssh_user, zfs_target.host_key, root, TARGET),
    )
    world.sql("update protection_groups set source_dataset = %s, rpo_minutes = null, retention_snapshots = 3"
              " where id = %s", (source, GROUP))
    yield Real(world, {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets)}, source, root)
    zfs_source.run(["zfs", "destroy", "-r", source], check=False)
    zfs_target.run(["zfs", "destroy", "-r", root], check=False)


def same_data(real: Real, source: ZFSHost, target: ZFSHost, snap: str) -> None:
    assert guids(target, real.target)[snap] == guids(source, real.source)[snap]
    assert checksums(target, f"{real.target}@{snap}") == checksums(source, f"{real.source}@{snap}")


async def test_jobs_replicate_through_the_dispatcher(real: Real, zfs_source: ZFSHost, zfs_target: ZFSHost) -> None:
    write(zfs_source, real.source, "disk-flat.vmdk", 8 * MiB)
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


async def test_a_diverged_target_fails_the_job_in_words(real: Real, zfs_source: ZFSHost, zfs_target: ZFSHost) -> None:
    write(zfs_source, real.source, "a", 1 * MiB)
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    zfs_target.run(["zfs", "snapshot", f"{real.target}@made-at-dr"])
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    row = real.db.one("select status, error, attempts from replication_jobs order by created_at desc limit 1")
    assert row["status"] == "failed" and "diverged" in row["error"] and "made-at-dr" in row["error"]
    assert "made-at-dr" in guids(zfs_target, real.target)


async def test_sigkill_mid_send_then_the_retry_completes_with_identical_data(
    real: Real, zfs_source: ZFSHost, zfs_target: ZFSHost
) -> None:
    write(zfs_source, real.source, "disk-flat.vmdk", 384 * MiB)
    listener = spawn(real.db.url, "run", env=real.env)
    try:
        job = real.db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
        await eventually(lambda: real.db.value("select bytes_transferred from replication_jobs") > 0, timeout=60)
        listener.send_signal(signal.SIGKILL)
    finally:
        listener.kill()
        listener.communicate(timeout=30)
    assert real.db.value("select status from replication_jobs") == "running"  # nobody finished it
    snaps_after_crash = guids(zfs_source, real.source)
    assert len(snaps_after_crash) == 1

    async with running(engine_settings(real.db.url, **real.env)):
        await eventually(lambda: real.db.value("select status from replication_jobs") in ("completed", "failed"),
                         timeout=180, interval=0.5)
    row = real.db.one("select * from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed", row["error"]
    assert guids(zfs_source, real.source) == snaps_after_crash  # the retry reused the crashed attempt's snapshot
    assert row["snapshot_name"] in snaps_after_crash
    same_data(real, zfs_source, zfs_target, row["snapshot_name"])
    # The killed listener's private-key directory was swept by the next backend to start.
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"zerfaux-ssh-{listener.pid}-")]
