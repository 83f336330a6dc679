"""Rows of the RPO read functions (zerfaux.protection_overview, zerfaux.rpo_report), the same
whichever store read them: psycopg hands over datetimes, PostgREST ISO text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

STATUSES = ("ok", "at_risk", "violated", "unknown")


def _stamp(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class GroupStatus:
    """One row of public.protection_status: how far behind a group is now."""

    protection_group_id: UUID
    name: str
    rpo_minutes: int | None
    last_recovery_point_at: datetime | None
    current_rpo_seconds: float | None
    rpo_status: str  # one of STATUSES
    next_replication_at: datetime | None
    last_job_status: str | None
    last_error: str | None
    paused: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GroupStatus:
        return cls(
            protection_group_id=UUID(str(row["protection_group_id"])),
            name=str(row["name"]),
            rpo_minutes=_int(row["rpo_minutes"]),
            last_recovery_point_at=_stamp(row["last_recovery_point_at"]),
            current_rpo_seconds=_float(row["current_rpo_seconds"]),
            rpo_status=str(row["rpo_status"]),
            next_replication_at=_stamp(row["next_replication_at"]),
            last_job_status=row["last_job_status"],
            last_error=row["last_error"],
            paused=bool(row["paused"]),
        )

    @property
    def target_seconds(self) -> float | None:
        return None if self.rpo_minutes is None else self.rpo_minutes * 60.0


@dataclass(frozen=True)
class RpoCompliance:
    """One group's RPO over a window (zerfaux.rpo_report; the definitions are in its migration
    and in docs/rpo.md). Seconds throughout; None where the group has no RPO target."""

    protection_group_id: UUID
    name: str
    rpo_minutes: int | None
    window_seconds: float
    observed_seconds: float
    within_seconds: float | None
    within_share: float | None
    worst_rpo_seconds: float | None
    violations: int | None
    longest_violation_seconds: float | None
    paused_seconds: float
    unknown_seconds: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RpoCompliance:
        return cls(
            protection_group_id=UUID(str(row["protection_group_id"])),
            name=str(row["name"]),
            rpo_minutes=_int(row["rpo_minutes"]),
            window_seconds=float(row["window_seconds"]),
            observed_seconds=float(row["observed_seconds"]),
            within_seconds=_float(row["within_seconds"]),
            within_share=_float(row["within_share"]),
            worst_rpo_seconds=_float(row["worst_rpo_seconds"]),
            violations=_int(row["violations"]),
            longest_violation_seconds=_float(row["longest_violation_seconds"]),
            paused_seconds=float(row["paused_seconds"]),
            unknown_seconds=float(row["unknown_seconds"]),
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["protection_group_id"] = str(self.protection_group_id)
        return out
