"""The schedule with real ZFS: zfs-fuse, the target over sshd, a listener in-process with real
backends. A group with a 15-second interval replicates three times by itself; the target holds
each snapshot (same GUID as the source) and recovery_points name them by GUID."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.integration.conftest import GROUP
from tests.integration.test_zfs_dispatch import Real, real  # noqa: F401 - the fixture
from tests.support.engine import engine_settings, eventually, running
from tests.support.platforms import FUSE_LOCAL, MiB, Platform, guids, write

pytestmark = [pytest.mark.zfs, pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)]

DONE = "select count(*) from replication_jobs where origin = 'schedule' and status = 'completed'"


async def test_a_group_with_a_quarter_minute_interval_replicates_three_times_by_itself(
        real: Real, platform: Platform) -> None:  # noqa: F811 - the fixture
    write(platform.source, real.source, "disk-flat.vmdk", 2 * MiB)
    real.db.sql("update protection_groups set paused = false, rpo_minutes = 1, replication_interval_minutes = 0.25,"
                " retention_snapshots = 10 where id = %s", (GROUP,))
    # The default sweep interval: the sweep wakes when the schedule says the group is due.
    async with running(engine_settings(real.db.url, ZERFAUX_SWEEP_SECONDS="5", **real.env)):
        await eventually(lambda: real.db.value(DONE) >= 3, timeout=120, interval=1)
    jobs = real.db.sql("select * from replication_jobs where origin = 'schedule' and status = 'completed'"
                       " order by created_at")
    failed = real.db.sql("select error from replication_jobs where status = 'failed'")
    assert failed == []
    assert real.db.value("select count(*) from replication_jobs where origin = 'request'") == 0
    on_target, on_source = guids(platform.target, real.target), guids(platform.source, real.source)
    names = [j["snapshot_name"] for j in jobs]
    assert len(set(names)) == len(names) >= 3
    for name in names:
        assert on_target[name] == on_source[name]                 # zfs get guid on both hosts
    points = {r["snapshot_name"]: int(r["guid"]) for r in real.db.sql(
        "select snapshot_name, guid from recovery_points where protection_group_id = %s and on_target", (GROUP,))}
    assert {n: points.get(n) for n in names} == {n: on_target[n] for n in names}
    for before, after in zip(jobs, jobs[1:]):
        assert after["base_snapshot"] == before["snapshot_name"]
        assert after["created_at"] - before["started_at"] >= timedelta(seconds=15)
