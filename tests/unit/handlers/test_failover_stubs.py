"""The stub failover backends: the real ones' contracts (idempotent, refusals named, nothing destroyed)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from handlers.backends.stub.failover import FailoverComputeStub, FailoverStorageStub
from handlers.backends.stub.points import fake_guid
from handlers.backends.stub.recovery import RecoveryComputeStub
from handlers.backends.stub.world import StubWorld
from handlers.context import StopSignal
from handlers.errors import OperationCancelled, PermanentError
from handlers.recovery.backends import Placement, RecoveryDisk, RecoveryNic
from handlers.recovery.failover_backends import FailoverCompute, FailoverStorage, pre_failover_snapshot
from handlers.types import SSHEndpoint, VCenterEndpoint

TARGET = SSHEndpoint("dr", 22, "zerfaux", None, None)
VC = VCenterEndpoint("vc-dr", "vc-dr", "vc", 443, "admin", None, True)
REPLICA = "tank/replicas/gold"


def test_the_stubs_are_the_protocols() -> None:
    compute: FailoverCompute = FailoverComputeStub()
    storage: FailoverStorage = FailoverStorageStub()
    assert compute and storage
    assert pre_failover_snapshot("0123abcd-ef45-4000-8000-000000000000") == "zerfaux_pre_failover_0123abcd"


def test_shutdown_guest_power_off_refusal_and_already_off(tmp_path: Path) -> None:
    world = StubWorld(tmp_path)
    stub, stop = FailoverComputeStub(world=world), StopSignal()
    assert stub.shutdown_vm(VC, "vm-1", 0, False, stop).how == "guest"  # unknown VM: on, with Tools
    again = stub.shutdown_vm(VC, "vm-1", 0, False, stop)
    assert again.how == "already_off" and stub.power_state(VC, "vm-1", stop) == ("poweredOff", again.powered_off_at)

    stub.put_vm(VC, "vm-2", tools=False)
    with pytest.raises(PermanentError, match="options.force_power_off"):
        stub.shutdown_vm(VC, "vm-2", 0.05, False, stop)
    assert stub.power_state(VC, "vm-2", stop).state == "poweredOn"
    forced = stub.shutdown_vm(VC, "vm-2", 0.05, True, stop)
    assert forced.how == "power_off" and forced.waited_seconds >= 0.05
    effects = [(e["subject"], e["how"]) for e in world.journal() if e["kind"] == "failover.vm"]
    assert effects == [("vm-1", "guest"), ("vm-2", "power_off")]

    stub.put_vm(VC, "vm-3", obeys=False)  # a guest ignoring the shutdown: the wait is cancelled midway
    cancel = StopSignal()
    threading.Timer(0.1, cancel.cancel).start()
    with pytest.raises(OperationCancelled):
        stub.shutdown_vm(VC, "vm-3", 30, True, cancel)
    assert stub.power_state(VC, "vm-3", stop).state == "poweredOn"


def test_disks_attach_once_need_the_datastore_and_detach_only_when_off(tmp_path: Path) -> None:
    world = StubWorld(tmp_path)
    stub, stop = FailoverComputeStub(world=world), StopSignal()
    disks = [RecoveryDisk("[dr-ds] app/app.vmdk", 1), RecoveryDisk("[dr-ds] app/app_1.vmdk", 1)]
    with pytest.raises(PermanentError, match="'dr-ds'.*not mounted"):
        stub.attach_disks(VC, "vm-9", disks, stop)
    RecoveryComputeStub(world=world).present_datastore(VC, Placement("dc", "c", ("h",)), "dr-ds", "nfs", "/x", stop)
    assert stub.attach_disks(VC, "vm-9", disks, stop).attached == tuple(d.file for d in disks)
    second = stub.attach_disks(VC, "vm-9", disks, stop)
    assert second.attached == () and second.already == tuple(d.file for d in disks)
    with pytest.raises(PermanentError, match="power it off"):
        stub.detach_disks(VC, "vm-9", stop)
    stub.shutdown_vm(VC, "vm-9", 0, False, stop)
    assert stub.detach_disks(VC, "vm-9", stop) == tuple(d.file for d in disks)
    assert stub.detach_disks(VC, "vm-9", stop) == ()


def test_set_networks_refuses_unknown_networks_then_converges(tmp_path: Path) -> None:
    stub, stop = FailoverComputeStub(world=StubWorld(tmp_path)), StopSignal()
    stub.put_vm(VC, "vm-5", nics=["dr-placeholder"])
    with pytest.raises(PermanentError, match="'nowhere'.*network_mappings"):
        stub.set_networks(VC, "vm-5", [RecoveryNic("nowhere", "prod")], stop)
    nics = [RecoveryNic("dr-network", "prod"), RecoveryNic("VM Network", "mgmt")]
    assert [c.changed for c in stub.set_networks(VC, "vm-5", nics, stop)] == [True, True]
    assert [c.changed for c in stub.set_networks(VC, "vm-5", nics, stop)] == [False, False]


def test_storage_snapshot_rollback_written_and_rename(tmp_path: Path) -> None:
    world = StubWorld(tmp_path)
    world.write("replica", REPLICA, content=json.dumps([["zerfaux-1", 1], ["zerfaux-2", 2]]))
    stub, stop = FailoverStorageStub(world=world), StopSignal()
    pre = pre_failover_snapshot("abcdef01-0000-4000-8000-000000000000")
    first, again = stub.snapshot(TARGET, REPLICA, pre, stop), stub.snapshot(TARGET, REPLICA, pre, stop)
    assert (first.created, again.created, first.guid) == (True, False, again.guid)
    assert stub.promote_writable(TARGET, REPLICA, stop) == "/" + REPLICA
    stub.write_data(TARGET, REPLICA, 5000)
    assert stub.written_since(TARGET, REPLICA, pre, stop).bytes == 5000
    assert stub.written_since(TARGET, REPLICA, "zerfaux-2", stop).bytes == 5000
    with pytest.raises(PermanentError, match=f"newer are .*{REPLICA}@{pre}"):
        stub.rollback(TARGET, REPLICA, "zerfaux-2", stop)
    assert stub.written_since(TARGET, REPLICA, pre, stop).bytes == 5000  # the refusal changed nothing
    assert stub.rollback(TARGET, REPLICA, pre, stop) == (REPLICA,)
    assert stub.written_since(TARGET, REPLICA, pre, stop).bytes == 0

    stub.put_dataset(TARGET, "tank/replicas/taken")
    with pytest.raises(PermanentError, match="never renames over"):
        stub.rename(TARGET, REPLICA, "tank/replicas/taken", stop)
    assert stub.rename(TARGET, REPLICA, "tank/replicas/gold-kept", stop) is True
    assert stub.rename(TARGET, REPLICA, "tank/replicas/gold-kept", stop) is False
    kept = stub.snapshot(TARGET, "tank/replicas/gold-kept", "zerfaux-1", stop)
    assert not kept.created and kept.guid == fake_guid(REPLICA, "zerfaux-1")  # same snapshots, same GUIDs
    with pytest.raises(PermanentError, match="does not exist"):
        stub.written_since(TARGET, REPLICA, pre, stop)


@pytest.mark.parametrize("bad", ["tank/a;rm -rf /", "-R", "tank/../x", ""])
def test_storage_stub_refuses_hostile_names(bad: str) -> None:
    stub, stop = FailoverStorageStub(), StopSignal()
    with pytest.raises(PermanentError, match="not an acceptable|is empty"):
        stub.snapshot(TARGET, bad, "s", stop)
    with pytest.raises(PermanentError, match="not an acceptable|is empty"):
        stub.rename(TARGET, REPLICA, bad, stop)
