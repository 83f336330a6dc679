"""Recovery points through the real dispatcher (ZERFAUX_USE_STUBS=false, zfs-fuse, the target over sshd).

Each completed job upserts ``recovery_points`` from the target's listing: rows match what
``zfs get guid`` / ``zfs get creation`` show on the hosts; a snapshot destroyed by hand is noticed
at the next job (``on_target = false`` while the source still has it, ``removed_at`` once neither
side has it); the group's grid reaches the backend (the target keeps all, the source its count).
Stub mode writes recovery points too, with made-up GUIDs.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import GROUP
from tests.integration.test_zfs_dispatch import Real, real  # noqa: F401  (fixture)
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.platforms import FUSE_LOCAL, Platform, guids, write, zfs_get


async def job(r: Real, p: Platform, n: int) -> dict[str, Any]:
    write(p.source, r.source, f"f{n}", 128 * 1024)
    r.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(r.db.url, **r.env), timeout=120)
    row = r.db.one("select * from replication_jobs order by created_at desc limit 1")
    assert row["status"] == "completed", row["error"]
    return row


def points(db: Database) -> dict[str, dict[str, Any]]:
    return {row["snapshot_name"]: row for row in db.sql("select * from recovery_points")}


@pytest.mark.zfs
@pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)
async def test_recovery_points_follow_both_sides(real: Real, platform: Platform) -> None:  # noqa: F811
    r, p = real, platform
    r.db.sql("update protection_groups set retention_snapshots = 3, retention_grid = '1x1h(keep=all)'"
             " where id = %s", (GROUP,))
    jobs = [await job(r, p, 1), await job(r, p, 2)]
    rows = points(r.db)
    on_target = guids(p.target, r.target)
    assert set(rows) == set(on_target) == {j["snapshot_name"] for j in jobs}
    for j in jobs:
        row, name = rows[j["snapshot_name"]], j["snapshot_name"]
        assert row["guid"] == str(on_target[name]) == str(guids(p.source, r.source)[name])
        created = int(zfs_get(p.source, "creation", f"{r.source}@{name}"))
        assert row["created_at"] == datetime.fromtimestamp(created, timezone.utc)
        assert row["replication_job_id"] == j["id"] and row["replicated_at"] is not None
        assert row["bytes"] == j["bytes_transferred"] and row["on_source"] and row["on_target"]
        assert row["removed_at"] is None

    first = jobs[0]["snapshot_name"]
    p.target.run(["zfs", "destroy", f"{r.target}@{first}"])  # by hand, behind Zerfaux's back
    jobs.append(await job(r, p, 3))
    row = points(r.db)[first]
    assert (row["on_source"], row["on_target"], row["removed_at"]) == (True, False, None)

    p.source.run(["zfs", "destroy", f"{r.source}@{first}"])
    jobs.append(await job(r, p, 4))
    row = points(r.db)[first]
    assert (row["on_source"], row["on_target"]) == (False, False) and row["removed_at"] is not None

    # Job 5: the source keeps its newest 3 (no source grid), the target keeps all (its grid).
    jobs.append(await job(r, p, 5))
    second = jobs[1]["snapshot_name"]
    assert second not in guids(p.source, r.source) and second in guids(p.target, r.target)
    row = points(r.db)[second]
    assert (row["on_source"], row["on_target"], row["removed_at"]) == (False, True, None)
    live = {name for name, pt in points(r.db).items() if pt["on_target"]}
    assert live == set(guids(p.target, r.target))
    assert r.db.value("select count(*) from recovery_points where replication_job_id is not null") == 5


@pytest.mark.parametrize("shared_world", [True, False])
async def test_stub_mode_writes_recovery_points(world: Database, tmp_path: Path, shared_world: bool) -> None:
    world.sql("update protection_groups set retention_snapshots = 2 where id = %s", (GROUP,))
    env = {"ZERFAUX_USE_STUBS": "true"} | ({"ZERFAUX_STUB_WORLD": str(tmp_path)} if shared_world else {})
    for _ in range(3):  # a listener each time, as after restarts
        world.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        await drain(engine_settings(world.url, **env))
    done = [r["snapshot_name"] for r in world.sql(
        "select snapshot_name from replication_jobs where status = 'completed' order by created_at")]
    assert len(done) == 3
    rows = points(world)
    assert set(rows) == set(done)
    assert all(int(row["guid"]) > 2**63 - 1 for row in rows.values())  # beyond bigint, as stored text
    # With the shared world the stub knows the whole replica and prunes the oldest (retention 2);
    # without it each listener knows only its own job, and nothing it never saw is marked removed.
    assert [rows[n]["removed_at"] is None for n in done] == ([False, True, True] if shared_world else [True] * 3)
