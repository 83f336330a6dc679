"""The groups' table of `zerfaux status` and the table of `zerfaux report rpo`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from listener.protection import GroupStatus, RpoCompliance
from listener.report import rpo_table, window
from listener.status import group_table, minutes_text, seconds_text

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def group(name: str, rpo: int | None, current: float | None, status: str, *, paused: bool = False,
          next_in: float | None = None, job: str | None = None, error: str | None = None) -> GroupStatus:
    return GroupStatus(uuid4(), name, rpo, None, current, status,
                       None if next_in is None else NOW + timedelta(seconds=next_in), job, error, paused)


def test_no_groups() -> None:
    assert group_table([], NOW) == ["Protection groups: none"]


def test_worst_first_aligned_with_next_and_a_short_error() -> None:
    lines = group_table([
        group("ok-far-behind", 60, 2000.0, "ok", next_in=90),
        group("ok-fresh", 60, 30.0, "ok", next_in=-5),
        group("late", 15, 1000.0, "violated", job="failed", error="ssh: connect to host dr-01\nport 22: refused " * 5),
        group("risky", 15, 700.0, "at_risk", paused=True),
        group("new", 30, None, "unknown", job="running", error="retrying: timeout"),
        group("done", 30, 10.0, "ok", job="completed", error="an old warning"),
    ], NOW)
    assert lines[0] == "Protection groups: 6 (1 violated, 1 at risk, 3 ok, 1 unknown; 1 paused)"
    names = [line.split()[0] for line in lines[1:]]
    # by status, then by how far behind against the RPO (30 s of 60 min before 10 s of 30 min)
    assert names == ["GROUP", "late", "risky", "new", "ok-far-behind", "ok-fresh", "done"]
    header, late, risky, new, far, fresh, done = lines[1:]
    assert late.index("16.7m") == header.index("CURRENT") and late.index("VIOLATED") == header.index("STATUS")
    error = late[header.index("LAST ERROR"):]
    assert error.startswith("ssh: connect to host dr-01 port 22: refused") and error.endswith("...")
    assert len(error) == 60
    assert "AT RISK (paused)" in risky
    assert new.rstrip().endswith("retrying: timeout")
    assert far.split()[4:6] == ["in", "90.0s"] and fresh.split()[4] == "due"
    assert "old warning" not in done  # a completed last job shows no error


def test_many_groups_show_the_worst_and_count_the_rest() -> None:
    groups = [group(f"g{i:03}", 15, float(i), "ok") for i in range(120)]
    lines = group_table(groups, NOW, limit=50)
    assert len(lines) == 1 + 1 + 50 + 1
    assert lines[2].split()[0] == "g119"  # the most behind first
    assert lines[-1] == "  ... and 70 more (all of them: select * from protection_status)"


def test_durations_read_at_a_glance() -> None:
    assert [seconds_text(s) for s in (None, 45, 750, 11520, 2592000)] == ["-", "45.0s", "12.5m", "3.2h", "30.0d"]
    assert [minutes_text(m) for m in (None, 15, 119, 120, 135, 1440)] == ["none", "15m", "119m", "2h", "2h15m", "24h"]


def test_report_table_and_window() -> None:
    since, until = window(30, datetime(2026, 12, 1))
    assert until == datetime(2026, 12, 1, tzinfo=UTC) and until - since == timedelta(days=30)
    rows = [RpoCompliance(uuid4(), "gold", 15, 7200, 7200, 6300, 0.875, 1800, 1, 900, 0, 0),
            RpoCompliance(uuid4(), "on-demand", None, 7200, 7200, None, None, 3600, None, None, 600, 0)]
    lines = rpo_table(rows, since, until)
    assert lines[0] == "RPO compliance from 2026-11-01 00:00 to 2026-12-01 00:00 UTC (30.0d)"
    assert lines[1].split() == ["GROUP", "RPO", "WITHIN", "WORST", "VIOLATIONS", "LONGEST", "PAUSED", "UNKNOWN"]
    assert lines[2].split() == ["gold", "15m", "87.50%", "30.0m", "1", "15.0m", "-", "-"]
    assert lines[3].split() == ["on-demand", "none", "-", "60.0m", "-", "-", "10.0m", "-"]
    assert len({len(line) for line in lines[1:4]}) == 1  # right-aligned columns end together
    assert rpo_table([], since, until)[1] == "  no protection groups"
