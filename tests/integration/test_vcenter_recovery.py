"""``RecoveryComputeReal`` against vcsim: what a test failover does at the DR vCenter.

A simulator of this module's own (one cluster of two hosts and one standalone host), since the
run's datastores cannot be removed from vcsim and would stay in the session's. Every check
reads vcsim through a separate pyVmomi session (``Simulator``'s oracle), not our return values.
The run's datastore is a directory standing in for a ZFS clone's mountpoint, presented by the
Go main's ``CreateNasDatastore`` the way ESXi does (name = ``localPath``, files = ``remotePath``).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from handlers.backends.vcenter.real import DRShellBuilderReal, RecoveryComputeReal, VCenterSessions
from handlers.dr_shell import ShellDisk, ShellSpec
from handlers.errors import OperationCancelled, PermanentError
from handlers.recovery.backends import Placement, RecoveryDisk, RecoveryNic, RecoveryVMSpec, run_tag
from tests.support.vcsim import Simulator, mark_tools_running, start_simulator

pytestmark = pytest.mark.vcsim

CLUSTER = "DC0_C0"
STANDALONE = "DC0_H0"
NFS_HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def sim(vcsim_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    workdir = tmp_path_factory.mktemp("vcsim-recovery")
    s = start_simulator(vcsim_binary, "recovery", workdir,
                        args=("-cluster", "1", "-host", "2", "-vm", "1", "-standalone-host", "1"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def compute(sim: Simulator) -> Iterator[RecoveryComputeReal]:
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file)
    yield RecoveryComputeReal(sessions, await_seconds=2.0)
    sessions.close()


@dataclass
class Run:
    run_id: str
    tag: str
    clone: Path  # the clone's mountpoint (the NFS export's path)
    placement: Placement


@pytest.fixture
def run(sim: Simulator, compute: RecoveryComputeReal, tmp_path: Path) -> Run:
    """A run whose clone holds one VM's disks (``app/disk.vmdk`` + flat), presented on the cluster."""
    run_id = str(uuid.uuid4())
    tag = run_tag(run_id)
    clone = tmp_path / tag
    sim.datastore_dirs[tag] = clone
    sim.add_replica("app", datastore=tag)
    placement = compute.check_site(sim.endpoint(), [], None, threading.Event()).placement
    return Run(run_id, tag, clone, placement)


def host_objs(sim: Simulator, names: tuple[str, ...]) -> list[vim.HostSystem]:
    hosts = {h.name: h for h in sim.find(vim.HostSystem)}
    return [hosts[n] for n in names]


def dc_networks(sim: Simulator) -> set[str]:
    return {n.name for dc in sim.find(vim.Datacenter) for n in dc.network}


def spec(run: Run, pv: str, nics: tuple[RecoveryNic, ...] = ()) -> RecoveryVMSpec:
    return RecoveryVMSpec(
        run_id=run.run_id, protected_vm_id=pv, name=f"{pv}-test-{run.tag[-8:]}", datastore=run.tag,
        num_cpu=1, memory_mb=128, guest_id="otherGuest64", firmware="bios",
        disks=(RecoveryDisk(file=f"[{run.tag}] app/disk.vmdk", capacity=0, controller="pvscsi"),), nics=nics,
    )


def presented(compute: RecoveryComputeReal, sim: Simulator, run: Run) -> None:
    compute.present_datastore(sim.endpoint(), run.placement, run.tag, NFS_HOST, str(run.clone), threading.Event())


# ---- the site -------------------------------------------------------------------------------------


def test_check_site_names_missing_networks_and_places_on_the_first_cluster(
    sim: Simulator, compute: RecoveryComputeReal
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    known = sorted(dc_networks(sim))
    assert "VM Network" in known
    site = compute.check_site(ep, ["VM Network", "no-such-net", "VM Network", "lab-2"], None, stop)
    assert site.networks_missing == ("no-such-net", "lab-2")
    cluster = next(c for c in sim.find(vim.ClusterComputeResource) if c.name == CLUSTER)
    assert site.placement.compute_resource == CLUSTER
    assert site.placement.datacenter == "DC0"
    assert sorted(site.placement.hosts) == sorted(h.name for h in cluster.host) and len(cluster.host) == 2

    alone = compute.check_site(ep, [], STANDALONE, stop).placement
    assert alone.compute_resource == STANDALONE and alone.hosts == (STANDALONE,)
    with pytest.raises(PermanentError, match="'nope-cluster'.*dr_cluster"):
        compute.check_site(ep, [], "nope-cluster", stop)


# ---- the datastore --------------------------------------------------------------------------------


def test_present_datastore_mounts_the_directory_on_every_host(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    (run.clone / "app" / "notes.txt").write_text("from the recovery point\n")
    assert compute.present_datastore(ep, run.placement, run.tag, NFS_HOST, str(run.clone), stop) is True
    assert compute.present_datastore(ep, run.placement, run.tag, NFS_HOST, str(run.clone), stop) is False

    for host in host_objs(sim, run.placement.hosts):
        named = [d for d in host.datastore if d.name == run.tag]
        assert len(named) == 1, (host.name, [d.name for d in host.datastore])
        nas = named[0].info.nas
        assert (nas.remoteHost, nas.remotePath) == (NFS_HOST, str(run.clone))
    others = host_objs(sim, (STANDALONE,))[0]
    assert run.tag not in {d.name for d in others.datastore}  # only the placement's hosts

    ds = next(d for d in sim.find(vim.Datastore) if d.name == run.tag)
    task = ds.browser.SearchDatastoreSubFolders_Task(
        f"[{run.tag}]", vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"]))
    WaitForTask(task)
    # (folder's last name, file): vcsim joins folders as "[ds]/app", vSphere as "[ds] app".
    listed = {(r.folderPath.replace("]", "/").rstrip("/").split("/")[-1].strip(), f.path)
              for r in task.info.result for f in r.file or ()}
    assert {("app", "notes.txt"), ("app", "disk-flat.vmdk"), ("app", "disk.vmdk")} <= listed, listed

    with pytest.raises(PermanentError, match="not this run's"):
        compute.present_datastore(ep, run.placement, run.tag, NFS_HOST, "/elsewhere", stop)


def test_remove_datastore_says_in_words_that_vcsim_cannot(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    assert compute.remove_datastore(ep, run.placement, run.tag, stop) is None  # nothing mounted yet
    presented(compute, sim, run)
    warning = compute.remove_datastore(ep, run.placement, run.tag, stop)
    assert warning is not None and "RemoveDatastore" in warning and run.tag in warning
    for name in run.placement.hosts:
        assert name in warning
    for host in host_objs(sim, run.placement.hosts):  # what the warning says: still there
        assert run.tag in {d.name for d in host.datastore}


# ---- the port group -------------------------------------------------------------------------------


def test_isolated_port_group_on_its_own_vswitch_then_removed(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    assert compute.create_port_group(ep, run.placement, run.tag, stop) is True
    assert compute.create_port_group(ep, run.placement, run.tag, stop) is False
    assert run.tag in dc_networks(sim)
    for host in host_objs(sim, run.placement.hosts):
        info = host.configManager.networkSystem.networkInfo
        switch = next(v for v in info.vswitch if v.name == run.tag)
        assert not switch.pnic and (switch.spec is None or switch.spec.bridge is None)  # no uplink
    first = host_objs(sim, run.placement.hosts[:1])[0]
    groups = {p.spec.name: p.spec.vswitchName for p in first.configManager.networkSystem.networkInfo.portgroup}
    assert groups[run.tag] == run.tag

    assert compute.remove_port_group(ep, run.placement, run.tag, stop) is True
    assert compute.remove_port_group(ep, run.placement, run.tag, stop) is False
    assert run.tag not in dc_networks(sim)
    for host in host_objs(sim, run.placement.hosts):
        assert run.tag not in {v.name for v in host.configManager.networkSystem.networkInfo.vswitch}


def test_a_foreign_network_of_the_run_s_name_is_refused(sim: Simulator, compute: RecoveryComputeReal, run: Run) -> None:
    host = host_objs(sim, (STANDALONE,))[0]  # not in the placement: its port group is somebody else's
    system = host.configManager.networkSystem
    system.AddPortGroup(vim.host.PortGroup.Specification(
        name=run.tag, vlanId=0, vswitchName="vSwitch0", policy=vim.host.NetworkPolicy()))
    try:
        with pytest.raises(PermanentError, match="not this run's"):
            compute.create_port_group(sim.endpoint(), run.placement, run.tag, threading.Event())
        for h in host_objs(sim, run.placement.hosts):
            assert run.tag not in {v.name for v in h.configManager.networkSystem.networkInfo.vswitch}
    finally:
        system.RemovePortGroup(run.tag)


# ---- VMs ------------------------------------------------------------------------------------------


def test_create_vm_twice_makes_one_vm_on_the_run_datastore_and_port_group(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    presented(compute, sim, run)
    compute.create_port_group(ep, run.placement, run.tag, stop)
    s = spec(run, "pv-a", nics=(RecoveryNic(network=run.tag, source_network="prod"),
                                RecoveryNic(network="VM Network", source_network="mgmt")))
    first = compute.create_vm(ep, run.placement, s, stop)
    second = compute.create_vm(ep, run.placement, s, stop)
    assert (first.adopted, second.adopted) == (False, True) and first.moref == second.moref
    assert sim.count_vms_named(s.name) == 1

    vm = sim.vm(first.moref)
    assert vm.runtime.powerState == "poweredOff"
    assert vm.config.files.vmPathName == f"[{run.tag}] {s.name}/{s.name}.vmx"
    assert sim.vm_disk_files(first.moref) == [f"[{run.tag}] app/disk.vmdk"]
    marks = {o.key: o.value for o in vm.config.extraConfig}
    assert marks["zerfaux.recovery_run_id"] == run.run_id and marks["zerfaux.protected_vm_id"] == "pv-a"
    nics = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [n.backing.deviceName for n in nics] == [run.tag, "VM Network"]
    assert run.tag in {n.name for n in vm.network}
    assert vm.runtime.host.name in run.placement.hosts
    # The disk file the VM uses is the clone's own file, byte for byte.
    flat = run.clone / "app" / "disk-flat.vmdk"
    assert hashlib.sha256(flat.read_bytes()).hexdigest() == hashlib.sha256(b"\0" * 4096).hexdigest()


def test_create_vm_refuses_an_unknown_network_and_an_unpresented_datastore(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    s = spec(run, "pv-b")
    with pytest.raises(PermanentError, match="not mounted on any connected host"):
        compute.create_vm(ep, run.placement, s, stop)
    presented(compute, sim, run)
    bad = spec(run, "pv-b", nics=(RecoveryNic(network="nowhere-net", source_network="prod"),))
    with pytest.raises(PermanentError, match="'nowhere-net'.*network_mappings"):
        compute.create_vm(ep, run.placement, bad, stop)
    assert sim.count_vms_named(s.name) == 0


def test_power_on_and_wait_ready(sim: Simulator, compute: RecoveryComputeReal, run: Run) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    presented(compute, sim, run)
    marked = compute.create_vm(ep, run.placement, spec(run, "pv-tools"), stop).moref
    silent = compute.create_vm(ep, run.placement, spec(run, "pv-silent"), stop).moref
    late = compute.create_vm(ep, run.placement, spec(run, "pv-late"), stop).moref

    boot = compute.power_on(ep, marked, stop)
    vm = sim.vm(marked)
    assert vm.runtime.powerState == "poweredOn"
    assert boot == vm.summary.runtime.bootTime.isoformat()
    assert compute.power_on(ep, marked, stop) == boot  # already on: no second power-on

    assert compute.wait_ready(ep, marked, 0, stop).ready is False  # 0: do not wait
    mark_tools_running(sim, marked)
    ready = compute.wait_ready(ep, marked, 30, stop)
    assert ready.ready and ready.how == "tools" and ready.waited_seconds < 30

    compute.power_on(ep, silent, stop)
    t0 = time.monotonic()
    timed_out = compute.wait_ready(ep, silent, 2, stop)
    assert timed_out.ready is False and timed_out.how is None
    assert timed_out.waited_seconds >= 2 and time.monotonic() - t0 < 20
    zero = compute.wait_ready(ep, silent, 0, stop)
    assert (zero.ready, zero.how, zero.waited_seconds) == (False, None, 0.0)

    # Tools starting while it waits: the long poll notices the change.
    compute.power_on(ep, late, stop)
    timer = threading.Timer(1.5, mark_tools_running, (sim, late))
    timer.start()
    try:
        woke = compute.wait_ready(ep, late, 60, stop)
    finally:
        timer.join()
    assert woke.ready and woke.how == "tools" and 1.0 <= woke.waited_seconds < 60


def test_heartbeat_alone_is_ready_and_stop_ends_the_wait(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep = sim.endpoint()
    presented(compute, sim, run)
    moref = compute.create_vm(ep, run.placement, spec(run, "pv-hb"), threading.Event()).moref
    compute.power_on(ep, moref, threading.Event())
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(OperationCancelled):
        compute.wait_ready(ep, moref, 120, stop)
    assert time.monotonic() - t0 < 30

    WaitForTask(sim.vm(moref).ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="SET.summary.quickStats.guestHeartbeatStatus", value="green")])))
    got = compute.wait_ready(ep, moref, 30, threading.Event())
    assert got.ready and got.how == "heartbeat"


def test_destroy_vm_only_with_the_run_s_mark_and_find_run_vms(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    presented(compute, sim, run)
    a = compute.create_vm(ep, run.placement, spec(run, "pv-1"), stop).moref
    b = compute.create_vm(ep, run.placement, spec(run, "pv-2"), stop).moref
    compute.power_on(ep, a, stop)
    assert compute.find_run_vms(ep, run.run_id, stop) == {"pv-1": a, "pv-2": b}
    assert compute.find_run_vms(ep, str(uuid.uuid4()), stop) == {}

    foreign = next(v for v in sim.find(vim.VirtualMachine) if v.name.startswith("DC0_"))
    with pytest.raises(PermanentError, match="does not carry zerfaux.recovery_run_id"):
        compute.destroy_vm(ep, foreign._moId, run.run_id, stop)
    with pytest.raises(PermanentError, match="does not carry"):
        compute.destroy_vm(ep, a, str(uuid.uuid4()), stop)  # another run's VM
    assert sim.count_vms_named(foreign.name) == 1 and sim.vm(a).runtime.powerState == "poweredOn"

    assert compute.destroy_vm(ep, a, run.run_id, stop) is True
    assert compute.destroy_vm(ep, a, run.run_id, stop) is False
    assert {v._moId for v in sim.find(vim.VirtualMachine)} >= {b} and a not in {
        v._moId for v in sim.find(vim.VirtualMachine)}
    assert compute.find_run_vms(ep, run.run_id, stop) == {"pv-2": b}
    # Its disks were detached first: the clone's files are the clone's to destroy; its own directory went.
    assert (run.clone / "app" / "disk-flat.vmdk").exists() and (run.clone / "app" / "disk.vmdk").exists()
    assert not (run.clone / spec(run, "pv-1").name).exists() and (run.clone / spec(run, "pv-2").name).is_dir()


def test_parallel_power_on_of_five_vms_and_a_racing_create(
    sim: Simulator, compute: RecoveryComputeReal, run: Run
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    presented(compute, sim, run)
    with ThreadPoolExecutor(3) as pool:
        raced = list(pool.map(lambda _: compute.create_vm(ep, run.placement, spec(run, "pv-race"), stop), range(3)))
    assert len({r.moref for r in raced}) == 1 and sorted(r.adopted for r in raced) == [False, True, True]
    assert sim.count_vms_named(spec(run, "pv-race").name) == 1

    morefs = [compute.create_vm(ep, run.placement, spec(run, f"pv-p{i}"), stop).moref for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        boots = list(pool.map(lambda m: compute.power_on(ep, m, stop), morefs))
    for moref, boot in zip(morefs, boots):
        vm = sim.vm(moref)
        assert vm.runtime.powerState == "poweredOn" and vm.summary.runtime.bootTime.isoformat() == boot
    for moref in morefs[:3]:
        mark_tools_running(sim, moref)
    with ThreadPoolExecutor(5) as pool:
        ready = list(pool.map(lambda m: compute.wait_ready(ep, m, 3, stop), morefs))
    assert [r.ready for r in ready] == [True, True, True, False, False]


# ---- DR shells: placement by datastore visibility (issue 13, "Placement") --------------------------


def local_datastore(sim: Simulator, host_name: str, name: str, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    sim.datastore_dirs[name] = directory
    system = host_objs(sim, (host_name,))[0].configManager.datastoreSystem
    system.CreateLocalDatastore(name, str(directory))


def shell_spec(pv: str, disks: list[str], dr: str, placeholder: str, cluster: str | None = None) -> ShellSpec:
    return ShellSpec(
        protected_vm_id=pv, name=f"{pv}-dr", datastore=dr, num_cpu=1, memory_mb=128, guest_id="otherGuest64",
        firmware="bios", controller="pvscsi", disks=tuple(ShellDisk(file=d, capacity=0) for d in disks),
        placeholder_datastore=placeholder, cluster=cluster, target_name="dr-zfs",
    )


def test_a_dr_shell_goes_to_the_standalone_host_that_mounts_its_datastores(
    sim: Simulator, tmp_path: Path
) -> None:
    hexa = uuid.uuid4().hex[:8]
    dr, ph = f"solo-dr-{hexa}", f"solo-ph-{hexa}"
    local_datastore(sim, STANDALONE, dr, tmp_path / "dr")
    local_datastore(sim, STANDALONE, ph, tmp_path / "ph")
    disks = sim.add_replica(f"vm-{hexa}", datastore=dr)
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file)
    try:
        builder = DRShellBuilderReal(sessions)
        # dr_cluster names a cluster whose hosts lack the datastores: refused at once, in words, nothing made.
        with pytest.raises(PermanentError) as refused:
            builder.ensure_shell(sim.endpoint(), shell_spec(f"pv-{hexa}", disks, dr, ph, cluster=CLUSTER))
        text = str(refused.value)
        assert dr in text and ph in text and "DC0_C0_H0" in text and "DC0_C0_H1" in text, text
        assert sim.count_vms_named(f"pv-{hexa}-dr") == 0

        made = builder.ensure_shell(sim.endpoint(), shell_spec(f"pv-{hexa}", disks, dr, ph))
        vm = sim.vm(made.moref)
        assert vm.runtime.host.name == STANDALONE
        assert vm.resourcePool.owner.name == STANDALONE
        assert sim.vm_disk_files(made.moref) == disks

        # The disks' datastore on the standalone host, the configuration's on a cluster host only.
        other = f"c0-ph-{hexa}"
        local_datastore(sim, "DC0_C0_H0", other, tmp_path / "other")
        with pytest.raises(PermanentError, match=f"datastore '{other}' is not mounted on .*'{STANDALONE}'"):
            builder.ensure_shell(sim.endpoint(), shell_spec(f"pv2-{hexa}", disks, dr, other))
        assert sim.count_vms_named(f"pv2-{hexa}-dr") == 0
    finally:
        sessions.close()


def test_a_run_vm_is_never_taken_for_the_dr_shell_of_its_protected_vm(
    sim: Simulator, compute: RecoveryComputeReal, run: Run, tmp_path: Path
) -> None:
    ep, stop = sim.endpoint(), threading.Event()
    presented(compute, sim, run)
    pv = f"pv-{uuid.uuid4().hex[:8]}"
    test_vm = compute.create_vm(ep, run.placement, spec(run, pv), stop).moref
    compute.power_on(ep, test_vm, stop)
    dr, ph = f"c-dr-{pv}", f"c-ph-{pv}"
    for name in (dr, ph):
        for host in run.placement.hosts:
            local_datastore(sim, host, name, tmp_path / name)
    disks = sim.add_replica(pv, datastore=dr)
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file)
    try:
        shell = DRShellBuilderReal(sessions).ensure_shell(ep, shell_spec(pv, disks, dr, ph))
    finally:
        sessions.close()
    assert shell.adopted is False and shell.moref != test_vm
    assert sim.vm(test_vm).runtime.powerState == "poweredOn"  # left alone
    assert compute.find_run_vms(ep, run.run_id, stop) == {pv: test_vm}


def test_two_listeners_creating_one_vm_make_one(sim: Simulator, compute: RecoveryComputeReal, run: Run) -> None:
    """Separate sessions and no shared lock (two processes): the .vmx path and the marks decide."""
    ep = sim.endpoint()
    presented(compute, sim, run)
    sessions = [VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file) for _ in range(4)]
    listeners = [RecoveryComputeReal(s, await_seconds=5.0) for s in sessions]
    gate = threading.Barrier(len(listeners))
    s = spec(run, "pv-twice")

    def create(listener: RecoveryComputeReal) -> str:
        gate.wait(10)
        return listener.create_vm(ep, run.placement, s, threading.Event()).moref

    try:
        with ThreadPoolExecutor(len(listeners)) as pool:
            morefs = set(pool.map(create, listeners))
    finally:
        for one in sessions:
            one.close()
    assert len(morefs) == 1 and sim.count_vms_named(s.name) == 1
    assert compute.find_run_vms(ep, run.run_id, threading.Event()) == {"pv-twice": morefs.pop()}
