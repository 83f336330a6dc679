"""End to end: a VM's ZFS dataset is replicated to the DR site, and its DR shell boots from the replica.

Everything real, everything through the dispatcher (``ZERFAUX_USE_STUBS=false``, rows in):

1. A zfs-fuse dataset holds the VM's directory ``vm/``: ``vm.vmdk`` (a descriptor as ESXi writes
   it) and ``vm-flat.vmdk`` (its 4 MiB extent, random bytes).
2. A source vcsim's ``zfs-protect-01`` is backed by that dataset's mountpoint, and the protected
   VM is registered there with that existing disk. ``vcenters.sync_requested_at`` makes the
   listener read it into ``vcenter_vms`` (disks on the protection datastore).
3. An INSERT into ``replication_jobs`` makes the real ZFS backend send the dataset over the
   run's sshd to the DR pool.
4. The DR vcsim's ``zfs-dr-01`` is backed by the replica. zfs-fuse receives with ``-u``, so the
   replica is not mounted; we CLONE its newest snapshot and mount the clone, which is what a DR
   test or failover at a real site mounts, and its bytes are the snapshot's. The DR vcsim also
   has ``zerfaux-placeholder``, a plain directory: ``replication_targets.placeholder_datastore``.
5. ``protected_vms.needs_dr_shell`` makes the listener create the DR shell at the DR vcsim, its
   disk ``[zfs-dr-01] vm/vm.vmdk``: the replicated descriptor, found by vcsim in the clone; its
   ``.vmx``, nvram and log on the placeholder, so nothing new lands in the replica's datastore.

Checked through vcsim's own API and the files: the shell exists with the source VM's CPUs, memory
and controller, powered off, its disk backing is the replicated descriptor; the replica's bytes
are the source's (SHA-256 of both files, and the snapshot's GUID on both sides); and a second
replication job still applies incrementally after the shell was made.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.integration.conftest import DR, GROUP, PRIMARY, TARGET, operations
from tests.integration.test_zfs_backend import guids
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost

pytestmark = [pytest.mark.zfs, pytest.mark.vcsim]

MiB = 1024 * 1024
VM_NAME = "vm"  # the protected VM, its directory on the datastore, and its disk's stem
DISK_BYTES = 4 * MiB
NUM_CPU, MEMORY_MB = 2, 2048
DISK_FILES = ("vm.vmdk", "vm-flat.vmdk")
SIM_ARGS = ("-cluster", "1", "-host", "1", "-vm", "2")  # a couple of other VMs, so the sync has to pick


def write_disk(directory: Path, stem: str, size: int) -> None:
    """A flat VMDK as an ESXi datastore holds it: the text descriptor and its raw extent."""
    directory.mkdir(parents=True, exist_ok=True)
    sectors = size // 512
    (directory / f"{stem}.vmdk").write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={os.urandom(4).hex()}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n# Extent description\n"
        f'RW {sectors} VMFS "{stem}-flat.vmdk"\n'
        "\n# The Disk Data Base\n#DDB\n\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{max(1, sectors // (255 * 63))}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.uuid = "{" ".join(f"{b:02x}" for b in uuid.uuid4().bytes)}"\n'
        'ddb.virtualHWVersion = "14"\n'
    )
    (directory / f"{stem}-flat.vmdk").write_bytes(os.urandom(size))
    os.sync()  # zfs-fuse: the files are in the dataset before its snapshot is taken


def sha256s(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in DISK_FILES}


def register_source_vm(sim: Simulator) -> str:
    """The protected VM at the source vCenter, on the existing disk (what an admin already has)."""
    content = sim.si().content
    dc = content.rootFolder.childEntity[0]
    pool = next(c for c in dc.hostFolder.childEntity if isinstance(c, vim.ClusterComputeResource)).resourcePool
    dev = vim.vm.device
    add = dev.VirtualDeviceSpec.Operation.add
    controller = dev.VirtualLsiLogicController(key=-100, busNumber=0, sharedBus="noSharing")
    disk = dev.VirtualDisk(
        key=-101, controllerKey=-100, unitNumber=0, capacityInKB=DISK_BYTES // 1024,
        backing=dev.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{SOURCE_DS}] {VM_NAME}/{VM_NAME}.vmdk", diskMode="persistent"
        ),
    )
    config = vim.vm.ConfigSpec(
        name=VM_NAME, guestId="otherGuest64", numCPUs=NUM_CPU, memoryMB=MEMORY_MB,
        # The .vmx beside the disk, as vSphere lays a VM out: one directory, replicated whole.
        files=vim.vm.FileInfo(vmPathName=f"[{SOURCE_DS}] {VM_NAME}/{VM_NAME}.vmx"),
        deviceChange=[dev.VirtualDeviceSpec(operation=add, device=controller),
                      dev.VirtualDeviceSpec(operation=add, device=disk)],  # no fileOperation: it exists
    )
    task = dc.vmFolder.CreateVM_Task(config=config, pool=pool)
    WaitForTask(task)
    return str(task.info.result._moId)


@dataclass
class Site:
    db: Database
    source_host: ZFSHost
    target_host: ZFSHost
    source: str  # the protected dataset
    source_dir: Path  # its mountpoint: the source datastore's directory
    target_root: str
    secrets: Path
    bundle: Path  # CA bundle holding each simulator's certificate
    start_sim: Callable[..., Simulator]
    sims: list[Simulator] = field(default_factory=list)
    clones: list[str] = field(default_factory=list)

    @property
    def replica(self) -> str:
        return f"{self.target_root}/{self.source.rsplit('/', 1)[1]}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "ZERFAUX_USE_STUBS": "false",
            "ZERFAUX_SECRETS_DIR": str(self.secrets),
            "ZERFAUX_VCENTER_CA_BUNDLE": str(self.bundle),
        }

    async def drain(self) -> None:
        await drain(engine_settings(self.db.url, **self.env), timeout=300)

    def vcenter(
        self, vcenter_id: str, name: str, datastore: str, directory: Path, more: dict[str, Path] | None = None
    ) -> Simulator:
        """Start a simulator whose ``datastore`` is ``directory`` and point the vCenter row at it."""
        sim = self.start_sim(name, datastores={datastore: directory, **(more or {})}, args=SIM_ARGS)
        self.sims.append(sim)
        with self.bundle.open("a") as fh:
            fh.write(Path(sim.cert_file).read_text())
        secret = f"{name}-password"
        (self.secrets / secret).write_text(sim.password)
        self.db.sql(
            "update vcenters set host = %s, port = %s, username = %s, password_secret = %s, verify_tls = true"
            " where id = %s",
            (sim.host, sim.port, sim.username, secret, vcenter_id),
        )
        return sim

    def mount_replica(self, snapshot: str) -> Path:
        tag = uuid.uuid4().hex[:8]
        clone, where = f"{self.target_host.pool}/drtest{tag}", mountpoint(f"e2e-drtest-{tag}")
        self.target_host.run(["zfs", "clone", "-o", f"mountpoint={where}", f"{self.replica}@{snapshot}", clone])
        self.clones.append(clone)
        return Path(where)


@pytest.fixture
def site(
    world: Database, zfs_source: ZFSHost, zfs_target: ZFSHost,
    vcsim_factory: Callable[..., Simulator], tmp_path: Path,
) -> Iterator[Site]:
    if not zfs_source.local:
        pytest.skip("the source datastore is a directory on this machine: needs a local zfs")
    tag = uuid.uuid4().hex[:8]
    source, source_dir = f"{zfs_source.pool}/e2e{tag}", Path(mountpoint(f"e2e-src-{tag}"))
    root = f"{zfs_target.pool}/e2edr{tag}"
    zfs_source.run(["zfs", "create", "-o", f"mountpoint={source_dir}", source])
    zfs_target.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "dr-key").write_text(zfs_target.private_key)
    (secrets / "dr-key").chmod(0o600)
    world.sql(
        "update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
        " ssh_host_key = %s, target_root = %s, dr_datastore = %s, placeholder_datastore = %s, transport = 'ssh'"
        " where id = %s",
        (zfs_target.ssh_host, zfs_target.ssh_port, zfs_target.ssh_user, zfs_target.host_key, root, DR_DS,
         PLACEHOLDER_DS, TARGET),
    )
    world.sql(
        "update protection_groups set source_dataset = %s, protection_datastore = %s, rpo_minutes = null,"
        " retention_snapshots = 3 where id = %s",
        (source, SOURCE_DS, GROUP),
    )
    world.sql("select zerfaux.set_mode('real')")  # a real database on purpose, whoever starts first
    s = Site(world, zfs_source, zfs_target, source, source_dir, root, secrets, tmp_path / "ca.pem", vcsim_factory)
    try:
        yield s
    finally:
        # Simulators first: the DR one has files open in the clone, which must unmount.
        for sim in s.sims:
            sim.stop()
        for clone in s.clones:
            zfs_target.run(["zfs", "destroy", clone], check=False)
        zfs_target.run(["zfs", "destroy", "-r", root], check=False)
        zfs_source.run(["zfs", "destroy", "-r", source], check=False)


def _job(db: Database) -> dict[str, Any]:
    return db.one("select * from replication_jobs order by created_at desc limit 1")


async def test_a_replicated_vm_gets_its_dr_shell_on_the_replica(site: Site) -> None:
    db = site.db
    write_disk(site.source_dir / VM_NAME, VM_NAME, DISK_BYTES)
    source_sim = site.vcenter(PRIMARY, "e2e-source", SOURCE_DS, site.source_dir)
    moref = register_source_vm(source_sim)

    # The source vCenter's inventory, synced by the listener: the VM and its disk on the protection datastore.
    db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    await site.drain()
    vm = db.one("select * from vcenter_vms where vcenter_id = %s and moref = %s", (PRIMARY, moref))
    assert (vm["name"], vm["datastore"], vm["num_cpu"], vm["memory_mb"]) == (VM_NAME, SOURCE_DS, NUM_CPU, MEMORY_MB)
    assert [(d["file"], d["controller"]) for d in vm["disks"]] == [(f"[{SOURCE_DS}] vm/vm.vmdk", "lsilogic")]

    # Replication: a row in, the dataset at the DR pool out.
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await site.drain()
    job = _job(db)
    assert job["status"] == "completed", job["error"]
    assert job["target_dataset"] == site.replica
    snapshot = job["snapshot_name"]
    assert guids(site.target_host, site.replica)[snapshot] == guids(site.source_host, site.source)[snapshot]

    # The DR site: its datastore is the replica (a clone of its newest snapshot, mounted).
    dr_dir = site.mount_replica(snapshot)
    assert sha256s(dr_dir / VM_NAME) == sha256s(site.source_dir / VM_NAME)
    replica_files = sorted(str(p.relative_to(dr_dir)) for p in dr_dir.rglob("*"))
    placeholder_dir = site.secrets.parent / "placeholder"
    dr_sim = site.vcenter(DR, "e2e-dr", DR_DS, dr_dir, {PLACEHOLDER_DS: placeholder_dir})
    (dr_store,) = [ds for ds in dr_sim.find(vim.Datastore) if ds.name == DR_DS]
    assert os.path.realpath(dr_store.info.url) == os.path.realpath(dr_dir)

    # The DR shell, asked for by a flag, made by the listener at the DR vCenter on the replicated disk.
    protected = db.value(
        "insert into protected_vms (protection_group_id, vm_id, needs_dr_shell) values (%s, %s, true) returning id",
        (GROUP, vm["id"]),
    )
    await site.drain()
    row = db.one("select * from protected_vms where id = %s", (protected,))
    assert (row["dr_shell_vm_created"], row["needs_dr_shell"]) == (True, False), row["last_error"]
    assert operations(db, "vm.dr_shell")[-1]["result"]["adopted"] is False
    shell = dr_sim.vm(row["dr_shell_vm_id"])
    assert shell.name == f"{VM_NAME}-dr"
    assert dr_sim.vm_disk_files(shell._moId) == [f"[{DR_DS}] vm/vm.vmdk"]
    (disk,) = [d for d in shell.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    assert getattr(disk.backing, "datastore", None) == dr_store
    controller = next(d for d in shell.config.hardware.device if d.key == disk.controllerKey)
    assert isinstance(controller, vim.vm.device.VirtualLsiLogicController)
    assert (shell.config.hardware.numCPU, shell.config.hardware.memoryMB) == (NUM_CPU, MEMORY_MB)
    assert shell.runtime.powerState == "poweredOff"
    # The shell's own files are on the placeholder; the replica's datastore holds what it held.
    assert shell.config.files.vmPathName == f"[{PLACEHOLDER_DS}] zerfaux-{protected}/{VM_NAME}-dr.vmx"
    assert (placeholder_dir / f"zerfaux-{protected}" / f"{VM_NAME}-dr.vmx").is_file()
    assert sorted(str(p.relative_to(dr_dir)) for p in dr_dir.rglob("*")) == replica_files
    # Attaching never rewrote the replicated disk.
    assert sha256s(dr_dir / VM_NAME) == sha256s(site.source_dir / VM_NAME)

    # The replica itself was never written, so replication carries on incrementally under the shell.
    (site.source_dir / VM_NAME / "vm-flat.vmdk").write_bytes(os.urandom(DISK_BYTES))
    os.sync()
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    await site.drain()
    second = _job(db)
    assert second["status"] == "completed", second["error"]
    assert second["base_snapshot"] == snapshot
    fresh = site.mount_replica(second["snapshot_name"])
    assert sha256s(fresh / VM_NAME) == sha256s(site.source_dir / VM_NAME)
