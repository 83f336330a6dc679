"""`zerfaux status` (its groups) and `zerfaux report rpo` through the real CLI in a subprocess."""

from __future__ import annotations

import json
import re

from tests.acceptance.test_cli import finish
from tests.integration.conftest import GROUP
from tests.support.engine import spawn
from tests.support.pg import Database


def test_status_lists_groups_worst_first_with_their_rpo(seeded_db: Database) -> None:
    db = seeded_db
    db.sql("update protection_groups set paused = false where id = %s", (GROUP,))
    # the seed's gold (RPO 15 min): newest point on the target 20 min old, its last job failed
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
           " values (%s, 'zerfaux-a', '1', now() - interval '20 minutes')", (GROUP,))
    db.sql("insert into replication_jobs (protection_group_id, status, error) values"
           " (%s, 'failed', %s)", (GROUP, "cannot reach dr-zfs-01:22 over SSH\n(connection refused); " + "x" * 200))
    db.sql("insert into protection_groups (name, rpo_minutes, paused) values ('silver', 240, true)")
    code, out = finish(spawn(db.url, "status"), sig=None, timeout=30)
    assert code == 0, out
    assert "Protection groups: 2 (1 violated, 0 at risk, 0 ok, 1 unknown; 1 paused)" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("GROUP"))
    gold = next(line for line in out.splitlines() if line.lstrip().startswith("gold "))
    silver = next(line for line in out.splitlines() if line.lstrip().startswith("silver "))
    assert out.index(gold) < out.index(silver)  # the violated group first
    assert re.match(r"\s+gold\s+15m\s+20\.\d+m\s+VIOLATED\s+(-|due|in \S+)\s+cannot reach dr-zfs-01:22 over SSH \(connection", gold)
    assert gold.endswith("...") and len(gold) < 140  # the error on one line, shortened
    assert re.match(r"\s+silver\s+4h\s+-\s+unknown \(paused\)", silver)
    assert header.index("STATUS") == gold.index("VIOLATED") == silver.index("unknown")  # columns line up


def test_status_with_no_groups(db: Database) -> None:
    code, out = finish(spawn(db.url, "status"), sig=None, timeout=30)
    assert code == 0, out
    assert "Protection groups: none" in out


def test_report_rpo_prints_each_group_and_json_for_scripts(db: Database) -> None:
    gid = db.value("insert into protection_groups (name, rpo_minutes) values ('gap', 15) returning id")
    db.sql("insert into recovery_points (protection_group_id, snapshot_name, guid, created_at)"
           " select %s, 's' || m, m::text, timestamptz '2026-11-30 22:00+00' + m * interval '1 minute'"
           " from unnest(array[0, 10, 20, 30, 60, 70, 80, 90, 100, 110]) m", (gid,))
    db.sql("insert into protection_groups (name, rpo_minutes) values ('never', 5)")
    code, out = finish(spawn(db.url, "report", "rpo", "--days", "1", "--until", "2026-12-01T00:00:00Z", "--json"),
                       sig=None, timeout=30)
    assert code == 0, out
    report = json.loads(out)
    assert report["from"] == "2026-11-30T00:00:00+00:00" and report["until"] == "2026-12-01T00:00:00+00:00"
    gap, never = report["groups"]
    # 22:00 to 24:00 observed (before the first point: unknown); 22:45 to 23:00 violated
    assert {k: gap[k] for k in ("name", "observed_seconds", "within_seconds", "within_share", "worst_rpo_seconds",
                                "violations", "longest_violation_seconds", "unknown_seconds")} == {
        "name": "gap", "observed_seconds": 7200.0, "within_seconds": 6300.0, "within_share": 0.875,
        "worst_rpo_seconds": 1800.0, "violations": 1, "longest_violation_seconds": 900.0,
        "unknown_seconds": 79200.0}
    assert never["name"] == "never" and never["within_share"] is None and never["unknown_seconds"] == 86400.0

    code, out = finish(spawn(db.url, "report", "rpo", "--days", "1", "--until", "2026-12-01T00:00:00"),
                       sig=None, timeout=30)
    assert code == 0, out
    assert "RPO compliance from 2026-11-30 00:00 to 2026-12-01 00:00 UTC (24.0h)" in out
    assert re.search(r"^\s+gap\s+15m\s+87\.50%\s+30\.0m\s+1\s+15\.0m\s+-\s+22\.0h$", out, re.MULTILINE), out
    assert re.search(r"^\s+never\s+5m\s+-\s+-\s+0\s+-\s+-\s+24\.0h$", out, re.MULTILINE), out


def test_report_rpo_refuses_a_bad_window(db: Database) -> None:
    code, out = finish(spawn(db.url, "report", "rpo", "--days", "0"), sig=None, timeout=30)
    assert code == 2 and "--days must be a number of days above 0" in out
    code, out = finish(spawn(db.url, "report", "rpo", "--until", "yesterday"), sig=None, timeout=30)
    assert code == 2 and "--until must be an ISO 8601 time" in out
