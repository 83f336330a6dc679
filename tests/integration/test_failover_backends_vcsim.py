"""``FailoverComputeReal`` against vcsim: shutdown and fencing reads, disks onto DR shells, NICs moved.

A simulator of this module's own (one cluster of two hosts, one standalone host). Every check
reads vcsim through a separate pyVmomi session (``Simulator``'s oracle): power states and
vCenter's own power events, the VM's devices, the datastore's files. vcsim 0.24 simulates no
VMware Tools; ``mark_tools_running`` plays them (FACTS.md).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from handlers.backends.vcenter import query
from handlers.backends.vcenter.failover import FailoverComputeReal
from handlers.backends.vcenter.real import RecoveryComputeReal, VCenterSessions
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic
from handlers.recovery.failover_backends import FailoverCompute
from tests.support.vcsim import Simulator, mark_tools_running, start_simulator

pytestmark = pytest.mark.vcsim

CLUSTER = "DC0_C0"
LOCAL_DS = "LocalDS_0"


@pytest.fixture(scope="module")
def sim(vcsim_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    workdir = tmp_path_factory.mktemp("vcsim-failover")
    s = start_simulator(vcsim_binary, "failover", workdir,
                        args=("-cluster", "1", "-host", "2", "-vm", "1", "-standalone-host", "1"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def sessions(sim: Simulator) -> Iterator[VCenterSessions]:
    s = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file)
    yield s
    s.close()


@pytest.fixture(scope="module")
def fo(sessions: VCenterSessions) -> FailoverCompute:
    return FailoverComputeReal(sessions)  # typed as the Protocol: mypy checks the real class against it


def make_vm(sim: Simulator, name: str, *, marked: bool = True, power_on: bool = True,
            controller: bool = False) -> str:
    """A VM made through the oracle: one NIC on 'VM Network', optionally Zerfaux's DR-shell mark."""
    dc = next(d for d in sim.find(vim.Datacenter) if d.name == "DC0")
    cluster = next(c for c in sim.find(vim.ClusterComputeResource) if c.name == CLUSTER)
    dev = vim.vm.device
    nic = dev.VirtualDeviceSpec(operation="add", device=dev.VirtualVmxnet3(
        key=-300, backing=dev.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network")))
    changes = [nic]
    if controller:
        changes.append(dev.VirtualDeviceSpec(operation="add", device=dev.ParaVirtualSCSIController(
            key=-100, busNumber=0, sharedBus="noSharing")))
    extra = [vim.option.OptionValue(key="zerfaux.protected_vm_id", value=f"pv-{name}")] if marked else []
    spec = vim.vm.ConfigSpec(name=name, guestId="otherGuest64", numCPUs=1, memoryMB=64, deviceChange=changes,
                             files=vim.vm.FileInfo(vmPathName=f"[{LOCAL_DS}] {name}/{name}.vmx"), extraConfig=extra)
    task = dc.vmFolder.CreateVM_Task(config=spec, pool=cluster.resourcePool)
    WaitForTask(task)
    vm = task.info.result
    if power_on:
        WaitForTask(vm.PowerOnVM_Task())
    return str(vm._moId)


def off_events(sim: Simulator, moref: str) -> list[vim.event.Event]:
    spec = vim.event.EventFilterSpec(entity=vim.event.EventFilterSpec.ByEntity(entity=sim.vm(moref), recursion="self"),
                                     eventTypeId=["VmPoweredOffEvent"])
    return list(sim.si().content.eventManager.QueryEvents(spec) or [])


def name() -> str:
    return f"fo-{uuid.uuid4().hex[:8]}"


# ---- shutdown and fencing reads -----------------------------------------------------------------


def test_guest_shutdown_when_tools_run_then_already_off(sim: Simulator, fo: FailoverCompute) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    moref = make_vm(sim, name())
    mark_tools_running(sim, moref)
    before = fo.power_state(ep, moref, stop)
    assert before.state == "poweredOn" and before.changed_at is not None

    done = fo.shutdown_vm(ep, moref, 30, False, stop)
    assert done.how == "guest" and done.waited_seconds < 30
    assert sim.vm(moref).runtime.powerState == "poweredOff"
    events = off_events(sim, moref)
    assert events and done.powered_off_at == max(e.createdTime for e in events).isoformat()

    again = fo.shutdown_vm(ep, moref, 30, False, stop)
    assert (again.how, again.waited_seconds) == ("already_off", 0.0)
    assert again.powered_off_at == done.powered_off_at
    state = fo.power_state(ep, moref, stop)  # what a fencing check reads: vCenter's state and time
    assert (state.state, state.changed_at) == ("poweredOff", done.powered_off_at)


def test_power_states_reads_many_vms_at_once_and_leaves_out_a_missing_one(
        sim: Simulator, fo: FailoverCompute, monkeypatch: pytest.MonkeyPatch) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    on, off = make_vm(sim, name()), make_vm(sim, name(), power_on=False)
    gone = make_vm(sim, name(), power_on=False)
    WaitForTask(sim.vm(gone).Destroy_Task())
    calls: list[int] = []
    real = query._retrieve
    monkeypatch.setattr(query, "_retrieve", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    states = fo.power_states(ep, [on, off, gone], stop)
    assert states == {on: sim.vm(on).runtime.powerState, off: sim.vm(off).runtime.powerState}
    assert states == {on: "poweredOn", off: "poweredOff"}
    assert len(calls) <= 2  # one read (one more when vcsim names the missing VM), not one per VM
    assert fo.power_states(ep, [], stop) == {}


def test_without_tools_and_force_false_the_vm_is_left_running_and_named(
        sim: Simulator, fo: FailoverCompute) -> None:
    vm_name = name()
    moref = make_vm(sim, vm_name)  # no Tools: vcsim's ShutdownGuest would power it off; it must not be called
    t0 = time.monotonic()
    with pytest.raises(PermanentError) as refused:
        fo.shutdown_vm(sim.endpoint(), moref, 1, False, threading.Event())
    text = str(refused.value)
    assert vm_name in text and "options.force_power_off" in text and "not running" in text, text
    assert time.monotonic() - t0 >= 1
    assert sim.vm(moref).runtime.powerState == "poweredOn"
    assert off_events(sim, moref) == []


def test_without_tools_and_force_true_it_is_powered_off_after_the_timeout(
        sim: Simulator, fo: FailoverCompute) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    moref = make_vm(sim, name())
    done = fo.shutdown_vm(ep, moref, 1, True, stop)
    assert done.how == "power_off" and done.waited_seconds >= 1
    assert sim.vm(moref).runtime.powerState == "poweredOff"
    assert done.powered_off_at == max(e.createdTime for e in off_events(sim, moref)).isoformat()
    assert fo.shutdown_vm(ep, moref, 1, True, stop).how == "already_off"


def test_an_already_off_vm_is_not_touched(sim: Simulator, fo: FailoverCompute) -> None:
    moref = make_vm(sim, name(), power_on=False)
    done = fo.shutdown_vm(sim.endpoint(), moref, 5, False, threading.Event())
    assert done.how == "already_off" and done.waited_seconds == 0.0
    assert sim.vm(moref).runtime.powerState == "poweredOff"


# ---- disks --------------------------------------------------------------------------------------


@pytest.fixture
def replica(sim: Simulator, sessions: VCenterSessions, tmp_path: Path) -> tuple[str, Path]:
    """A directory laid out like a replica (app/disk.vmdk, app/disk_1.vmdk + flats), presented on the cluster."""
    tag = f"zerfaux-fo-{uuid.uuid4().hex[:8]}"
    root = tmp_path / tag
    sim.datastore_dirs[tag] = root
    sim.add_replica("app", disks=2, datastore=tag)
    compute, stop = RecoveryComputeReal(sessions), threading.Event()
    placement = compute.check_site(sim.endpoint(), [], CLUSTER, stop).placement
    compute.present_datastore(sim.endpoint(), placement, tag, "127.0.0.1", str(root), stop)
    return tag, root


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_attach_twice_is_one_disk_each_and_detach_keeps_the_files(
        sim: Simulator, fo: FailoverCompute, replica: tuple[str, Path]) -> None:
    tag, root = replica
    ep, stop = sim.endpoint(), threading.Event()
    shell = make_vm(sim, name(), power_on=False, controller=True)
    disks = [RecoveryDisk(f"[{tag}] app/disk.vmdk", 0, "pvscsi"), RecoveryDisk(f"[{tag}] app/disk_1.vmdk", 0, "lsilogic")]
    files_before = digests(root)

    first = fo.attach_disks(ep, shell, disks, stop)
    assert first.attached == tuple(d.file for d in disks) and first.already == ()
    second = fo.attach_disks(ep, shell, disks, stop)
    assert second.attached == () and second.already == tuple(d.file for d in disks)
    assert sorted(sim.vm_disk_files(shell)) == sorted(d.file for d in disks)
    devices = sim.vm(shell).config.hardware.device
    kinds = {type(d).__name__ for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)}
    assert kinds == {"vim.vm.device.ParaVirtualSCSIController", "vim.vm.device.VirtualLsiLogicController"}, kinds

    WaitForTask(sim.vm(shell).PowerOnVM_Task())
    with pytest.raises(PermanentError, match="power it off"):
        fo.detach_disks(ep, shell, stop)
    assert len(sim.vm_disk_files(shell)) == 2
    WaitForTask(sim.vm(shell).PowerOffVM_Task())

    assert sorted(fo.detach_disks(ep, shell, stop)) == sorted(d.file for d in disks)
    assert sim.vm_disk_files(shell) == []
    assert fo.detach_disks(ep, shell, stop) == ()
    assert digests(root) == files_before  # every file still there, byte for byte


def test_attach_refuses_an_unpresented_datastore_and_an_unmarked_vm(
        sim: Simulator, fo: FailoverCompute, replica: tuple[str, Path]) -> None:
    tag, _ = replica
    ep, stop = sim.endpoint(), threading.Event()
    shell = make_vm(sim, name(), power_on=False)
    with pytest.raises(PermanentError, match="'nowhere-ds' of .* is not mounted"):
        fo.attach_disks(ep, shell, [RecoveryDisk("[nowhere-ds] app/disk.vmdk", 0, "pvscsi")], stop)
    foreign = make_vm(sim, name(), marked=False, power_on=False)
    with pytest.raises(PermanentError, match="does not carry zerfaux.protected_vm_id"):
        fo.attach_disks(ep, foreign, [RecoveryDisk(f"[{tag}] app/disk.vmdk", 0, "pvscsi")], stop)
    assert sim.vm_disk_files(shell) == [] and sim.vm_disk_files(foreign) == []


# ---- networks -----------------------------------------------------------------------------------


def test_set_networks_moves_and_adds_nics_once_and_refuses_unknown_networks(
        sim: Simulator, fo: FailoverCompute, sessions: VCenterSessions) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    compute = RecoveryComputeReal(sessions)
    placement = compute.check_site(ep, [], CLUSTER, stop).placement
    recovery_net = f"fo-rec-{uuid.uuid4().hex[:8]}"
    compute.create_port_group(ep, placement, recovery_net, stop)
    moref = make_vm(sim, name(), power_on=False)
    nics = [RecoveryNic(network=recovery_net, source_network="prod"), RecoveryNic(network="VM Network",
                                                                                   source_network="mgmt")]

    def backings() -> list[str]:
        cards = sorted((d for d in sim.vm(moref).config.hardware.device
                        if isinstance(d, vim.vm.device.VirtualEthernetCard)), key=lambda d: d.key)
        return [str(getattr(c.backing, "deviceName", None)) for c in cards]

    with pytest.raises(PermanentError, match="'no-such-net'.*network_mappings.recovery_network"):
        fo.set_networks(ep, moref, [RecoveryNic("no-such-net", "prod")], stop)
    assert backings() == ["VM Network"]

    first = fo.set_networks(ep, moref, nics, stop)
    assert [c.changed for c in first] == [True, True]
    assert backings() == [recovery_net, "VM Network"]
    assert recovery_net in {n.name for n in sim.vm(moref).network}
    again = fo.set_networks(ep, moref, nics, stop)
    assert [c.changed for c in again] == [False, False] and backings() == [recovery_net, "VM Network"]
