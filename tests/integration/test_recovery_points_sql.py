"""zerfaux.complete_replication_run's upsert of recovery_points, on real Postgres with hand-made results.

What the backend's listing says becomes the rows; what it no longer names is removed; a result
without a listing, a partial one, or one of a job that replicated another dataset changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from tests.integration.conftest import GROUP
from tests.support.pg import Database

BIG = str(2**64 - 3)  # ZFS GUIDs use all 64 bits


def point(name: str, guid: str, src: bool = True, tgt: bool = True, size: int | None = None) -> dict[str, Any]:
    return {"snapshot_name": name, "guid": guid, "created_at": "2026-12-01T10:00:00+00:00", "bytes": size,
            "on_source": src, "on_target": tgt}


def complete(db: Database, snapshot: str, points: list[dict[str, Any]] | None, **extra: Any) -> str:
    job = str(db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,)))
    result: dict[str, Any] = {"snapshot_name": snapshot, "bytes_transferred": 10, **extra}
    if points is not None:
        result["recovery_points"] = points
    db.sql("select zerfaux.complete_replication_run(%s, %s::jsonb)", (job, json.dumps(result)))
    return job


def rows(db: Database) -> dict[str, dict[str, Any]]:
    return {r["guid"]: r for r in db.sql("select * from recovery_points")}


def test_listing_upserts_and_what_is_gone_is_removed(seeded_db: Database) -> None:
    db = seeded_db
    first = complete(db, "s1", [point("s1", BIG, size=100)])
    second = complete(db, "s2", [point("s1", BIG), point("s2", "7", size=5)])
    got = rows(db)
    assert got[BIG]["bytes"] == 100 and str(got[BIG]["replication_job_id"]) == first  # kept from its own job
    assert got["7"]["bytes"] == 5 and str(got["7"]["replication_job_id"]) == second
    assert got["7"]["replicated_at"] is not None and got["7"]["created_at"].isoformat() == "2026-12-01T10:00:00+00:00"
    # s1 gone from the target (still on the source), then from both.
    complete(db, "s3", [point("s1", BIG, tgt=False), point("s2", "7"), point("s3", "8")])
    assert (rows(db)[BIG]["on_target"], rows(db)[BIG]["on_source"], rows(db)[BIG]["removed_at"]) == (False, True, None)
    complete(db, "s4", [point("s2", "7"), point("s3", "8"), point("s4", "9")])
    gone = rows(db)[BIG]
    assert (gone["on_source"], gone["on_target"]) == (False, False) and gone["removed_at"] is not None


def test_results_that_say_nothing_change_nothing(seeded_db: Database) -> None:
    db = seeded_db
    complete(db, "s1", [point("s1", BIG)])
    complete(db, "s2", None)  # an older backend: no listing
    complete(db, "s3", [point("s3", "8")], recovery_points_partial=True)  # the stub without its world
    assert rows(db)[BIG]["removed_at"] is None and rows(db)["8"]["on_target"]
    job = str(db.value("insert into replication_jobs (protection_group_id, source_dataset) values (%s, 'other/ds')"
                       " returning id", (GROUP,)))
    db.sql("select zerfaux.complete_replication_run(%s, %s::jsonb)",
           (job, json.dumps({"snapshot_name": "x", "recovery_points": [point("x", "99")]})))
    assert "99" not in rows(db) and rows(db)[BIG]["removed_at"] is None
    assert db.value("select status from replication_jobs where id = %s", (job,)) == "completed"
