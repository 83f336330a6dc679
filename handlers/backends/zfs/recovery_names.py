"""Checks on the names a recovery run hands the DR storage host, before any command runs.

A run id, a hold tag, ``replica@snapshot`` and the clone's dataset reach ``zfs`` on the storage
host through a remote shell (quoted by ``ParamikoRunner``, and zfs-fuse passes ``sharenfs`` to
``system()``): values outside these patterns are refused, naming what to fix.
"""

from __future__ import annotations

from handlers.backends.zfs.validate import JOB_ID, MAX_NAME, SNAPSHOT, check_dataset, check_snapshot
from handlers.errors import PermanentError
from handlers.recovery.backends import run_tag

_TAG = SNAPSHOT  # a hold tag: the portable snapshot-name subset (no leading '-', no shell characters)


def check_run_id(value: object) -> str:
    if not isinstance(value, str) or not JOB_ID.fullmatch(value):
        raise PermanentError(f"recovery_runs.id {value!r} is not an acceptable run id (a UUID)")
    return value


def check_tag(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or not _TAG.fullmatch(value):
        raise PermanentError(f"hold tag {value!r} is not acceptable: letters, digits, '_', '-', '.', ':' only "
                             "(zerfaux-test-<8 hex> for a run)")
    return value


def split_snapshot(value: object, field: str) -> tuple[str, str]:
    """``dataset@snapshot`` checked and split."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise PermanentError(f"{field} {value!r} is not a snapshot: expected <dataset>@<snapshot>")
    dataset, snap = value.split("@")
    check_dataset(dataset, f"{field} (dataset part)")
    check_snapshot(snap, f"{field} (snapshot part)")
    return dataset, snap


def check_clone_name(dataset: object, run_id: str, replica: str) -> str:
    """``<target_root>/zerfaux-test-<8 hex of the run>``, beside the replica, never inside it."""
    name = check_dataset(dataset, "recovery run clone dataset")
    tag = run_tag(run_id)
    if "/" not in name or name.rsplit("/", 1)[1] not in (tag, "zerfaux-failover-" + tag[-8:]):  # a failover's clone too
        raise PermanentError(f"recovery run clone dataset {name!r} must be <target_root>/{tag} for run {run_id}")
    if name == replica or name.startswith(replica + "/") or replica.startswith(name + "/"):
        raise PermanentError(f"recovery run clone dataset {name!r} overlaps the replica {replica}: put it beside "
                             "the replica, under replication_targets.target_root")
    return name
