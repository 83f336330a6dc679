"""Pure decisions for a dataset tree (``protection_groups.recursive``): no I/O, unit-tested.

A tree is the group's dataset and every child, listed by one ``zfs get -r`` per side. The rules
(docs/replication.md, *Dataset trees*):

* the children are sent parent before child, each as its own stream (never ``send -R``);
* a child is part of this job's recovery point only if it has the job's (recursive) snapshot:
  one that appeared after it is seeded by the next job;
* a child gone from the source is never destroyed on the target: it is only named in a note;
* retention prunes a group snapshot on every dataset of a side, or on none of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from handlers.backends.zfs.exec import Result, check
from handlers.backends.zfs.ops import TARGET_PROPERTY
from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.validate import check_dataset
from handlers.errors import PermanentError

KINDS = ("filesystem", "volume")


@dataclass(frozen=True)
class Tree:
    """One side's tree: its datasets parent before child, their types, their snapshots oldest first."""

    top: str
    kinds: dict[str, str]  # dataset -> "filesystem" | "volume"
    snaps: dict[str, list[Snap]]
    written: dict[str, int] = field(default_factory=dict)  # bytes written since the newest snapshot
    tokens: dict[str, str] = field(default_factory=dict)  # receive_resume_token of a partial receive

    @property
    def datasets(self) -> list[str]:
        """Parent before child: by depth, then by name (a stable order for notes and progress)."""
        return sorted(self.kinds, key=lambda d: (d.count("/"), d))

    def snapshot(self, dataset: str, name: str) -> Snap | None:
        return next((s for s in self.snaps.get(dataset, []) if s.name == name), None)

    def has_guid(self, dataset: str, guid: int) -> bool:
        return any(s.guid == guid for s in self.snaps.get(dataset, []))


def tree_argv(top: str, userrefs: bool, written: bool = False, resume: bool = False) -> list[str]:
    props = ["type", "guid", "createtxg", "creation"] + (["userrefs"] if userrefs else []) + [TARGET_PROPERTY]
    props += (["written"] if written else []) + (["receive_resume_token"] if resume else [])
    return ["zfs", "get", "-Hp", "-r", "-o", "name,property,value", ",".join(props), top]


def parse_tree(result: Result, where: str, top: str) -> Tree | None:
    """The tree under ``top``; None when ``top`` does not exist. Rows of other names are ignored."""
    if not result.ok:
        if "does not exist" in result.err:
            return None
        check(result, where, f"listing the datasets under {top}")
    rows: dict[str, dict[str, str]] = {}
    for line in result.out.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name = parts[0]
        dataset = name.split("@", 1)[0]
        if dataset != top and not dataset.startswith(top + "/"):
            continue
        rows.setdefault(name, {})[parts[1]] = parts[2]
    kinds: dict[str, str] = {}
    snaps: dict[str, list[Snap]] = {}
    written: dict[str, int] = {}
    tokens: dict[str, str] = {}
    for name, values in rows.items():
        if "@" not in name:
            if values.get("type") in KINDS:
                kinds[name] = values["type"]
                if values.get("written", "").isdigit():
                    written[name] = int(values["written"])
                if values.get("receive_resume_token", "-") not in ("", "-"):
                    tokens[name] = values["receive_resume_token"]
            continue
        if "guid" not in values or "createtxg" not in values:
            continue
        dataset, snap = name.split("@", 1)
        refs, created = values.get("userrefs", "-"), values.get("creation", "")
        target = values.get(TARGET_PROPERTY, "-")
        snaps.setdefault(dataset, []).append(
            Snap(snap, int(values["guid"]), int(values["createtxg"]), int(refs) if refs.isdigit() else -1,
                 "" if target == "-" else target, int(created) if created.isdigit() else 0))
    for found in snaps.values():
        found.sort(key=lambda s: s.txg)
    return Tree(top, kinds, {d: snaps.get(d, []) for d in kinds}, written, tokens)


def check_children(tree: Tree, target_top: str) -> None:
    """Every child name, and the name it will have on the target, is one validate.py accepts."""
    for dataset in tree.datasets:
        if dataset == tree.top:
            continue
        try:
            check_dataset(dataset, f"a child of protection_groups.source_dataset ({tree.top}):")
            check_dataset(target_name(tree.top, target_top, dataset), f"the replica of child {dataset}:")
        except PermanentError as exc:
            raise PermanentError(f"{exc}. Rename the child on the source (zfs rename), or set "
                                 "protection_groups.recursive to false to replicate the dataset alone") from None


def target_name(source_top: str, target_top: str, dataset: str) -> str:
    return target_top + dataset[len(source_top):]


def in_point(tree: Tree, snapshot: str) -> tuple[list[str], list[str]]:
    """(datasets that have the job's snapshot, parent before child; those that appeared after it)."""
    having = [d for d in tree.datasets if tree.snapshot(d, snapshot) is not None]
    return having, [d for d in tree.datasets if d not in having]


def gone_from_source(source: Tree, target: Tree | None, target_top: str) -> list[str]:
    """Target datasets whose source child no longer exists: kept, never destroyed."""
    if target is None:
        return []
    mapped = {target_name(source.top, target_top, d) for d in source.kinds}
    return [d for d in target.datasets if d not in mapped]


def whole_groups(tree: Tree, datasets: Sequence[str], allowed: Mapping[str, set[str]]) -> dict[str, list[Snap]]:
    """What tree retention destroys on one side: per dataset, its snapshots of the group names that
    ``allowed`` (what retention.choose lets go there) holds on *every* dataset having that name.

    A name held, protected, kept by the policy or cloned on one child stays on all, so a recovery
    point is always whole or gone. A child seeded later lacks the older names: it holds none back.
    """
    present = {d: {s.name for s in tree.snaps.get(d, [])} for d in datasets}
    names: set[str] = set().union(*(allowed.get(d, set()) for d in datasets))
    whole = {n for n in names if all(n in allowed.get(d, set()) for d in datasets if n in present[d])}
    return {d: [s for s in tree.snaps.get(d, []) if s.name in whole] for d in datasets}


def kinds_differ(source: Tree, target: Tree | None, target_top: str, datasets: Sequence[str]) -> list[str]:
    """Children whose replica exists with another type (a zvol received over a filesystem or back)."""
    if target is None:
        return []
    out = []
    for d in datasets:
        kind = target.kinds.get(target_name(source.top, target_top, d))
        if kind is not None and kind != source.kinds[d]:
            out.append(f"{d} is a {source.kinds[d]} but {target_name(source.top, target_top, d)} is a {kind}")
    return out


def whole_on_target(source: Tree, target: Tree | None, target_top: str) -> dict[str, bool]:
    """For each snapshot of the top dataset: is the recovery point whole on the target?

    A tree's point is one group snapshot; it is on the target only when every source dataset that
    has it has a replica holding the same GUID (a job that failed in a child leaves the top's
    replica with the snapshot and the child without: not a point to recover from).
    """
    out: dict[str, bool] = {}
    for snap in source.snaps.get(source.top, []):
        having = [(d, s) for d in source.datasets if (s := source.snapshot(d, snap.name)) is not None]
        out[snap.name] = target is not None and all(
            target.has_guid(target_name(source.top, target_top, d), s.guid) for d, s in having)
    return out
