"""Replica names: two groups whose datasets share a basename no longer replicate into one replica.

New groups get the basename when it is free on their target, else basename-<8 hex of the group id>;
groups that existed before the migration keep the name they replicated to (no replica is renamed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from listener.migrate import migrate, seed, sql_root
from tests.integration.conftest import GROUP, TARGET
from tests.support.pg import Database

MIGRATION = "20261201140000_replica_name.sql"


def add_group(db: Database, name: str, dataset: str, target: str | None = TARGET) -> str:
    return str(db.value("insert into protection_groups (name, replication_target_id, source_dataset) "
                        "values (%s, %s, %s) returning id", (name, target, dataset)))


def job_target(db: Database, group: str) -> str:
    """The dataset a new job of the group is filled with; the job is then cancelled, so the next
    call may queue one (one pending or running job per group)."""
    job = db.one("insert into replication_jobs (protection_group_id) values (%s) returning id, target_dataset",
                 (group,))
    db.sql("update replication_jobs set status = 'cancelled' where id = %s", (job["id"],))
    return str(job["target_dataset"])


def test_same_basename_on_one_target_gets_distinct_replicas(world: Database) -> None:
    assert job_target(world, GROUP) == "tank/replicas/vmstore"  # the seed's tank/vmstore
    other = add_group(world, "silver", "tank2/vmstore")
    suffix = other.replace("-", "")[:8]
    assert world.value("select replica_name from protection_groups where id = %s", (other,)) == f"vmstore-{suffix}"
    assert job_target(world, other) == f"tank/replicas/vmstore-{suffix}"
    assert job_target(world, GROUP) == "tank/replicas/vmstore"  # the first group's replica is untouched
    # Another target, or a different basename: the basename itself.
    world.sql("insert into replication_targets (id, name, ssh_host, target_root) "
              "values ('00000000-0000-4000-b000-0000000000f2', 'dr-2', 'dr2.example', 'pool/dr')")
    elsewhere = add_group(world, "bronze", "tank3/vmstore", "00000000-0000-4000-b000-0000000000f2")
    assert job_target(world, elsewhere) == "pool/dr/vmstore"
    assert job_target(world, add_group(world, "lead", "tank/web")) == "tank/replicas/web"


def test_a_name_set_by_hand_is_used_and_a_group_gets_one_when_its_dataset_is_set(world: Database) -> None:
    chosen = str(world.value("insert into protection_groups (name, replication_target_id, source_dataset, replica_name) "
                             "values ('manual', %s, 'tank9/vmstore', 'vmstore-manual') returning id", (TARGET,)))
    assert job_target(world, chosen) == "tank/replicas/vmstore-manual"
    later = add_group(world, "later", None)  # type: ignore[arg-type]
    world.sql("update protection_groups set source_dataset = 'tank5/later' where id = %s", (later,))
    assert job_target(world, later) == "tank/replicas/later"
    # Another dataset is another replica, named afresh (as before: the target followed the dataset).
    world.sql("update protection_groups set source_dataset = 'tank/vmstore' where id = %s", (later,))
    assert job_target(world, later) == f"tank/replicas/vmstore-{later.replace('-', '')[:8]}"
    world.sql("update protection_groups set source_dataset = 'tank/fresh' where id = %s", (GROUP,))
    assert job_target(world, GROUP) == "tank/replicas/fresh"
    # A job naming a dataset of its own (service role) keeps that dataset's basename.
    job = world.one("insert into replication_jobs (protection_group_id, source_dataset) "
                    "values (%s, 'tank/other') returning target_dataset", (GROUP,))
    assert job["target_dataset"] == "tank/replicas/other"


def test_existing_groups_keep_the_replica_they_have(empty_db: Database, tmp_path: Path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(Path(str(sql_root() / "migrations")).glob("*.sql")):
        if path.name < MIGRATION:
            shutil.copy(path, before / path.name)
    migrate(empty_db.url, before)
    seed(empty_db.url)
    twin = add_group(empty_db, "twin", "tank2/vmstore")  # collides today: both replicate to .../vmstore
    migrate(empty_db.url)
    names = {str(r["id"]): r["replica_name"] for r in empty_db.sql("select id, replica_name from protection_groups")}
    assert names[GROUP] == "vmstore" and names[twin] == "vmstore"
    assert job_target(empty_db, GROUP) == job_target(empty_db, twin) == "tank/replicas/vmstore"
    fresh = add_group(empty_db, "fresh", "tank3/vmstore")
    assert job_target(empty_db, fresh) == f"tank/replicas/vmstore-{fresh.replace('-', '')[:8]}"
