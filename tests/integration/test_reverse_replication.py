"""Reverse replication (after a reprotect) through the real dispatcher: a replication_jobs row on a group
whose direction is 'reverse' sends the DR replica back to the primary's dataset, incrementally from the
newest common snapshot, and the recovery points keep their sides (on_source: the primary's host).

zfs-fuse with both sites over the run's sshd, and OpenZFS in the QEMU guest. Checked on the hosts:
``zfs get guid`` on both ends, the file DR wrote readable in the primary's snapshot, and the bytes
sent: the delta only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import GROUP, TARGET
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.platforms import FUSE_SSH, OPENZFS, MiB, Platform, checksums, create_dataset, guids, mount, write

pytestmark = [pytest.mark.zfs, pytest.mark.parametrize("platform", [FUSE_SSH, OPENZFS], indirect=True)]


@dataclass
class Sites:
    db: Database
    env: dict[str, str]
    primary: str
    replica: str


@pytest.fixture
def sites(world: Database, platform: Platform, tmp_path: Path) -> Iterator[Sites]:
    source_host, target_host = platform.source, platform.target
    tag = uuid.uuid4().hex[:8]
    primary, root = f"{source_host.pool}/rv{tag}", f"{target_host.pool}/rvdr{tag}"
    create_dataset(source_host, primary, "reverse-" + tag)
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
    world.sql("update protection_groups set source_dataset = %s, rpo_minutes = null, retention_snapshots = 5,"
              " source_ssh_host = %s, source_ssh_port = %s, source_ssh_user = %s, source_ssh_key_secret = 'src-key',"
              " source_ssh_host_key = %s where id = %s",
              (primary, source_host.ssh_host, source_host.ssh_port, source_host.ssh_user, source_host.host_key, GROUP))
    replica = world.one("select target_root || '/' || g.replica_name as r from protection_groups g"
                        " join replication_targets t on t.id = g.replication_target_id where g.id = %s", (GROUP,))["r"]
    yield Sites(world, {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets)}, primary, replica)
    source_host.run(["zfs", "destroy", "-R", primary], check=False)
    target_host.run(["zfs", "destroy", "-R", root], check=False)


async def job(s: Sites) -> dict[str, object]:
    s.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(s.db.url, **s.env), timeout=300)
    row = s.db.one("select * from replication_jobs order by created_at desc limit 1")
    assert row["status"] == "completed", row["error"]
    return dict(row)


def points(s: Sites) -> dict[str, tuple[bool, bool]]:
    rows = s.db.sql("select snapshot_name, on_source, on_target from recovery_points where protection_group_id = %s",
                    (GROUP,))
    return {r["snapshot_name"]: (r["on_source"], r["on_target"]) for r in rows}


async def test_a_reverse_job_sends_only_what_dr_wrote_back_to_the_primary(sites: Sites, platform: Platform) -> None:
    s, primary_host, dr_host = sites, platform.source, platform.target
    write(primary_host, s.primary, "disk-flat.vmdk", platform.size(16, 8))
    first = await job(s)
    write(primary_host, s.primary, "more.log", 256 * 1024)
    common = await job(s)
    assert common["base_snapshot"] == first["snapshot_name"]
    # An older point the primary no longer has (destroyed there by hand): DR only.
    primary_host.run(["zfs", "destroy", f"{s.primary}@{first['snapshot_name']}"])

    # The migration: the primary stops (read-only, unmounted), DR's VMs write to the replica.
    primary_host.run(["zfs", "set", "readonly=on", s.primary])
    primary_host.run(["zfs", "umount", s.primary], check=False)
    mount(dr_host, s.replica, "reverse-dr-" + uuid.uuid4().hex[:6])
    write(dr_host, s.replica, "dr-wrote.log", 1 * MiB)
    s.db.sql("update protection_groups set direction = 'reverse' where id = %s", (GROUP,))

    back = await job(s)
    # The row keeps its columns' meaning: source_dataset is the primary's, target_dataset the replica.
    assert (back["source_dataset"], back["target_dataset"]) == (s.primary, s.replica)
    assert back["base_snapshot"] == common["snapshot_name"]
    snap = str(back["snapshot_name"])
    assert guids(primary_host, s.primary)[snap] == guids(dr_host, s.replica)[snap]
    sent, size = int(back["bytes_transferred"]), platform.size(16, 8)  # type: ignore[call-overload]
    assert 1 * MiB <= sent < size / 4, (sent, size)
    on_primary = checksums(primary_host, f"{s.primary}@{snap}")
    assert "dr-wrote.log" in on_primary and on_primary == checksums(dr_host, f"{s.replica}@{snap}")
    # Physical sides: on_source = on the primary's host, on_target = on the DR host.
    seen = points(s)
    assert seen[snap] == (True, True)
    assert seen[str(common["snapshot_name"])] == (True, True)
    assert seen[str(first["snapshot_name"])] == (False, True)
