"""The pure rules of a dataset tree (handlers/backends/zfs/treeplan.py)."""

from __future__ import annotations

import pytest

from handlers.backends.zfs.exec import Result
from handlers.backends.zfs.treeplan import (
    check_children,
    gone_from_source,
    in_point,
    kinds_differ,
    parse_tree,
    tree_argv,
    whole_groups,
    whole_on_target,
)
from handlers.errors import PermanentError
from handlers.replication import build_request

OURS = ["zerfaux_abc_20261201T100000Z", "zerfaux_abc_20261201T110000Z", "zerfaux_abc_20261201T120000Z"]


def listing(rows: list[tuple[str, str, str]]) -> Result:
    return Result(("zfs", "get"), 0, "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows), "")


def dataset(name: str, kind: str = "filesystem") -> list[tuple[str, str, str]]:
    return [(name, "type", kind), (name, "guid", "1"), (name, "createtxg", "1"), (name, "userrefs", "-")]


def snap(name: str, guid: int, txg: int, refs: int = 0, target: str = "t") -> list[tuple[str, str, str]]:
    return [(name, "type", "snapshot"), (name, "guid", str(guid)), (name, "createtxg", str(txg)),
            (name, "userrefs", str(refs)), (name, "zerfaux:target", target)]


def test_parse_orders_parent_before_child_and_ignores_others() -> None:
    rows = (dataset("p/t/b") + dataset("p/t") + dataset("p/t/a/g") + dataset("p/t/a") + dataset("p/tother")
            + snap(f"p/t/a@{OURS[0]}", 11, 5) + snap(f"p/t@{OURS[0]}", 10, 5))
    tree = parse_tree(listing(rows), "here", "p/t")
    assert tree is not None
    assert tree.datasets == ["p/t", "p/t/a", "p/t/b", "p/t/a/g"]
    assert tree.snapshot("p/t/a", OURS[0]) is not None and tree.snaps["p/t/b"] == []
    assert tree.has_guid("p/t", 10) and not tree.has_guid("p/t", 11)


def test_parse_missing_top_and_zvol_kind() -> None:
    assert parse_tree(Result((), 1, "", "cannot open 'p/t': dataset does not exist"), "here", "p/t") is None
    tree = parse_tree(listing(dataset("p/t") + dataset("p/t/vol", "volume")), "here", "p/t")
    assert tree is not None and tree.kinds["p/t/vol"] == "volume"
    assert tree_argv("p/t", userrefs=False)[-2] == "type,guid,createtxg,creation,zerfaux:target"
    assert tree_argv("p/t", True, written=True, resume=True)[-2] == \
        "type,guid,createtxg,creation,userrefs,zerfaux:target,written,receive_resume_token"
    partial = parse_tree(listing(dataset("d/t") + [("d/t", "written", "4096"), ("d/t", "receive_resume_token", "1-ab"),
                                                   ("d/t@s", "written", "9")]), "tgt", "d/t")
    assert partial is not None and partial.written == {"d/t": 4096} and partial.tokens == {"d/t": "1-ab"}


def test_children_appeared_after_the_snapshot_and_gone_from_source() -> None:
    src = parse_tree(listing(dataset("p/t") + dataset("p/t/a") + dataset("p/t/new") + snap(f"p/t@{OURS[0]}", 1, 5)
                             + snap(f"p/t/a@{OURS[0]}", 2, 5)), "src", "p/t")
    tgt = parse_tree(listing(dataset("d/t") + dataset("d/t/a") + dataset("d/t/old")), "tgt", "d/t")
    assert src is not None
    assert in_point(src, OURS[0]) == (["p/t", "p/t/a"], ["p/t/new"])
    assert gone_from_source(src, tgt, "d/t") == ["d/t/old"]
    assert gone_from_source(src, None, "d/t") == []


def test_child_names_are_checked_like_the_group_dataset() -> None:
    src = parse_tree(listing(dataset("p/t") + dataset("p/t/bad name")), "src", "p/t")
    assert src is not None
    with pytest.raises(PermanentError, match="a child of protection_groups.source_dataset .* 'p/t/bad name' is not an"
                                             ".*protection_groups.recursive to false"):
        check_children(src, "d/t")
    fine = parse_tree(listing(dataset("p/t") + dataset("p/t/ok")), "src", "p/t")
    assert fine is not None
    check_children(fine, "d/t")
    with pytest.raises(PermanentError, match="the replica of child p/t/ok"):
        check_children(fine, "d/" + "x" * 253)


def test_a_replica_of_another_type_is_named() -> None:
    src = parse_tree(listing(dataset("p/t") + dataset("p/t/vol", "volume")), "src", "p/t")
    tgt = parse_tree(listing(dataset("d/t") + dataset("d/t/vol")), "tgt", "d/t")
    assert src is not None
    assert kinds_differ(src, tgt, "d/t", ["p/t", "p/t/vol"]) == ["p/t/vol is a volume but d/t/vol is a filesystem"]


def test_group_snapshot_pruned_everywhere_or_nowhere() -> None:
    rows = dataset("d/t") + dataset("d/t/a") + dataset("d/t/new")
    for i, name in enumerate(OURS):
        rows += snap(f"d/t@{name}", 100 + i, 10 + i)
        rows += snap(f"d/t/a@{name}", 200 + i, 10 + i)
    rows += snap(f"d/t/new@{OURS[2]}", 302, 12)  # seeded at the newest: lacks the older ones
    tree = parse_tree(listing(rows), "tgt", "d/t")
    assert tree is not None
    # What retention.choose let go per dataset: on a, the middle one is held (or cloned, or kept).
    allowed = {"d/t": {OURS[0], OURS[1]}, "d/t/a": {OURS[0]}, "d/t/new": set()}
    chosen = whole_groups(tree, ["d/t", "d/t/a", "d/t/new"], allowed)
    # The oldest goes from every dataset that has it; the middle one stays on all; new holds nothing back.
    assert {d: [s.name for s in snaps] for d, snaps in chosen.items()} == {
        "d/t": [OURS[0]], "d/t/a": [OURS[0]], "d/t/new": []}
    assert whole_groups(tree, ["d/t"], {}) == {"d/t": []}


def test_build_request_reads_recursive() -> None:
    target = {"ssh_host": "h", "ssh_port": 22, "ssh_user": "u", "ssh_key_secret": "k", "ssh_host_key": "x"}
    job = {"id": "j1", "target_dataset": "d/t"}
    group = {"name": "g", "source_dataset": "p/t"}
    assert build_request({"job": job, "group": group, "target": target}).recursive is False
    assert build_request({"job": job, "group": {**group, "recursive": True}, "target": target}).recursive is True


def test_a_point_is_whole_on_the_target_only_with_every_child() -> None:
    src = parse_tree(listing(dataset("p/t") + dataset("p/t/a") + snap(f"p/t@{OURS[0]}", 1, 5)
                             + snap(f"p/t/a@{OURS[0]}", 2, 5) + snap(f"p/t@{OURS[1]}", 3, 6)
                             + snap(f"p/t/a@{OURS[1]}", 4, 6)), "src", "p/t")
    tgt = parse_tree(listing(dataset("d/t") + dataset("d/t/a") + snap(f"d/t@{OURS[0]}", 1, 5)
                             + snap(f"d/t/a@{OURS[0]}", 2, 5) + snap(f"d/t@{OURS[1]}", 3, 6)), "tgt", "d/t")
    assert src is not None
    # OURS[1] reached the top's replica but not a's (a job that failed in a child).
    assert whole_on_target(src, tgt, "d/t") == {OURS[0]: True, OURS[1]: False}
    assert whole_on_target(src, None, "d/t") == {OURS[0]: False, OURS[1]: False}
