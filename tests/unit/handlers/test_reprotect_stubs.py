"""The stub's reprotect storage calls: the real ones' contracts, in the stub world (no ZFS)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from handlers.backends.stub.failover import FailoverStorageStub
from handlers.backends.stub.world import StubWorld
from handlers.errors import PermanentError
from handlers.recovery.failover_backends import kept_names
from handlers.types import SSHEndpoint

PRIMARY = SSHEndpoint("primary", 22, "zerfaux", None, None)
DR = SSHEndpoint("dr", 22, "zerfaux", None, None)
RUN = "0123abcd-ef45-4000-8000-000000000000"


def test_common_snapshot_keep_and_discard(tmp_path: Path) -> None:
    stub, stop = FailoverStorageStub(world=StubWorld(tmp_path)), threading.Event()
    stub.put_dataset(DR, "dr/vm", ["zerfaux_a", "zerfaux_b"])
    stub.put_dataset(PRIMARY, "prod/vm", ["zerfaux_a", "late"])
    # Different datasets, different fake GUIDs: no common snapshot, as with two unrelated datasets.
    assert stub.newest_common_snapshot(DR, "dr/vm", PRIMARY, "prod/vm", stop) is None
    # A dataset the stub never saw holds what the other side holds.
    common = stub.newest_common_snapshot(DR, "dr/vm", PRIMARY, "prod/new", stop)
    assert common is not None and common.name == "zerfaux_b"
    assert stub.snapshots_after(PRIMARY, "prod/vm", "zerfaux_a", stop) == ("late",)
    kept = stub.keep_changes(PRIMARY, "prod/vm", "zerfaux_a", "zerfaux-reprotect", RUN, stop)
    assert kept == stub.keep_changes(PRIMARY, "prod/vm", "zerfaux_a", "zerfaux-reprotect", RUN, stop)
    name, snap = kept_names("prod/vm", RUN)
    assert (kept.kept_dataset, kept.kept_snapshot) == (name, f"{name}@{snap}") == ("prod/vm_zerfaux_kept_0123abcd",
                                                                                    f"{name}@zerfaux_kept_0123abcd")
    assert stub.snapshots_after(PRIMARY, "prod/vm", "zerfaux_a", stop) == ()
    assert stub.snapshots_after(PRIMARY, name, "zerfaux_a", stop) == ("late", snap)
    with pytest.raises(PermanentError, match="does not exist"):
        stub.keep_changes(PRIMARY, "prod/vm", "nope", "t", "1111abcd-ef45-4000-8000-000000000000", stop)
    assert stub.discard_changes(PRIMARY, name, "zerfaux_a", stop) == (f"{name}@late", f"{name}@{snap}")
    assert stub.discard_changes(PRIMARY, name, "zerfaux_a", stop) == ()


def test_readonly_destroy_and_replace(tmp_path: Path) -> None:
    stub, stop = FailoverStorageStub(world=StubWorld(tmp_path)), threading.Event()
    stub.put_dataset(DR, "dr/vm", ["zerfaux_a"])
    assert stub.set_readonly(DR, "dr/vm", True, stop) is False  # put_dataset makes replicas read-only
    assert stub.set_readonly(DR, "dr/vm", False, stop) is True
    pre = stub.snapshot(DR, "dr/vm", "zerfaux_pre_failover_0123abcd", stop, run_id=RUN)
    with pytest.raises(PermanentError, match="not made by run"):
        stub.destroy_snapshot(DR, pre.snapshot, "9999abcd-ef45-4000-8000-000000000000", stop)
    assert stub.destroy_snapshot(DR, pre.snapshot, RUN, stop) is True
    assert stub.destroy_snapshot(DR, pre.snapshot, RUN, stop) is False
    assert stub.load_key(DR, "dr/vm", "key", stop) is False  # not encrypted
    stub.put_dataset(DR, "dr/zerfaux-failover-0123abcd", [])
    done = stub.replace_with_clone(DR, "dr/vm", "dr/zerfaux-failover-0123abcd", RUN, stop)
    assert done["superseded"] == "dr/vm_zerfaux_superseded_0123abcd"
    assert stub.replace_with_clone(DR, "dr/vm", "dr/zerfaux-failover-0123abcd", RUN, stop)["superseded"] == \
        done["superseded"]
    assert stub.snapshots_after(DR, done["superseded"], "zerfaux_a", stop) == ()
