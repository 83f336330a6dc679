"""A recursive group through the real dispatcher: ``protection_groups.recursive`` set on the row,
the job replicates the dataset tree on zfs-fuse, and the job's row tells what happened to a child
removed on the source (kept on the target, named in ``notes``)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import GROUP, operations
from tests.integration.test_zfs_dispatch import Real, real
from tests.integration.test_zfs_trees import destroy_on_source
from tests.support.engine import drain, engine_settings
from tests.support.platforms import FUSE_LOCAL, MiB, Platform, checksums, guids, write

pytestmark = [pytest.mark.zfs, pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)]

__all__ = ["real"]  # the fixture, shared with test_zfs_dispatch.py


async def test_recursive_group_replicates_its_tree(real: Real, platform: Platform) -> None:
    source, target = platform.source, platform.target
    for child in ("os", "data", "data/logs"):
        source.run(["zfs", "create", f"{real.source}/{child}"])
        write(source, f"{real.source}/{child}", "disk-flat.vmdk", 1 * MiB)
    real.db.sql("update protection_groups set recursive = true where id = %s", (GROUP,))
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    first = real.db.one("select * from replication_jobs")
    assert first["status"] == "completed", first["error"]
    assert first["bytes_transferred"] >= 3 * MiB
    snap = first["snapshot_name"]
    # The operation's result names the children of the group snapshot, parent before child.
    result = operations(real.db, "replication.run")[0]["result"]
    assert result["children"] == ["data", "os", "data/logs"], result
    # One recovery point for the group snapshot, named by the top dataset's GUID, its bytes the tree's.
    points = real.db.sql("select * from recovery_points where protection_group_id = %s", (GROUP,))
    assert [(p["snapshot_name"], p["guid"], p["on_target"]) for p in points] == [
        (snap, str(guids(source, real.source)[snap]), True)]
    assert points[0]["bytes"] == first["bytes_transferred"]
    for child in ("", "/os", "/data", "/data/logs"):
        assert guids(target, real.target + child)[snap] == guids(source, real.source + child)[snap]
        assert checksums(target, f"{real.target}{child}@{snap}") == checksums(source, f"{real.source}{child}@{snap}")

    destroy_on_source(platform, f"{real.source}/data/logs")
    real.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await drain(engine_settings(real.db.url, **real.env), timeout=120)
    second = real.db.one("select * from replication_jobs order by created_at desc limit 1")
    assert second["status"] == "completed", second["error"]
    assert second["base_snapshot"] == snap
    assert snap in guids(target, f"{real.target}/data/logs")  # never destroyed
    notes = second["notes"] or ""  # the job's notes, one text
    assert f"{real.target}/data/logs" in notes and "never destroys" in notes, notes
