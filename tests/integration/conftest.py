"""Rows a frontend would have made: the seed's vCenters, target and group, plus a synced VM."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.pg import Database
from tests.support import workload

PRIMARY = "00000000-0000-4000-a000-000000000001"
DR = "00000000-0000-4000-a000-000000000002"
TARGET = "00000000-0000-4000-b000-000000000001"
GROUP = "00000000-0000-4000-c000-000000000001"


def add_vm(db: Database, name: str = "app-01", moref: str = "vm-42", datastore: str = "nfs-01") -> Any:
    return db.value(
        "insert into vcenter_vms (vcenter_id, moref, name, datastore, num_cpu, memory_mb, guest_id, disks)"
        " values (%s, %s, %s, %s, 2, 4096, 'ubuntu64Guest', %s::jsonb) returning id",
        (PRIMARY, moref, name, datastore,
         f'[{{"file": "[{datastore}] {name}/{name}.vmdk", "capacity": 17179869184, "datastore": "{datastore}", "controller": "pvscsi"}}]'),
    )


def protect(db: Database, vm_id: Any, **flags: bool) -> Any:
    return db.value(
        "insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion, needs_dr_shell)"
        " values (%s, %s, %s, %s) returning id",
        (GROUP, vm_id, flags.get("needs_storage_vmotion", False), flags.get("needs_dr_shell", False)),
    )


def add_groups(db: Database, n: int) -> list[str]:
    """Groups like the seed's ``gold``; a group has at most one pending or running job."""
    return workload.add_groups(db.url, n, "test")


def queue_jobs(db: Database, groups: list[str]) -> list[str]:
    """One replication job in each group, inserted at once."""
    rows = db.sql("insert into replication_jobs (protection_group_id) select unnest(%s::uuid[]) returning id", (groups,))
    return [str(r["id"]) for r in rows]


def operations(db: Database, kind: str | None = None) -> list[dict[str, Any]]:
    if kind:
        return db.sql("select * from zerfaux.operations where kind = %s order by created_at", (kind,))
    return db.sql("select * from zerfaux.operations order by created_at")


@pytest.fixture
def world(seeded_db: Database) -> Database:
    return seeded_db
