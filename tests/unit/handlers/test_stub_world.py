"""The stubs' shared outside world: what one "process" did, the next one sees and adopts."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from pathlib import Path

import pytest

from handlers.backends.stub.world import StubWorld
from handlers.backends.stub.backends import DRShellBuilderStub, StorageMoverStub, VCenterInventoryStub, ZFSReplicationStub
from handlers.dr_shell import ShellSpec
from handlers.errors import OperationCancelled
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint, VCenterEndpoint

VC = VCenterEndpoint("vc-1", "vc-dr", "vc", 443, "admin", "pw", True)
SPEC = ShellSpec("pvm-1", "app-dr", "zfs-dr-01", 2, 4096, "ubuntu64Guest", "bios", "pvscsi", ())


def _request(job: str = "0f" * 16) -> ReplicationRequest:
    return ReplicationRequest(job, "tank/vm", "dr/vm", "ssh", SSHEndpoint("h", 22, "u", None, None), None, 5, None)


def effects(world: StubWorld) -> Counter[tuple[str, str]]:
    return Counter((e["kind"], e["effect"]) for e in world.journal())


def test_a_dr_shell_is_created_once_then_adopted_by_another_builder(tmp_path: Path) -> None:
    first = DRShellBuilderStub(world=StubWorld(tmp_path)).ensure_shell(VC, SPEC)
    again = DRShellBuilderStub(world=StubWorld(tmp_path)).ensure_shell(VC, SPEC)
    assert not first.adopted and again.adopted and first.moref == again.moref
    assert effects(StubWorld(tmp_path)) == {("vm.dr_shell", "created"): 1, ("vm.dr_shell", "adopted"): 1}


def test_a_relocation_is_remembered_across_movers(tmp_path: Path) -> None:
    cancel = threading.Event()
    assert StorageMoverStub(world=StubWorld(tmp_path)).relocate(VC, "vm-1", "zfs-protect-01", cancel)
    assert not StorageMoverStub(world=StubWorld(tmp_path)).relocate(VC, "vm-1", "zfs-protect-01", cancel)
    assert effects(StubWorld(tmp_path)) == {("vm.storage_vmotion", "relocated"): 1,
                                            ("vm.storage_vmotion", "already-there"): 1}


def test_a_cancelled_relocation_leaves_the_vm_where_it_was(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelled):
        StorageMoverStub(5.0, world=StubWorld(tmp_path)).relocate(VC, "vm-1", "zfs-protect-01", cancel)
    assert StorageMoverStub(world=StubWorld(tmp_path)).relocate(VC, "vm-1", "zfs-protect-01", threading.Event())
    assert effects(StubWorld(tmp_path)) == {("vm.storage_vmotion", "relocated"): 1}


def test_a_replication_reuses_its_snapshot_and_is_received_once(tmp_path: Path) -> None:
    first = ZFSReplicationStub(world=StubWorld(tmp_path)).replicate(_request(), lambda p: None, threading.Event())
    again = ZFSReplicationStub(world=StubWorld(tmp_path)).replicate(_request(), lambda p: None, threading.Event())
    assert first.snapshot_name == again.snapshot_name and again.bytes_transferred == first.bytes_transferred
    assert effects(StubWorld(tmp_path)) == {("replication.run", "sent"): 1, ("replication.run", "already-there"): 1}


def test_inventory_reads_are_journaled_and_jitter_only_adds(tmp_path: Path) -> None:
    VCenterInventoryStub(3, seconds=0.0, jitter=0.01, world=StubWorld(tmp_path)).fetch(VC)
    assert effects(StubWorld(tmp_path)) == {("vcenter.sync", "read"): 1}


def _race(root: str, n: int) -> None:
    world = StubWorld(root)
    builder = DRShellBuilderStub(world=world)
    for i in range(n):
        builder.ensure_shell(VC, ShellSpec(f"pvm-{i}", "x", "ds", 1, 1, "g", "bios", "pvscsi", ()))


def test_racing_processes_create_each_shell_once_and_lose_no_journal_line(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(tmp_path), 200)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    journal = StubWorld(tmp_path).journal()
    assert len(journal) == 800
    created = Counter(e["subject"] for e in journal if e["effect"] == "created")
    assert len(created) == 200 and set(created.values()) == {1}
