"""Planning and retention rules, without ZFS: match by GUID, refuse what must not be touched."""

from __future__ import annotations

import pytest

from handlers.backends.zfs.plan import Snap, find_job_snapshot, job_prefix, plan, prunable
from handlers.errors import PermanentError
from handlers.replication import snapshot_name

A = Snap("zerfaux_aaaaaaaaaaaa_20260101T000000Z", guid=11, txg=10)
B = Snap("zerfaux_bbbbbbbbbbbb_20260102T000000Z", guid=22, txg=20)
C = Snap("zerfaux_cccccccccccc_20260103T000000Z", guid=33, txg=30)


def on_target(*snaps: Snap) -> list[Snap]:
    # Same GUIDs, different txgs: the target pool numbers its own transactions.
    return [Snap(s.name, s.guid, s.txg * 7 + 1) for s in snaps]


def test_full_when_the_target_does_not_exist() -> None:
    assert plan([C], None, C, "dr/vm").action == "full"


def test_incremental_from_the_newest_common_by_guid() -> None:
    decided = plan([A, B, C], on_target(A, B), C, "dr/vm")
    assert decided.action == "incremental" and decided.base == B


def test_names_do_not_count_only_guids() -> None:
    # B's name is on the target, but under another GUID: that is not our B, so the target diverged after A.
    with pytest.raises(PermanentError, match="diverged"):
        plan([A, B, C], [Snap(A.name, 11, 100), Snap(B.name, 999, 200)], C, "dr/vm")
    # And a snapshot renamed on the target still counts by its GUID.
    assert plan([A, B, C], [Snap("renamed", 22, 100)], C, "dr/vm").base == B


def test_up_to_date_when_the_snapshot_is_already_there() -> None:
    assert plan([A, C], on_target(A, C), C, "dr/vm").action == "uptodate"


def test_no_common_snapshot_is_refused_with_advice() -> None:
    with pytest.raises(PermanentError, match="never does that"):
        plan([C], [Snap("other", 5, 1)], C, "dr/vm")
    with pytest.raises(PermanentError, match="has no snapshots"):
        plan([C], [], C, "dr/vm")


def test_newer_target_snapshots_mean_divergence() -> None:
    with pytest.raises(PermanentError, match="diverged.*manual.*zfs rollback"):
        plan([A, B, C], on_target(A) + [Snap("manual", 77, 500)], C, "dr/vm")


def test_written_since_the_last_snapshot_is_refused() -> None:
    with pytest.raises(PermanentError, match="changed since its newest snapshot"):
        plan([A, C], on_target(A), C, "dr/vm", target_written=4097)
    assert plan([A, C], on_target(A), C, "dr/vm", target_written=0).action == "incremental"
    # One objset block (a clone's or a rollback's zeroed ZIL header): left to ZFS's own check.
    assert plan([A, C], on_target(A), C, "dr/vm", target_written=1024).action == "incremental"


def test_a_retry_finds_its_own_snapshot() -> None:
    name = snapshot_name("5b0c7f0e-3c1d-4e55-9a37-111111111111")
    mine = Snap(name, 44, 40)
    other = Snap(snapshot_name("77777777-3c1d-4e55-9a37-111111111111"), 55, 50)
    assert find_job_snapshot([A, mine, other], job_prefix(name)) == mine
    assert find_job_snapshot([A, other], job_prefix(name)) is None


def test_retention_keeps_newest_and_spares_held_foreign_and_protected() -> None:
    held = Snap("zerfaux_dddddddddddd_20251230T000000Z", 44, 5, userrefs=1)
    foreign = Snap("daily-2026-01-01", 55, 6)
    lookalike = Snap("zerfaux_but_not_ours", 66, 7)
    snaps = [held, foreign, lookalike, A, B, C]
    assert prunable(snaps, keep=1) == [A, B]
    assert prunable(snaps, keep=1, protect={A.guid}) == [B]
    assert prunable(snaps, keep=5) == []
    unknown = Snap("zerfaux_eeeeeeeeeeee_20251229T000000Z", 77, 4, userrefs=-1)
    assert unknown not in prunable([unknown, A, B, C], keep=1)


def test_source_retention_counts_only_the_snapshots_made_for_the_same_replica() -> None:
    # One dataset replicated to two targets: each job's retention keeps the other's base.
    to_a = [Snap(f"zerfaux_{c * 12}_2026010{i}T000000Z", guid=i, txg=i * 10, target="dr-a:22/tank/dr/vm")
            for i, c in ((1, "a"), (3, "c"), (5, "e"))]
    to_b = [Snap(f"zerfaux_{c * 12}_2026010{i}T000000Z", guid=i, txg=i * 10, target="dr-b:22/tank/dr/vm")
            for i, c in ((2, "b"), (4, "d"))]
    untagged = Snap("zerfaux_ffffffffffff_20251231T000000Z", guid=9, txg=1)  # made before snapshots were tagged
    snaps = sorted(to_a + to_b + [untagged], key=lambda s: s.txg)
    assert prunable(snaps, keep=1, target="dr-a:22/tank/dr/vm") == to_a[:2]
    assert prunable(snaps, keep=1, target="dr-b:22/tank/dr/vm") == to_b[:1]
    assert prunable(snaps, keep=1, target="dr-c:22/tank/dr/vm") == []
    # On a target (no target given) every snapshot named like ours counts, as before.
    assert prunable(snaps, keep=1) == snaps[:-1]
