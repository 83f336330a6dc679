"""The world a test failover runs in, everything real: two vcsim, two zfs-fuse pools, the DR one behind sshd.

Built once per test module (``recovery_world`` fixture), because replication and the inventory
sync are the slow part and every test failover starts from the same recovery point:

1. A zfs-fuse dataset on the source pool holds one directory per protected VM: ``<vm>.vmdk`` (a
   flat descriptor as ESXi writes it) and ``<vm>-flat.vmdk`` (random bytes, SHA-256 kept).
2. The source vcsim's ``zfs-protect-01`` is that dataset's mountpoint; each VM is created there
   with its existing disk and a NIC on ``VM Network`` or ``App Network``; the listener syncs them.
3. ``protected_vms`` in two boot priorities; one VM is never marked ready by the harness and has a
   short ``tools_timeout_seconds`` (the timeout path).
4. A replication job through the real dispatcher: the dataset lands on the DR pool over sshd and a
   ``recovery_points`` row exists for its snapshot.
5. The DR vcsim has a cluster of two hosts, the placeholder datastore, and ``zf-lab``, an existing
   DR network; ``network_mappings``: ``VM Network`` → isolated port group (test_network null),
   ``App Network`` → ``zf-lab``.

``ToolsHarness`` plays VMware Tools (vcsim 0.24 has none): it marks each test VM's Tools running
right after it powers on, and records when it started marking, so the tests can check that a
priority booted only after the previous one was ready.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from handlers.recovery.backends import run_tag
from tests.integration.conftest import DR, GROUP, PRIMARY, TARGET
from tests.integration.test_dr_end_to_end import write_disk
from tests.integration.test_zfs_backend import guids
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database, create_database, drop_database
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator, start_simulator
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DISK_BYTES = 1 * MiB
LAB_NETWORK = "zf-lab"  # an existing DR network a mapping names as its test network
APP_NETWORK = "App Network"
SOURCE_ARGS = ("-cluster", "1", "-host", "1", "-vm", "1")
DR_ARGS = ("-cluster", "1", "-host", "2", "-vm", "1")
TIMEOUT_VM = "slow-2"


@dataclass(frozen=True)
class VMPlan:
    name: str
    priority: int
    network: str
    marked: bool = True  # the harness marks its Tools running after power-on
    tools_timeout: int = 120


PLAN = (
    VMPlan("web-1", 1, "VM Network"),
    VMPlan("db-1", 1, APP_NETWORK),
    VMPlan("app-2", 2, "VM Network"),
    VMPlan(TIMEOUT_VM, 2, "VM Network", marked=False, tools_timeout=3),
)


@dataclass
class ProtectedVM:
    plan: VMPlan
    moref: str  # at the source vCenter
    vm_id: str = ""  # vcenter_vms.id
    protected_id: str = ""
    hashes: dict[str, str] = field(default_factory=dict)  # file name → SHA-256 at snapshot time


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def add_port_group(sim: Simulator, name: str) -> None:
    """A standard port group on the hosts' vSwitch0 (vcsim keeps one network object per name per datacenter)."""
    for host in sim.find(vim.HostSystem):
        spec = vim.host.PortGroup.Specification(name=name, vlanId=0, vswitchName="vSwitch0",
                                                policy=vim.host.NetworkPolicy())
        try:
            host.configManager.networkSystem.AddPortGroup(portgrp=spec)
        except vim.fault.DuplicateName:
            pass  # the datacenter's network of that name exists already (vcsim: one per name)


def create_source_vm(sim: Simulator, name: str, network: str, disk_bytes: int = DISK_BYTES) -> str:
    """The protected VM at the source vCenter, on its existing disk, one NIC on ``network``."""
    content = sim.si().content
    dc = content.rootFolder.childEntity[0]
    pool = next(c for c in dc.hostFolder.childEntity if isinstance(c, vim.ClusterComputeResource)).resourcePool
    dev = vim.vm.device
    add = dev.VirtualDeviceSpec.Operation.add
    controller = dev.VirtualLsiLogicController(key=-100, busNumber=0, sharedBus="noSharing")
    disk = dev.VirtualDisk(
        key=-101, controllerKey=-100, unitNumber=0, capacityInKB=disk_bytes // 1024,
        backing=dev.VirtualDisk.FlatVer2BackingInfo(fileName=f"[{SOURCE_DS}] {name}/{name}.vmdk",
                                                    diskMode="persistent"),
    )
    nic = dev.VirtualVmxnet3(key=-102, backing=dev.VirtualEthernetCard.NetworkBackingInfo(deviceName=network))
    config = vim.vm.ConfigSpec(
        name=name, guestId="otherGuest64", numCPUs=1, memoryMB=512,
        files=vim.vm.FileInfo(vmPathName=f"[{SOURCE_DS}] {name}/{name}.vmx"),
        deviceChange=[dev.VirtualDeviceSpec(operation=add, device=controller),
                      dev.VirtualDeviceSpec(operation=add, device=disk),
                      dev.VirtualDeviceSpec(operation=add, device=nic)],
    )
    task = dc.vmFolder.CreateVM_Task(config=config, pool=pool)
    WaitForTask(task)
    return str(task.info.result._moId)


def mark_tools_running(vm: Any) -> None:
    """What VMware Tools would report in a booted guest (FACTS.md: vcsim writes ``SET.<path>``)."""
    spec = vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsRunning"),
        vim.option.OptionValue(key="SET.summary.quickStats.guestHeartbeatStatus", value="green"),
    ])
    WaitForTask(vm.ReconfigVM_Task(spec=spec))


class ToolsHarness:
    """A thread that marks Tools running on every powered-on VM ``wants`` (default: named ``…-test-<8 hex>``).

    ``marked_at[name]`` is the wall-clock time just before the mark was written: nothing could
    have seen the VM ready earlier, so a later priority's bootTime must come after it."""

    def __init__(self, sim: Simulator, skip: Callable[[str], bool], interval: float = 0.05,
                 wants: Callable[[str], bool] = lambda name: "-test-" in name) -> None:
        self.sim, self.skip, self.interval, self.wants = sim, skip, interval, wants
        self.marked_at: dict[str, float] = {}
        self.seen_on: dict[str, float] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tools-harness", daemon=True)
        self._si: Any = None

    def __enter__(self) -> ToolsHarness:
        from pyVim.connect import SmartConnect
        import ssl

        # Its own session: the oracle's session is used by the test thread at the same time.
        ctx = ssl.create_default_context(cafile=self.sim.cert_file)
        self._si = SmartConnect(host=self.sim.host, port=self.sim.port, user=self.sim.username,
                                pwd=self.sim.password, sslContext=ctx)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        from pyVim.connect import Disconnect

        Disconnect(self._si)

    def _powered_on(self) -> list[tuple[Any, str]]:
        content = self._si.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            spec = vim.PropertyCollector.FilterSpec(
                objectSet=[vim.PropertyCollector.ObjectSpec(
                    obj=view, skip=True,
                    selectSet=[vim.PropertyCollector.TraversalSpec(name="v", path="view", skip=False,
                                                                   type=vim.view.ContainerView)])],
                propSet=[vim.PropertyCollector.PropertySpec(type=vim.VirtualMachine,
                                                            pathSet=["name", "runtime.powerState"])])
            out = []
            for obj in content.propertyCollector.RetrieveContents([spec]):
                props = {p.name: p.val for p in obj.propSet}
                if props.get("runtime.powerState") == "poweredOn" and self.wants(str(props.get("name"))):
                    out.append((obj.obj, str(props["name"])))
            return out
        finally:
            view.DestroyView()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for vm, name in self._powered_on():
                    self.seen_on.setdefault(name, time.time())
                    if name in self.marked_at or self.skip(name):
                        continue
                    self.marked_at[name] = time.time()
                    mark_tools_running(vm)
            except Exception as exc:  # noqa: BLE001 - a test reads the errors; the thread must go on
                self.errors.append(repr(exc))
            self._stop.wait(self.interval)


@dataclass
class RecoveryWorld:
    db: Database
    source_host: ZFSHost
    target_host: ZFSHost
    source: str
    source_dir: Path
    target_root: str
    secrets: Path
    bundle: Path
    source_sim: Simulator
    dr_sim: Simulator
    vms: list[ProtectedVM]
    snapshot: str
    point_id: str
    extra_env: dict[str, str] = field(default_factory=dict)
    new_vcenter: Callable[..., Simulator] | None = None  # (vcenter id, name, datastores, args) → started, row updated
    workdir: Path | None = None

    @property
    def replica(self) -> str:
        return f"{self.target_root}/{self.source.rsplit('/', 1)[1]}"

    @property
    def env(self) -> dict[str, str]:
        return {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(self.secrets),
                "ZERFAUX_VCENTER_CA_BUNDLE": str(self.bundle), **self.extra_env}

    async def drain(self, timeout: float = 300) -> None:
        await drain(engine_settings(self.db.url, **self.env), timeout=timeout)

    def harness(self) -> ToolsHarness:
        return ToolsHarness(self.dr_sim, skip=lambda name: name.startswith(TIMEOUT_VM + "-test-"))

    def by_priority(self, priority: int) -> list[ProtectedVM]:
        return [v for v in self.vms if v.plan.priority == priority]

    # -- what exists at the DR site, read from the peers themselves ---------------------------

    def test_vms(self, run_id: str | None = None) -> list[Any]:
        suffix = "-test-" + (run_tag(run_id)[-8:] if run_id else "")
        return [vm for vm in self.dr_sim.find(vim.VirtualMachine) if suffix in vm.name]

    def networks_named(self, name: str) -> list[Any]:
        return [n for n in self.dr_sim.find(vim.Network) if n.name == name]

    def host_port_groups(self, name: str) -> list[str]:
        return [h.name for h in self.dr_sim.find(vim.HostSystem)
                if any(pg.spec.name == name for pg in h.configManager.networkSystem.networkInfo.portgroup)]

    def datastores_named(self, name: str) -> list[Any]:
        return [ds for ds in self.dr_sim.find(vim.Datastore) if ds.name == name]

    def zfs_datasets(self) -> list[str]:
        out = self.target_host.run(["zfs", "list", "-H", "-o", "name", "-r", self.target_root]).stdout
        return out.decode().split()

    def userrefs(self, snapshot: str | None = None) -> int:
        """How many holds the point's snapshot carries (zfs-fuse's ``zfs holds`` is broken; ``userrefs`` is not)."""
        out = self.target_host.run(["zfs", "get", "-H", "-o", "value", "userrefs",
                                    f"{self.replica}@{snapshot or self.snapshot}"]).stdout.decode().strip()
        return int(out)

    def guids(self) -> dict[str, int]:
        """snapshot name → GUID of the replica's snapshots, as ``zfs get guid`` reports them."""
        return guids(self.target_host, self.replica)

    def leftovers(self, run_id: str) -> dict[str, Any]:
        """Everything a run could leave behind, as the peers report it (all empty: nothing leaked)."""
        tag = run_tag(run_id)
        return {
            "vms": [vm.name for vm in self.test_vms(run_id)],
            "port_group": self.host_port_groups(tag) + [n.name for n in self.networks_named(tag)],
            "clone": [d for d in self.zfs_datasets() if d.endswith("/" + tag)],
            "hold": [f"userrefs={n}" for n in [self.userrefs()] if n],
        }


def dr_vcenter(vcenter: Callable[..., Simulator], workdir: Path, name: str, delay_ms: int = 0) -> Simulator:
    """The DR vCenter: a cluster of two hosts, the placeholder datastore, the existing network ``zf-lab``."""
    sim = vcenter(DR, name, {PLACEHOLDER_DS: workdir / f"{name}-placeholder", DR_DS: workdir / f"{name}-empty"},
                  DR_ARGS)
    add_port_group(sim, LAB_NETWORK)
    if delay_ms:
        sim.set_delay(delay_ms)
    return sim


def boot_time(vm: Any) -> float:
    value = vm.summary.runtime.bootTime
    assert isinstance(value, datetime), (vm.name, value)
    return value.timestamp()


def serves_nfs(host: ZFSHost) -> bool:
    """Whether the DR storage host can serve the clone's NFS export. A kernel without ``nfsd``
    (this machine's) cannot; the run then records ``export_clone`` as a warning that says so, and
    vcsim's hosts, which read the clone's directory itself, present it all the same."""
    from handlers.backends.zfs import recovery as storage

    done = host.run(["cat", "/proc/fs/nfsd/threads"], check=False)
    threads = done.stdout.decode() if done.returncode == 0 else "0"
    return storage.served(threads) is not False


def build_world(db: Database, source_host: ZFSHost, target_host: ZFSHost,
                start_sim: Callable[..., Simulator], workdir: Path, plan: tuple[VMPlan, ...] = PLAN,
                disk_bytes: int = DISK_BYTES) -> Iterator[RecoveryWorld]:
    """Generator: yields the world once replication made the recovery point, then takes it all down."""
    import asyncio

    tag = uuid.uuid4().hex[:8]
    source, source_dir = f"{source_host.pool}/rec{tag}", Path(mountpoint(f"rec-src-{tag}"))
    root = f"{target_host.pool}/recdr{tag}"
    source_host.run(["zfs", "create", "-o", f"mountpoint={source_dir}", source])
    target_host.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    sims: list[Simulator] = []
    try:
        secrets = workdir / "secrets"
        secrets.mkdir(mode=0o700)
        (secrets / "dr-key").write_text(target_host.private_key)
        (secrets / "dr-key").chmod(0o600)
        bundle = workdir / "ca.pem"
        bundle.write_text("")

        def vcenter(vc_id: str, name: str, datastores: dict[str, Path], args: tuple[str, ...]) -> Simulator:
            """Start a simulator and point the vCenter row ``vc_id`` at it (the CA bundle trusts it)."""
            sim = start_sim(name, datastores=datastores, args=args)
            sims.append(sim)
            with bundle.open("a") as fh:
                fh.write(Path(sim.cert_file).read_text())
            (secrets / f"{name}-password").write_text(sim.password)
            db.sql("update vcenters set host = %s, port = %s, username = %s, password_secret = %s,"
                   " verify_tls = true where id = %s", (sim.host, sim.port, sim.username, f"{name}-password", vc_id))
            return sim

        vms: list[ProtectedVM] = []
        for vm_plan in plan:
            write_disk(source_dir / vm_plan.name, vm_plan.name, disk_bytes)
        source_sim = vcenter(PRIMARY, f"rec-src-{tag}", {SOURCE_DS: source_dir}, SOURCE_ARGS)
        add_port_group(source_sim, APP_NETWORK)
        for vm_plan in plan:
            vms.append(ProtectedVM(vm_plan, create_source_vm(source_sim, vm_plan.name, vm_plan.network, disk_bytes)))
        dr_sim = dr_vcenter(vcenter, workdir, f"rec-dr-{tag}")

        db.sql("update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
               " ssh_host_key = %s, target_root = %s, dr_datastore = %s, placeholder_datastore = %s,"
               " transport = 'ssh' where id = %s",
               (target_host.ssh_host, target_host.ssh_port, target_host.ssh_user, target_host.host_key, root,
                DR_DS, PLACEHOLDER_DS, TARGET))
        db.sql("update protection_groups set source_dataset = %s, protection_datastore = %s, rpo_minutes = null,"
               " retention_snapshots = 5 where id = %s", (source, SOURCE_DS, GROUP))
        db.sql("select zerfaux.set_mode('real')")
        world = RecoveryWorld(db, source_host, target_host, source, source_dir, root, secrets, bundle,
                              source_sim, dr_sim, vms, snapshot="", point_id="")
        world.new_vcenter, world.workdir = vcenter, workdir

        db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
        asyncio.run(world.drain())
        for vm in vms:
            row = db.one("select id, networks from vcenter_vms where vcenter_id = %s and moref = %s",
                         (PRIMARY, vm.moref))
            vm.vm_id = str(row["id"])
            assert vm.plan.network in (row["networks"] or []), (vm.plan.name, row["networks"])
            vm.protected_id = str(db.value(
                "insert into protected_vms (protection_group_id, vm_id, boot_priority, tools_timeout_seconds)"
                " values (%s, %s, %s, %s) returning id", (GROUP, vm.vm_id, vm.plan.priority, vm.plan.tools_timeout)))
        db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network, test_network)"
               " values (%s, 'VM Network', 'VM Network', null), (%s, %s, %s, %s)",
               (GROUP, GROUP, APP_NETWORK, LAB_NETWORK, LAB_NETWORK))

        for vm in vms:
            vm.hashes = {f: sha256(source_dir / vm.plan.name / f) for f in (f"{vm.plan.name}.vmdk",
                                                                           f"{vm.plan.name}-flat.vmdk")}
        db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        asyncio.run(world.drain())
        job = db.one("select * from replication_jobs order by created_at desc limit 1")
        assert job["status"] == "completed", job["error"]
        world.snapshot = job["snapshot_name"]
        world.point_id = str(db.value(
            "select id from recovery_points where protection_group_id = %s and snapshot_name = %s",
            (GROUP, world.snapshot)))
        # The source moves on after the point: the test VMs must hash like the point, not like now.
        for vm in vms:
            (source_dir / vm.plan.name / f"{vm.plan.name}-flat.vmdk").write_bytes(os.urandom(disk_bytes))
        os.sync()
        yield world
    finally:
        for sim in sims:
            sim.stop()
        # Whatever a failed test left: clones first (they depend on the replica's snapshots).
        done = target_host.run(["zfs", "list", "-H", "-o", "name", "-r", root], check=False)
        for name in sorted(done.stdout.decode().split(), key=len, reverse=True):
            if "/zerfaux-test-" in name:
                target_host.run(["zfs", "destroy", "-r", name], check=False)
        snaps = target_host.run(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", root], check=False)
        for snap in snaps.stdout.decode().split():
            holds = target_host.run(["zfs", "holds", "-H", snap], check=False).stdout.decode()
            for line in holds.splitlines():
                parts = line.split("\t")
                if len(parts) >= 2:
                    target_host.run(["zfs", "release", parts[1], snap], check=False)
        target_host.run(["zfs", "destroy", "-r", root], check=False)
        source_host.run(["zfs", "destroy", "-r", source], check=False)


@pytest.fixture(scope="module")
def recovery_world(pg_template: str, zfs_source: ZFSHost, zfs_target: ZFSHost, vcsim_binary: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecoveryWorld]:
    """One world per test module (its own database, simulators and datasets); tests share its recovery point."""
    from listener.migrate import seed

    if not zfs_source.local:
        pytest.skip("the source datastore is a directory on this machine: needs a local zfs")
    workdir = tmp_path_factory.mktemp("recovery-world")
    db = create_database(pg_template)
    seed(db.url)

    def start(name: str, **kwargs: Any) -> Simulator:
        return start_simulator(vcsim_binary, name, workdir, **kwargs)

    try:
        yield from build_world(db, zfs_source, zfs_target, start, workdir)
    finally:
        drop_database(db.name)


@pytest.fixture
def nfs_served(recovery_world: RecoveryWorld) -> bool:
    """True when the DR storage host serves NFS exports (then ``export_clone`` is 'done', else 'warning')."""
    return serves_nfs(recovery_world.target_host)
