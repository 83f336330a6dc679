"""What a recovery clone is on the storage host, read in one command, and which datasets a tree has.

A clone is ours when it carries ``zerfaux:recovery_run=<run id>`` and its ``origin`` is the
snapshot it was made from; anything else at the name is somebody's and is never touched. A
recursive group's replica is a tree (the replica and its children, each with the snapshot of the
same name: ``zfs snapshot -r`` on the source): its clone is a tree of the same shape, each child
cloned from the child's snapshot, so the VMs' files under children are there too.
"""

from __future__ import annotations

from dataclasses import dataclass

from handlers.backends.zfs.exec import Result, check

MARK = "zerfaux:recovery_run"
PROPS = ("type", "origin", "mounted", "mountpoint", MARK, "sharenfs")


@dataclass(frozen=True)
class Dataset:
    name: str
    type: str
    origin: str | None
    mounted: bool
    mountpoint: str | None  # None: none, legacy or unset
    mark: str | None  # zerfaux:recovery_run
    sharenfs: str  # "off" when not shared


def props_argv(dataset: str, recursive: bool = False) -> list[str]:
    return ["zfs", "get", "-H", "-p", *(["-r"] if recursive else []), "-o", "name,property,value",
            ",".join(PROPS), dataset]


def _clean(value: str | None) -> str | None:
    return None if value in (None, "", "-") else value


def parse_props(result: Result, where: str, dataset: str) -> dict[str, Dataset] | None:
    """Every dataset the listing shows, by name; None when ``dataset`` does not exist."""
    if not result.ok and "does not exist" in result.err:
        return None
    check(result, where, f"reading {dataset}")
    rows: dict[str, dict[str, str]] = {}
    for line in result.out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows.setdefault(parts[0], {})[parts[1]] = parts[2]
    found = {}
    for name, values in rows.items():
        mountpoint = _clean(values.get("mountpoint"))
        found[name] = Dataset(
            name=name, type=values.get("type", ""), origin=_clean(values.get("origin")),
            mounted=values.get("mounted") == "yes",
            mountpoint=None if mountpoint in (None, "none", "legacy") else mountpoint,
            mark=_clean(values.get(MARK)), sharenfs=values.get("sharenfs") or "off",
        )
    return found


def snapshot_tree_argv(replica: str) -> list[str]:
    # `zfs get -r` because zfs-fuse's `zfs get` has no -t and its `zfs list` no guid column.
    return ["zfs", "get", "-H", "-p", "-r", "-o", "name,value", "type", replica]


def parse_snapshot_tree(result: Result, where: str, replica: str, snap: str) -> list[str] | None:
    """Relative names ("" for the replica itself, "child/grandchild") of the datasets of the
    replica's tree that have ``@snap``, parents first; None when the replica has no ``@snap``."""
    if not result.ok and "does not exist" in result.err:
        return None
    check(result, where, f"listing the snapshots of {replica}")
    relative = []
    for line in result.out.splitlines():
        name, _, kind = line.partition("\t")
        if kind.strip() != "snapshot" or not name.endswith("@" + snap):
            continue
        dataset = name[: -len(snap) - 1]
        if dataset == replica:
            relative.append("")
        elif dataset.startswith(replica + "/"):
            relative.append(dataset[len(replica) + 1:])
    if "" not in relative:
        return None
    return sorted(relative, key=lambda r: (r.count("/") + (r != ""), r))


def clone_name(root: str, relative: str) -> str:
    return f"{root}/{relative}" if relative else root


def origin_name(replica: str, relative: str, snap: str) -> str:
    return f"{replica}/{relative}@{snap}" if relative else f"{replica}@{snap}"


def foreign(found: Dataset | None, origin: str, run_id: str) -> str | None:
    """Why the dataset at a clone's name is not this run's clone of ``origin``; None when it is."""
    if found is None:
        return None
    if found.type != "filesystem":
        return f"it is a {found.type or 'dataset of unknown type'}, not a clone"
    if found.mark != run_id:
        mark = f"{MARK}={found.mark}" if found.mark else f"no {MARK} mark"
        return f"it carries {mark}, not this run's ({run_id})"
    if found.origin != origin:
        return f"its origin is {found.origin or 'none (not a clone)'}, not {origin}"
    return None


def destroy_order(tree: dict[str, Dataset], root: str, run_id: str) -> tuple[list[str], list[str]]:
    """The clone tree's (snapshots, filesystems) to destroy, deepest first, or a ``ValueError``
    naming the first dataset under ``root`` that is not this run's (then nothing is destroyed)."""
    snaps, filesystems = [], []
    for name, found in tree.items():
        if not (name == root or name.startswith(root + "/") or name.startswith(root + "@")):
            continue
        if found.type == "snapshot":
            snaps.append(name)  # the clone's own (a person's snapshot of the test VM's disks)
        elif found.type == "filesystem" and found.mark == run_id and found.origin:
            filesystems.append(name)
        else:
            why = f"{MARK}={found.mark}" if found.mark else f"no {MARK} mark"
            raise ValueError(f"{name} ({found.type}, {why}, origin {found.origin or 'none'}) is under the clone "
                             f"but is not this run's clone")
    depth = lambda n: n.split("@", 1)[0].count("/")  # noqa: E731
    return sorted(snaps, key=depth, reverse=True), sorted(filesystems, key=depth, reverse=True)
