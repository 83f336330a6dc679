"""A partition in the middle of a send to OpenZFS (the QEMU guest): the retry resumes from the token.

The guest is reached through QEMU's port forward on loopback, not through the namespace of
tests/support/netns.py, so the partition here is the loopback relay's ``cut()``
(tests/support/tcp_proxy.py): every byte stops both ways and the sockets stay open, as on a link
that went dark, for 45 s (longer than the ssh client waits for a silent server, so the attempt
fails and the retry has something to resume). The target's bandwidth limit (3 MB/s) makes the send last long enough to be cut.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import GROUP, TARGET
from tests.support.engine import engine_settings, eventually, running
from tests.support.openzfs import OpenZFSHost
from tests.support.pg import Database
from tests.support.platforms import MiB, checksums, create_dataset, guids, held, resume_token, write
from tests.support.tcp_proxy import TcpProxy, tcp_proxy

pytestmark = [pytest.mark.zfs, pytest.mark.openzfs]

# Longer than the WAN tests' 30 s: ssh gives up on a silent server after 30-40 s (ServerAliveInterval=10,
# ServerAliveCountMax=3), and a 30 s cut that it rides out resumes nothing.
PARTITION_SECONDS = 45.0


@pytest.fixture
def cut_link(openzfs_target: OpenZFSHost) -> Iterator[TcpProxy]:
    with tcp_proxy("127.0.0.1", openzfs_target.ssh_port) as proxy:
        yield proxy


async def test_a_partition_mid_send_resumes_on_openzfs(
        world: Database, openzfs_source: OpenZFSHost, openzfs_target: OpenZFSHost, cut_link: TcpProxy,
        tmp_path: Path) -> None:
    source_host, target_host = openzfs_source, openzfs_target
    tag = uuid.uuid4().hex[:8]
    source, root = f"{source_host.pool}/vm{tag}", f"{target_host.pool}/dr{tag}"
    replica = f"{root}/vm{tag}"
    create_dataset(source_host, source, "wan-" + tag)
    target_host.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    for name, host in (("dr-key", target_host), ("src-key", source_host)):
        (secrets / name).write_text(host.private_key)
        (secrets / name).chmod(0o600)
    world.sql(
        "update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
        " ssh_host_key = %s, target_root = %s, transport = 'ssh', bandwidth_limit_mbps = 24 where id = %s",
        (cut_link.host, cut_link.port, target_host.ssh_user, target_host.host_key, root, TARGET),
    )
    world.sql("update protection_groups set source_dataset = %s, source_ssh_host = %s, source_ssh_port = %s,"
              " source_ssh_user = %s, source_ssh_key_secret = 'src-key', source_ssh_host_key = %s where id = %s",
              (source, source_host.ssh_host, source_host.ssh_port, source_host.ssh_user, source_host.host_key, GROUP))
    env = {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets)}
    try:
        write(source_host, source, "disk-flat.vmdk", 40 * MiB)
        job = world.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
        async with running(engine_settings(world.url, **env)):
            await eventually(lambda: world.value("select bytes_transferred > 8 * 1024 * 1024 from replication_jobs"
                                                 " where id = %s", (job,)), timeout=120, interval=0.2)
            cut_link.cut()
            try:
                cut_at = time.monotonic()
                await eventually(lambda: time.monotonic() - cut_at > PARTITION_SECONDS, timeout=PARTITION_SECONDS + 5)
                failed = world.one("select attempts, last_error from zerfaux.operations where subject_id = %s", (job,))
            finally:
                cut_link.restore()
            # The killed attempt's partial receive is still there: the retry resumes from it.
            await eventually(lambda: world.value("select status from replication_jobs where id = %s", (job,))
                             in ("completed", "failed"), timeout=240, interval=0.5)
        row = world.one("select * from replication_jobs where id = %s", (job,))
        op = world.one("select attempts from zerfaux.operations where subject_id = %s", (job,))
        assert row["status"] == "completed", row["error"]
        print(f"openzfs: {op['attempts']} attempt(s), at the heal {failed}; notes: {row['notes']}")
        assert op["attempts"] >= 2, "the partition did not fail the attempt: nothing was resumed"
        assert "resumed" in (row["notes"] or ""), row["notes"]
        # The resumed attempt sent what was left (a full stream is more than the 40 MiB written).
        assert 0 < row["bytes_transferred"] < 0.9 * 40 * MiB, row["bytes_transferred"]
        snap = row["snapshot_name"]
        assert guids(target_host, replica)[snap] == guids(source_host, source)[snap]
        assert checksums(target_host, f"{replica}@{snap}") == checksums(source_host, f"{source}@{snap}")
        assert resume_token(target_host, replica) is None
        assert not held(source_host, f"{source}@{snap}")
    finally:
        source_host.run(["zfs", "destroy", "-R", source], check=False)
        target_host.run(["zfs", "destroy", "-R", root], check=False)
