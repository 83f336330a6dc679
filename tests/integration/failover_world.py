"""The world a planned migration, failover, rollback, reprotect or failback runs in, everything real.

Built per test (``failover_world`` is a factory fixture: every run changes the world for good,
so no two tests share one). What ``build_failover_world`` makes, in order:

1. Two zfs-fuse datasets: the source ``<src pool>/fo<tag>`` (mounted; one directory per VM with a
   flat VMDK pair as ESXi writes it, random bytes) and the DR ``target_root`` ``<dr pool>/fodr<tag>``
   with a mountpoint, so the replica ``<target_root>/fo<tag>`` inherits one and can be mounted.
2. The source vcsim: its ``zfs-protect-01`` is the source dataset's mountpoint; each VM is created
   there on its disk with one NIC on ``VM Network`` or ``App Network``, powered on, Tools running.
3. The DR vcsim: a cluster of two hosts, the placeholder datastore, the recovery networks
   ``dr-prod`` and ``dr-app`` (standard port groups).
4. Rows: the seed's vCenters, target and group pointed at the peers. The group's source is the
   source pool over the run's sshd (``source_ssh_*``), so replication relays source → listener →
   target and a reverse replication or a reprotect reaches the source host too.
   ``network_mappings``: ``VM Network`` → ``dr-prod``, ``App Network`` → ``dr-app`` (and back,
   for the reverse direction's VMs).
5. The listener syncs the source vCenter; ``protected_vms`` in the plan's boot priorities.
6. ``points`` replication jobs through the real dispatcher: the replica and its recovery points.
7. The DR datastore ``replication_targets.dr_datastore`` (``zfs-dr-01``) presented at every DR host
   as NFS ``<nfs_host>:<replica mountpoint>`` (vcsim's Go main presents remotePath under the name,
   as ESXi would mount it): exactly what the run's ``present_datastore`` asks for, so that step
   finds it there. The replica is set ``readonly=on`` and mounted (vcsim attaches an existing disk
   only when its ``-flat.vmdk`` is in the datastore's directory), then ``needs_dr_shell`` makes the
   DR shells through the ``vm.dr_shell`` kind; their own files go to the placeholder datastore,
   so nothing is written into the replica and the next incremental receive applies.

``FailoverWorld.harness()`` plays VMware Tools at both vCenters (vcsim 0.24 has none): every
protected VM or DR shell that is powered on gets Tools running. Its readers (power states with
vCenter's own power event times, disk hashes, GUIDs, datastores, NICs) are what the tests assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from tests.integration.conftest import DR, GROUP, PRIMARY, TARGET
from tests.integration.recovery_world import (
    APP_NETWORK, ToolsHarness, VMPlan, add_port_group, create_source_vm, mark_tools_running,
)
from tests.integration.test_dr_end_to_end import write_disk
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database, create_database, drop_database
from tests.support.platforms import guids
from tests.support.require import missing
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator, start_simulator
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost

MiB = 1024 * 1024
DISK_BYTES = 1 * MiB
PROD_NETWORK = "VM Network"
DR_PROD, DR_APP = "dr-prod", "dr-app"
RECOVERY = {PROD_NETWORK: DR_PROD, APP_NETWORK: DR_APP}
SOURCE_ARGS = ("-cluster", "1", "-host", "1", "-vm", "1")
DR_ARGS = ("-cluster", "1", "-host", "2", "-vm", "1")
SIDES = ("source", "dr")


def plan_of(vms: int, priorities: int) -> tuple[VMPlan, ...]:
    """``vms`` VMs spread over boot priorities 1..``priorities`` (the first ones first) and both networks."""
    per = -(-vms // priorities)
    return tuple(VMPlan(f"vm{i:03d}-p{i // per + 1}", i // per + 1, PROD_NETWORK if i % 2 == 0 else APP_NETWORK)
                 for i in range(vms))


THREE_IN_TWO = (VMPlan("web-1", 1, PROD_NETWORK), VMPlan("db-1", 1, APP_NETWORK), VMPlan("app-2", 2, PROD_NETWORK))


@dataclass
class FailoverVM:
    plan: VMPlan
    moref: str  # at the source vCenter
    vm_id: str = ""  # vcenter_vms.id
    protected_id: str = ""
    shell: str = ""  # protected_vms.dr_shell_vm_id at the DR vCenter

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def flat(self) -> str:
        return f"{self.plan.name}/{self.plan.name}-flat.vmdk"

    @property
    def files(self) -> tuple[str, str]:
        return (f"{self.plan.name}/{self.plan.name}.vmdk", self.flat)


@dataclass
class FailoverWorld:
    db: Database
    source_host: ZFSHost
    target_host: ZFSHost
    source: str  # protection_groups.source_dataset
    source_dir: Path  # its mountpoint = the source vCenter's protection datastore
    target_root: str
    replica_dir: Path  # the replica's mountpoint = the DR datastore's directory
    secrets: Path
    bundle: Path
    source_sim: Simulator
    dr_sim: Simulator
    vms: list[FailoverVM]
    points: list[str] = field(default_factory=list)  # snapshot names, oldest first
    # snapshot → the live side's disk hashes just before the job that made it (``replicate``)
    point_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def replica(self) -> str:
        return f"{self.target_root}/{self.source.rsplit('/', 1)[1]}"

    @property
    def env(self) -> dict[str, str]:
        return {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(self.secrets),
                "ZERFAUX_VCENTER_CA_BUNDLE": str(self.bundle), **self.extra_env}

    async def drain(self, timeout: float = 300) -> None:
        await drain(engine_settings(self.db.url, **self.env), timeout=timeout)

    def sim(self, side: str) -> Simulator:
        return {"source": self.source_sim, "dr": self.dr_sim}[side]

    def by_priority(self, priority: int) -> list[FailoverVM]:
        return [v for v in self.vms if v.plan.priority == priority]

    def moref(self, vm: FailoverVM, side: str) -> str:
        return vm.moref if side == "source" else vm.shell

    def harness(self, *sides: str) -> contextlib.ExitStack:
        """Tools for every powered-on protected VM and DR shell at ``sides`` (default both) until the block ends."""
        stack = contextlib.ExitStack()
        for side in sides or SIDES:
            wanted = frozenset(str(self.sim(side).vm(self.moref(v, side)).name) for v in self.vms if self.moref(v, side))
            stack.enter_context(ToolsHarness(self.sim(side), skip=lambda n: False, wants=wanted.__contains__))
        return stack

    # -- what the peers say -------------------------------------------------------------------

    def power(self, vm: FailoverVM, side: str) -> tuple[str, float | None, float | None]:
        """(runtime.powerState, time of the last VmPoweredOnEvent, of the last VmPoweredOffEvent) at ``side``."""
        sim = self.sim(side)
        obj = sim.vm(self.moref(vm, side))
        times: dict[str, float | None] = {}
        for kind in ("VmPoweredOnEvent", "VmPoweredOffEvent"):
            spec = vim.event.EventFilterSpec(entity=vim.event.EventFilterSpec.ByEntity(entity=obj, recursion="self"),
                                             eventTypeId=[kind])
            events = list(sim.si().content.eventManager.QueryEvents(spec) or [])
            times[kind] = max(e.createdTime.timestamp() for e in events) if events else None
        return str(obj.runtime.powerState), times["VmPoweredOnEvent"], times["VmPoweredOffEvent"]

    def power_states(self, side: str) -> dict[str, str]:
        return {v.name: str(self.sim(side).vm(self.moref(v, side)).runtime.powerState) for v in self.vms}

    def disk_files(self, vm: FailoverVM, side: str) -> list[str]:
        return self.sim(side).vm_disk_files(self.moref(vm, side))

    def vm_datastores(self, vm: FailoverVM, side: str) -> list[str]:
        """Datastores of the VM's disks (not of its .vmx), from their backings."""
        return sorted({f.split("]", 1)[0].lstrip("[") for f in self.disk_files(vm, side)})

    def nic_networks(self, vm: FailoverVM, side: str) -> list[str]:
        devices = self.sim(side).vm(self.moref(vm, side)).config.hardware.device
        cards = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), key=lambda d: d.key)
        return [str(getattr(c.backing, "deviceName", None)) for c in cards]

    def hashes(self, directory: Path) -> dict[str, str]:
        """file (``<vm>/<file>``) → SHA-256 of every VM's disk files under ``directory``, read afresh
        (``fresh_sha256``: a receive under a mounted zfs-fuse dataset leaves FUSE's cached pages stale)."""
        return {f: fresh_sha256(directory / f) for v in self.vms for f in v.files}

    def source_hashes(self) -> dict[str, str]:
        return self.hashes(self.source_dir)

    def replica_hashes(self, dataset: str | None = None) -> dict[str, str]:
        return self.hashes(Path(self.mountpoint(self.target_host, dataset or self.replica)))

    def guids(self, side: str, dataset: str | None = None) -> dict[str, int]:
        """snapshot → GUID of ``dataset`` (default: the source dataset / the replica) as ``zfs get guid`` says."""
        if side == "source":
            return guids(self.source_host, dataset or self.source)
        return guids(self.target_host, dataset or self.replica)

    def zfs_get(self, side: str, prop: str, dataset: str) -> str:
        host = self.source_host if side == "source" else self.target_host
        return host.run(["zfs", "get", "-Hp", "-o", "value", prop, dataset]).stdout.decode().strip()

    def mountpoint(self, host: ZFSHost, dataset: str) -> str:
        return host.run(["zfs", "get", "-H", "-o", "value", "mountpoint", dataset]).stdout.decode().strip()

    def datasets(self, side: str) -> list[str]:
        host, root = (self.source_host, self.source) if side == "source" else (self.target_host, self.target_root)
        out = host.run(["zfs", "list", "-H", "-o", "name", "-r", root.rsplit("/", 1)[0]]).stdout.decode().split()
        prefix = root if side == "dr" else self.source
        return [d for d in out if d == prefix or d.startswith(prefix)]

    def datastore(self, name: str) -> list[Any]:
        return [ds for ds in self.dr_sim.find(vim.Datastore) if ds.name == name]

    def write_source(self, vm: FailoverVM, data: bytes, offset: int = 0) -> None:
        write_into(self.source_dir / vm.flat, data, offset)

    def replicate(self) -> dict[str, Any]:
        """One replication job through the dispatcher (the group's direction); returns its row.

        The live side's disks are hashed first (before the job's snapshot, so the read changes
        nothing the receive checks) and kept in ``point_hashes`` under the snapshot it made."""
        live = self.source_dir if self.group()["direction"] == "forward" else self.replica_dir
        before = self.hashes(live)
        self.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        asyncio.run(self.drain())
        job = dict(self.db.one("select * from replication_jobs order by created_at desc limit 1"))
        if job["status"] == "completed" and job["snapshot_name"]:
            self.point_hashes[job["snapshot_name"]] = before
        return job

    def point_id(self, snapshot: str) -> str:
        return str(self.db.value("select id from recovery_points where protection_group_id = %s"
                                 " and snapshot_name = %s", (GROUP, snapshot)))

    def run(self, kind: str, **columns: Any) -> str:
        """Insert a recovery run of ``kind`` as an admin's SQL would (the service role); returns its id."""
        names = ["protection_group_id", "kind", *columns]
        values = [GROUP, kind, *(_jsonb(v) for v in columns.values())]
        marks = ", ".join(["%s"] * len(values))
        return str(self.db.value(f"insert into recovery_runs ({', '.join(names)}) values ({marks}) returning id",
                                 tuple(values)))

    def group(self) -> dict[str, Any]:
        return dict(self.db.one("select * from protection_groups where id = %s", (GROUP,)))


def _jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value) if isinstance(value, dict | list) else value


def fresh_sha256(path: Path) -> str:
    """SHA-256 of ``path`` with its cached pages dropped first (``POSIX_FADV_DONTNEED``, this file
    only): zfs-fuse does not invalidate FUSE's page cache when a receive or a rollback changes a
    mounted dataset, so a file read before would hash as it was. Never the machine-wide
    ``drop_caches`` or ``sync``: they reach every helper's zfs-fuse mounts at once."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        for block in iter(lambda: fh.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def write_into(path: Path, data: bytes, offset: int = 0) -> None:
    """Overwrite ``data`` at ``offset`` of an existing file and flush it to the pool (zfs-fuse)."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def present_nas(sim: Simulator, name: str, remote_host: str, remote_path: str) -> None:
    """``CreateNasDatastore`` on every host, as ESXi takes it: ``localPath`` is the name."""
    for host in sim.find(vim.HostSystem):
        spec = vim.host.NasVolume.Specification(remoteHost=remote_host, remotePath=remote_path, localPath=name,
                                                accessMode="readWrite", type="NFS")
        with contextlib.suppress(vim.fault.DuplicateName):
            host.configManager.datastoreSystem.CreateNasDatastore(spec)


def build_failover_world(db: Database, source_host: ZFSHost, target_host: ZFSHost,
                         start_sim: Callable[..., Simulator], workdir: Path, *,
                         plan: tuple[VMPlan, ...] = THREE_IN_TWO, disk_bytes: int = DISK_BYTES,
                         delay_ms: int = 0, points: int = 1) -> Iterator[FailoverWorld]:
    """Generator: yields the world once the replica and the DR shells exist, then takes it all down."""
    tag = uuid.uuid4().hex[:8]
    source, source_dir = f"{source_host.pool}/fo{tag}", Path(mountpoint(f"fo-src-{tag}"))
    root, root_dir = f"{target_host.pool}/fodr{tag}", Path(mountpoint(f"fo-dr-{tag}"))
    # atime=off: a test reading a dataset's files must not change it (a receive refuses a
    # modified dataset, and the test, not the product, would have modified it).
    source_host.run(["zfs", "create", "-o", f"mountpoint={source_dir}", "-o", "atime=off", source])
    target_host.run(["zfs", "create", "-p", "-o", f"mountpoint={root_dir}", "-o", "atime=off", root])
    sims: list[Simulator] = []
    try:
        secrets = workdir / f"secrets-{tag}"
        secrets.mkdir(mode=0o700)
        for name, host in (("dr-key", target_host), ("src-key", source_host)):
            (secrets / name).write_text(host.private_key)
            (secrets / name).chmod(0o600)
        bundle = workdir / f"ca-{tag}.pem"
        bundle.write_text("")

        def vcenter(vc_id: str, name: str, datastores: dict[str, Path], args: tuple[str, ...]) -> Simulator:
            sim = start_sim(name, datastores=datastores, args=args)
            sims.append(sim)
            with bundle.open("a") as fh:
                fh.write(Path(sim.cert_file).read_text())
            (secrets / f"{name}-password").write_text(sim.password)
            db.sql("update vcenters set host = %s, port = %s, username = %s, password_secret = %s,"
                   " verify_tls = true where id = %s", (sim.host, sim.port, sim.username, f"{name}-password", vc_id))
            return sim

        for vm_plan in plan:
            write_disk(source_dir / vm_plan.name, vm_plan.name, disk_bytes)
        source_sim = vcenter(PRIMARY, f"fo-src-{tag}", {SOURCE_DS: source_dir}, SOURCE_ARGS)
        add_port_group(source_sim, APP_NETWORK)
        vms = [FailoverVM(p, create_source_vm(source_sim, p.name, p.network, disk_bytes)) for p in plan]
        dr_sim = vcenter(DR, f"fo-dr-{tag}", {PLACEHOLDER_DS: workdir / f"fo-dr-{tag}-placeholder"}, DR_ARGS)
        for net in RECOVERY.values():
            add_port_group(dr_sim, net)

        db.sql("update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
               " ssh_host_key = %s, target_root = %s, dr_datastore = %s, placeholder_datastore = %s,"
               " nfs_host = null, transport = 'ssh' where id = %s",
               (target_host.ssh_host, target_host.ssh_port, target_host.ssh_user, target_host.host_key, root,
                DR_DS, PLACEHOLDER_DS, TARGET))
        db.sql("update protection_groups set source_dataset = %s, protection_datastore = %s, rpo_minutes = null,"
               " retention_snapshots = 10, source_ssh_host = %s, source_ssh_port = %s, source_ssh_user = %s,"
               " source_ssh_key_secret = 'src-key', source_ssh_host_key = %s where id = %s",
               (source, SOURCE_DS, source_host.ssh_host, source_host.ssh_port, source_host.ssh_user,
                source_host.host_key, GROUP))
        db.sql("select zerfaux.set_mode('real')")
        world = FailoverWorld(db, source_host, target_host, source, source_dir, root, Path(), secrets, bundle,
                              source_sim, dr_sim, vms)

        # The VMs run at the source, with Tools (a guest shutdown is what a planned migration asks).
        si = source_sim.si()
        for v in vms:
            obj = vim.VirtualMachine(v.moref, si._stub)
            obj.PowerOnVM_Task()
            mark_tools_running(obj)
        _wait(lambda: all(source_sim.vm(v.moref).runtime.powerState == "poweredOn" for v in vms), "source VMs on")

        db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
        asyncio.run(world.drain())
        for v in vms:
            row = db.one("select id, networks from vcenter_vms where vcenter_id = %s and moref = %s",
                         (PRIMARY, v.moref))
            v.vm_id = str(row["id"])
            assert v.plan.network in (row["networks"] or []), (v.name, row["networks"])
            v.protected_id = str(db.value(
                "insert into protected_vms (protection_group_id, vm_id, boot_priority, tools_timeout_seconds)"
                " values (%s, %s, %s, %s) returning id", (GROUP, v.vm_id, v.plan.priority, v.plan.tools_timeout)))
        db.sql("insert into network_mappings (protection_group_id, source_network, recovery_network, test_network)"
               " select %s, s, r, null from unnest(%s::text[], %s::text[]) as m(s, r)",
               (GROUP, [*RECOVERY, *RECOVERY.values()], [*RECOVERY.values(), *RECOVERY]))

        last = 0.0
        for i in range(points):
            for v in vms[:i]:  # each point differs from the one before: the first i disks changed
                world.write_source(v, os.urandom(64 * 1024), offset=i * 64 * 1024 % disk_bytes)
            # ZFS keeps a snapshot's creation to the second: two points in one second would tie
            # on recovery_points.created_at, and "the newest" would be either of them.
            time.sleep(max(0.0, 1.1 - (time.time() - last)))
            last = time.time()
            job = world.replicate()
            assert job["status"] == "completed", job["error"]
            world.points.append(job["snapshot_name"])
        world.replica_dir = Path(world.mountpoint(target_host, world.replica))
        assert world.replica_dir.is_absolute(), world.replica_dir

        # The DR datastore, as the run's present_datastore asks for it; the shells' disks in it.
        target_host.run(["zfs", "set", "readonly=on", world.replica])
        target_host.run(["zfs", "mount", world.replica], check=False)
        assert world.zfs_get("dr", "mounted", world.replica) == "yes"
        present_nas(dr_sim, DR_DS, target_host.ssh_host, str(world.replica_dir))
        db.sql("update protected_vms set needs_dr_shell = true where protection_group_id = %s", (GROUP,))
        asyncio.run(world.drain())
        for v in vms:
            row = db.one("select dr_shell_vm_id, last_error from protected_vms where id = %s", (v.protected_id,))
            assert row["dr_shell_vm_id"], (v.name, row["last_error"])
            v.shell = str(row["dr_shell_vm_id"])
        # Received -u, readonly, unmounted: as replication leaves a replica (the run mounts it). A
        # mount left in place would also serve stale pages after the next receive (zfs-fuse).
        target_host.run(["zfs", "umount", world.replica])
        assert (world.zfs_get("dr", "mounted", world.replica), world.zfs_get("dr", "readonly", world.replica)) \
            == ("no", "on")
        if delay_ms:
            for sim in sims:
                sim.set_delay(delay_ms)
        yield world
    finally:
        for sim in sims:
            sim.stop()
        for host, top in ((target_host, root), (source_host, source)):
            _destroy_tree(host, top)
        # What a reprotect kept or a failover superseded sits beside the dataset, not under it.
        for host, ds in ((source_host, source), (target_host, f"{root}")):
            out = host.run(["zfs", "list", "-H", "-o", "name"], check=False).stdout.decode().split()
            for name in out:
                if name.startswith(ds + "_zerfaux_"):
                    _destroy_tree(host, name)


def _destroy_tree(host: ZFSHost, dataset: str) -> None:
    """Everything under ``dataset``, holds released, clones first (zfs-fuse may call a fresh mount busy)."""
    snaps = host.run(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset], check=False)
    for snap in snaps.stdout.decode().split():
        holds = host.run(["zfs", "holds", "-H", snap], check=False).stdout.decode()
        for line in holds.splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                host.run(["zfs", "release", parts[1], snap], check=False)
    for _ in range(5):
        done = host.run(["zfs", "destroy", "-R", "-f", dataset], check=False)
        if done.returncode == 0 or b"does not exist" in done.stderr:
            return
        time.sleep(0.5)


def _wait(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def failover_world(pg_template: str, zfs_source: ZFSHost, zfs_target: ZFSHost, vcsim_binary: str,
                   tmp_path: Path) -> Iterator[Callable[..., FailoverWorld]]:
    """A factory: ``failover_world(plan=..., disk_bytes=..., delay_ms=..., points=...)`` builds one world
    (its own database, simulators and datasets) for this test; all of it goes after the test."""
    from listener.migrate import seed

    if not zfs_source.local:
        missing("zfs-fuse", "the source datastore is a directory on this machine: needs a local zfs")
    built: list[tuple[Database, Iterator[FailoverWorld]]] = []

    def start(name: str, **kwargs: Any) -> Simulator:
        return start_simulator(vcsim_binary, name, tmp_path, **kwargs)

    def make(**kwargs: Any) -> FailoverWorld:
        db = create_database(pg_template)
        seed(db.url)
        gen = build_failover_world(db, zfs_source, zfs_target, start, tmp_path, **kwargs)
        built.append((db, gen))
        return next(gen)

    try:
        yield make
    finally:
        for db, gen in reversed(built):
            with contextlib.suppress(StopIteration):
                next(gen)
            drop_database(db.name)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
