"""The stub recovery backends in a shared world: marks are honoured, effects converge and are journaled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handlers.backends.stub.points import StubReplica, fake_guid
from handlers.backends.stub.recovery import RecoveryComputeStub, RecoveryStorageStub
from handlers.backends.stub.world import StubWorld
from handlers.context import StopSignal
from handlers.errors import OperationCancelled, PermanentError
from handlers.recovery.backends import Placement, RecoveryDisk, RecoveryNic, RecoveryVMSpec
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint, VCenterEndpoint

TARGET = SSHEndpoint("dr", 22, "zerfaux", None, None)
VC = VCenterEndpoint("vc-dr", "vc-dr", "vc", 443, "admin", None, True)
PLACE = Placement("dc-dr", "cluster-dr-01", ("esx-1",))
SNAP = "tank/replicas/gold@zerfaux-1"


def _spec(run: str = "run-1", pid: str = "p1") -> RecoveryVMSpec:
    return RecoveryVMSpec(run, pid, "db-test-run1", "zerfaux-test-run1", 2, 2048, "otherGuest64", "bios",
                          (RecoveryDisk("[zerfaux-test-run1] db/db.vmdk", 1),),
                          (RecoveryNic("zerfaux-test-run1", "VM Network"),))


def test_storage_clone_is_adopted_only_with_the_runs_mark(tmp_path: Path) -> None:
    world = StubWorld(tmp_path)
    world.write("replica", "tank/replicas/gold", content=json.dumps([["zerfaux-1", 1]]))
    stub, stop = RecoveryStorageStub(world=world), StopSignal()
    assert stub.snapshot_guid(TARGET, SNAP, stop) == fake_guid("tank/replicas/gold", "zerfaux-1")
    assert stub.snapshot_guid(TARGET, "tank/replicas/gold@gone", stop) is None
    assert stub.hold(TARGET, SNAP, "zerfaux-test-run1", stop) and not stub.hold(TARGET, SNAP, "zerfaux-test-run1", stop)
    first = stub.clone(TARGET, SNAP, "tank/replicas/zerfaux-test-run1", "run-1", stop)
    again = stub.clone(TARGET, SNAP, "tank/replicas/zerfaux-test-run1", "run-1", stop)
    assert (first.adopted, again.adopted) == (False, True)
    with pytest.raises(PermanentError, match="not this run's clone"):
        stub.clone(TARGET, SNAP, "tank/replicas/zerfaux-test-run1", "run-2", stop)
    with pytest.raises(PermanentError, match="not a clone of run run-2"):
        stub.destroy_clone(TARGET, "tank/replicas/zerfaux-test-run1", "run-2", stop)
    assert stub.destroy_clone(TARGET, "tank/replicas/zerfaux-test-run1", "run-1", stop)
    assert not stub.destroy_clone(TARGET, "tank/replicas/zerfaux-test-run1", "run-1", stop)
    effects = [(e["kind"], e["effect"]) for e in world.journal()]
    assert effects.count(("recovery.clone", "cloned")) == 1 and ("recovery.clone", "destroyed") in effects


def test_a_held_snapshot_is_never_pruned_by_the_stub_replica(tmp_path: Path) -> None:
    world = StubWorld(tmp_path)
    replica = StubReplica(world)
    request = ReplicationRequest(job_id="j", source_dataset="tank/gold", target_dataset="tank/replicas/gold",
                                 transport="ssh", target=TARGET, source=None, retention_snapshots=1,
                                 last_snapshot=None)
    replica.received(request, "zerfaux-1", 1)
    RecoveryStorageStub(world=world).hold(TARGET, SNAP, "zerfaux-test-run1", StopSignal())
    points, pruned = replica.received(request, "zerfaux-2", 1)
    assert pruned == () and {p.snapshot_name for p in points if p.on_target} == {"zerfaux-1", "zerfaux-2"}


def test_compute_adopts_a_marked_vm_and_finds_it_by_the_runs_mark(tmp_path: Path) -> None:
    stub, stop = RecoveryComputeStub(world=StubWorld(tmp_path)), StopSignal()
    with pytest.raises(PermanentError, match="not mounted"):
        stub.create_vm(VC, PLACE, _spec(), stop)
    assert stub.present_datastore(VC, PLACE, "zerfaux-test-run1", "nfs", "/tank/x", stop)
    assert stub.create_port_group(VC, PLACE, "zerfaux-test-run1", stop)
    first, again = stub.create_vm(VC, PLACE, _spec(), stop), stub.create_vm(VC, PLACE, _spec(), stop)
    assert first.moref == again.moref and (first.adopted, again.adopted) == (False, True)
    assert stub.find_run_vms(VC, "run-1", stop) == {"p1": first.moref}
    assert stub.check_site(VC, ["zerfaux-test-run1", "nowhere"], None, stop).networks_missing == ("nowhere",)
    with pytest.raises(PermanentError, match="mark"):
        stub.destroy_vm(VC, first.moref, "run-2", stop)
    assert stub.destroy_vm(VC, first.moref, "run-1", stop) and not stub.destroy_vm(VC, first.moref, "run-1", stop)
    assert stub.find_run_vms(VC, "run-1", stop) == {}


def test_compute_tools_time_out_when_the_timeout_is_shorter_than_the_boot(tmp_path: Path) -> None:
    stub, stop = RecoveryComputeStub(seconds=0.3, world=StubWorld(tmp_path)), StopSignal()
    stub.present_datastore(VC, PLACE, "zerfaux-test-run1", "nfs", "/tank/x", stop)
    stub.create_port_group(VC, PLACE, "zerfaux-test-run1", stop)
    moref = stub.create_vm(VC, PLACE, _spec(), stop).moref
    stub.power_on(VC, moref, stop)
    assert not stub.wait_ready(VC, moref, 0.1, stop).ready
    assert stub.wait_ready(VC, moref, 5, stop).how == "tools"
    cancelled = StopSignal()
    cancelled.cancel()
    with pytest.raises(OperationCancelled):
        stub.power_on(VC, "vm-x", cancelled)
