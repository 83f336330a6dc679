"""The pure parts of the DR storage backend: names, the sharenfs dialects, listings, the Protocol."""

from __future__ import annotations

import inspect

import pytest

from handlers.backends.zfs.clones import destroy_order, parse_props, parse_snapshot_tree
from handlers.backends.zfs.exec import Result
from handlers.backends.zfs.nfs import check_clients, listed, served, sharenfs_value
from handlers.backends.zfs.recovery import RecoveryStorageReal
from handlers.backends.zfs.recovery_names import check_clone_name, check_run_id, check_tag, split_snapshot
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryStorage

RUN = "6f7b91c9-0000-4000-8000-000000000000"


def ok(out: str) -> Result:
    return Result(("zfs",), 0, out, "")


def test_the_real_backend_has_the_protocols_methods_with_the_same_signatures() -> None:
    for name, member in inspect.getmembers(RecoveryStorage, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert inspect.signature(getattr(RecoveryStorageReal, name)) == inspect.signature(member), name


@pytest.mark.parametrize("value", ["x; rm -rf /", "", "-rf", "a" * 65, "id\n"])
def test_bad_run_ids_are_refused(value: str) -> None:
    with pytest.raises(PermanentError, match="recovery_runs.id"):
        check_run_id(value)


@pytest.mark.parametrize("value", ["-r", "a b", "t;id", "$(x)", ""])
def test_bad_tags_are_refused(value: str) -> None:
    with pytest.raises(PermanentError, match="hold tag"):
        check_tag(value)


def test_snapshot_and_clone_names() -> None:
    assert split_snapshot("tank/dr/vm1@zerfaux_1", "f") == ("tank/dr/vm1", "zerfaux_1")
    for bad in ("tank/dr/vm1", "tank@a@b", "tank/-o@x", "tank/a@b;c"):
        with pytest.raises(PermanentError):
            split_snapshot(bad, "f")
    assert check_clone_name("tank/dr/zerfaux-test-6f7b91c9", RUN, "tank/dr/vm1")
    with pytest.raises(PermanentError, match="must be <target_root>/zerfaux-test-6f7b91c9"):
        check_clone_name("tank/dr/zerfaux-test-00000000", RUN, "tank/dr/vm1")
    with pytest.raises(PermanentError, match="overlaps the replica"):
        check_clone_name("tank/dr/vm1/zerfaux-test-6f7b91c9", RUN, "tank/dr/vm1")


def test_sharenfs_in_each_dialect() -> None:
    assert sharenfs_value(["*"], fuse=True) == "*:rw,no_root_squash,sync,crossmnt"
    assert sharenfs_value(["10.0.0.0/24", "esx1"], fuse=True) == \
        "10.0.0.0/24:rw,no_root_squash,sync,crossmnt esx1:rw,no_root_squash,sync,crossmnt"
    assert sharenfs_value(["*"], fuse=False) == "rw,no_root_squash,sync,crossmnt"
    assert sharenfs_value(["10.0.0.5", "10.0.0.6"], fuse=False) == "rw=10.0.0.5:10.0.0.6,no_root_squash,sync,crossmnt"
    assert check_clients(["*", "10.1.0.0/16", "esx-01.dr.example", "*.dr.example"])
    for bad in (["*;reboot"], ["a b"], [], ["$(id)"]):
        with pytest.raises(ValueError):
            check_clients(bad)


def test_export_table_and_server() -> None:
    etab = "/tank/dr/zerfaux-test-1\t*(rw,sync,no_root_squash)\n/a\\040b\t*(ro)\n"
    assert listed(etab, "/tank/dr/zerfaux-test-1") and listed(etab, "/a b")
    assert not listed(etab, "/tank/dr") and not listed("", "/x")
    assert served("8\n") is True and served("0\n") is False and served(None) is None


def test_listings() -> None:
    tree = ok("tank/dr/vm\tfilesystem\ntank/dr/vm@s1\tsnapshot\ntank/dr/vm/d1\tfilesystem\n"
              "tank/dr/vm/d1@s1\tsnapshot\ntank/dr/vm/d1/x@s1\tsnapshot\ntank/dr/vm/d2@s0\tsnapshot\n")
    assert parse_snapshot_tree(tree, "h", "tank/dr/vm", "s1") == ["", "d1", "d1/x"]
    assert parse_snapshot_tree(tree, "h", "tank/dr/vm", "s9") is None
    assert parse_props(Result(("zfs",), 1, "", "cannot open 'x': dataset does not exist"), "h", "x") is None
    props = parse_props(ok("c\ttype\tfilesystem\nc\torigin\tr@s\nc\tmounted\tyes\nc\tmountpoint\t/m\n"
                           "c\tzerfaux:recovery_run\trun\nc\tsharenfs\toff\nc/k\ttype\tfilesystem\n"
                           "c/k\torigin\tr/k@s\nc/k\tzerfaux:recovery_run\trun\nc@p\ttype\tsnapshot\n"
                           "c/k@p\ttype\tsnapshot\n"), "h", "c")
    assert props is not None and props["c"].mounted and props["c"].mountpoint == "/m"
    assert destroy_order(props, "c", "run") == (["c/k@p", "c@p"], ["c/k", "c"])
    with pytest.raises(ValueError, match="is under the clone but is not this run's clone"):
        destroy_order(props, "c", "another-run")
