"""The recovery configuration in the database: boot order columns, network mappings, unmapped networks.

Real Postgres, the seed's group ``gold``; checked through the catalog and the functions themselves.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from tests.integration.conftest import GROUP, PRIMARY, add_vm, protect
from tests.support.pg import Database


def vm_on(db: Database, name: str, networks: Any) -> Any:
    vm_id = add_vm(db, name=name, moref=f"vm-{uuid.uuid4().hex[:8]}")
    db.sql("update vcenter_vms set networks = %s::jsonb where id = %s", (json.dumps(networks), vm_id))
    return vm_id


def unmapped(db: Database, group: str = GROUP) -> list[tuple[str, list[str]]]:
    rows = db.sql("select * from zerfaux.unmapped_networks(%s)", (group,))
    return [(r["source_network"], r["vm_names"]) for r in rows]


def test_boot_order_defaults(world: Database) -> None:
    protected = protect(world, add_vm(world))
    row = world.one("select boot_priority, boot_delay_seconds, tools_timeout_seconds from protected_vms"
                    " where id = %s", (protected,))
    assert row == {"boot_priority": 3, "boot_delay_seconds": 0, "tools_timeout_seconds": 300}


@pytest.mark.parametrize(("column", "value", "constraint"), [
    ("boot_priority", 0, "protected_vms_boot_priority_between_1_and_5"),
    ("boot_priority", 6, "protected_vms_boot_priority_between_1_and_5"),
    ("boot_delay_seconds", -1, "protected_vms_boot_delay_seconds_at_least_0"),
    ("tools_timeout_seconds", -1, "protected_vms_tools_timeout_seconds_at_least_0"),
])
def test_boot_order_out_of_range_is_refused_naming_column_and_range(
    world: Database, column: str, value: int, constraint: str
) -> None:
    protected = protect(world, add_vm(world))
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        world.sql(f"update protected_vms set {column} = %s where id = %s", (value, protected))


@pytest.mark.parametrize(("column", "value"), [("boot_priority", 1), ("boot_priority", 5),
                                               ("boot_delay_seconds", 0), ("tools_timeout_seconds", 0)])
def test_boot_order_bounds_are_allowed(world: Database, column: str, value: int) -> None:
    protected = protect(world, add_vm(world))
    world.sql(f"update protected_vms set {column} = %s where id = %s", (value, protected))
    assert world.value(f"select {column} from protected_vms where id = %s", (protected,)) == value


def test_one_mapping_per_source_network_and_group(world: Database) -> None:
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'VM Network', 'DR Network')", (GROUP,))
    with pytest.raises(psycopg.errors.UniqueViolation, match="network_mappings_group_source_key"):
        world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
                  " values (%s, 'VM Network', 'Other')", (GROUP,))
    assert world.value("select test_network from network_mappings where protection_group_id = %s", (GROUP,)) is None


def test_a_mapping_names_real_looking_networks(world: Database) -> None:
    for bad in ("", "x" * 81, "a\nb"):
        with pytest.raises(psycopg.errors.CheckViolation, match="network_mappings_recovery_network_name"):
            world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
                      " values (%s, 'VM Network', %s)", (GROUP, bad))


def test_mappings_go_with_their_group(world: Database) -> None:
    group = world.value("insert into protection_groups (name) values ('cascade') returning id")
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'VM Network', 'DR Network')", (group,))
    world.sql("delete from protection_groups where id = %s", (group,))
    assert world.value("select count(*) from network_mappings where protection_group_id = %s", (group,)) == 0


def test_unmapped_networks_lists_each_source_network_without_a_mapping(world: Database) -> None:
    assert unmapped(world) == []
    protect(world, vm_on(world, "web-01", ["VM Network", "Backend"]))
    protect(world, vm_on(world, "db-01", ["Backend", "Storage"]))
    protect(world, vm_on(world, "odd-01", {"not": "an array"}))  # a row nobody synced: no network known
    world.sql("insert into vcenter_vms (vcenter_id, moref, name, networks) values (%s, 'vm-free', 'free-01',"
              " '[\"Lonely\"]')", (PRIMARY,))  # not protected: not the group's business
    assert unmapped(world) == [("Backend", ["db-01", "web-01"]), ("Storage", ["db-01"]), ("VM Network", ["web-01"])]

    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network, test_network)"
              " values (%s, 'Backend', 'DR Backend', null), (%s, 'VM Network', 'DR LAN', 'Test LAN')", (GROUP, GROUP))
    assert unmapped(world) == [("Storage", ["db-01"])]
    other = world.value("insert into protection_groups (name) values ('other-maps') returning id")
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'Storage', 'DR Storage')", (other,))
    assert unmapped(world) == [("Storage", ["db-01"])]  # another group's mapping does not count
    world.sql("insert into network_mappings (protection_group_id, source_network, recovery_network)"
              " values (%s, 'Storage', 'DR Storage')", (GROUP,))
    assert unmapped(world) == []
    assert unmapped(world, str(other)) == []


def test_unmapped_networks_is_for_the_engine_only(world: Database) -> None:
    grants = {r["role"]: r["ok"] for r in world.sql(
        "select r as role, has_function_privilege(r, 'zerfaux.unmapped_networks(uuid)', 'execute') as ok"
        " from unnest(array['anon', 'authenticated', 'service_role']) r")}
    assert grants == {"anon": False, "authenticated": False, "service_role": True}
    config = world.value("select array_to_string(proconfig, ',') from pg_proc"
                         " where oid = 'zerfaux.unmapped_networks(uuid)'::regprocedure")
    assert config.startswith("search_path=")
