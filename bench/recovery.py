"""A test failover of 100 VMs in 5 boot priorities: Zerfaux's RTO against a plain pyVmomi script.

    .venv/bin/python bench/recovery.py [--kind test|migration|both] [--vms 100] [--priorities 5]
                                       [--delay-ms 20] [--rounds 3] [--delta-mib 64]

``--kind test`` (the default) is described here; ``--kind migration`` is the planned migration
benchmark of bench/migration.py (its own world, its own ``RATIO`` line); ``both`` runs one then
the other.

The world of tests/integration/recovery_world.py, larger: ``--vms`` protected VMs (small flat
disks in a zfs-fuse dataset, replicated over the run's sshd to the DR pool), priorities
1..``--priorities`` in equal shares, every NIC on ``VM Network`` mapped to an isolated test port
group. Each round starts a fresh DR simulator of the same shape (a cluster of two hosts) that
answers every SOAP call after ``--delay-ms`` (vcsim's ``-delay``), and a harness thread marks each
VM's Tools running as soon as it sees it powered on (vcsim has no Tools).

- Zerfaux: ``insert into recovery_runs (..., 'test')``, the real dispatcher in this process
  (``ZERFAUX_USE_STUBS=false``): validate, hold + clone + export on the DR pool over SSH, present
  the datastore, create the port group, create each VM, power on by priority, wait for Tools.
  Its figure is the run's own ``rto_seconds`` (run start to the last VM ready). The cleanup run
  after it is not timed.
- The script: no Zerfaux code, the same calls in the same order with the same parallelism within
  a priority: connect, read networks and hosts, ``zfs get guid`` / ``available`` / ``hold`` /
  ``clone`` / ``set sharenfs`` over SSH, ``CreateNasDatastore`` on each host, a vSwitch and port
  group on each host, ``CreateVM_Task`` ×N, ``--create-parallel`` at a time (8: as many as Zerfaux runs at once), then per priority ``PowerOnVM_Task``
  in one thread per VM and a wait for Tools per VM (``WaitForUpdatesEx``). Timed from connect to the last VM ready.

The two alternate, ``--rounds`` times each; medians. Last line:
``RATIO <script seconds / zerfaux RTO seconds> test failover orchestration overhead`` (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shlex
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyVim.connect import Disconnect, SmartConnect  # noqa: E402
from pyVim.task import WaitForTask  # noqa: E402
from pyVmomi import vim  # noqa: E402

from bench.common import drop_database, scratch_database  # noqa: E402
from listener.migrate import migrate, seed  # noqa: E402
from tests.integration.conftest import GROUP  # noqa: E402
from tests.integration.recovery_world import (  # noqa: E402
    DR_ARGS, PLACEHOLDER_DS, RecoveryWorld, ToolsHarness, VMPlan, build_world, dr_vcenter,
)
from tests.support import zfs as zfs_support  # noqa: E402
from tests.support.pg import Database  # noqa: E402
from tests.support.vcsim import Simulator, build_vcsim, start_simulator  # noqa: E402

KiB = 1024


# ---- Zerfaux ---------------------------------------------------------------------------------------


def zerfaux_phases(w: RecoveryWorld, run_id: str) -> dict[str, float]:
    """Seconds of each phase, from the run's steps: preparation, VM creation, each priority's boot."""
    db = w.db
    started = db.value("select started_at from recovery_runs where id = %s", (run_id,))
    rows = db.sql("select s.name, s.started_at, s.finished_at, p.boot_priority from recovery_run_steps s"
                  " left join protected_vms p on p.id = s.protected_vm_id where s.run_id = %s order by s.seq", (run_id,))
    phases: dict[str, float] = {}
    prep = [r for r in rows if r["boot_priority"] is None and r["name"] != "activate"]
    phases["prepare"] = (max(r["finished_at"] for r in prep) - started).total_seconds()
    made = [r for r in rows if r["name"] == "create_vm"]
    phases["create"] = (max(r["finished_at"] for r in made) - max(r["finished_at"] for r in prep)).total_seconds()
    last = max(r["finished_at"] for r in made)
    for p in sorted({r["boot_priority"] for r in rows if r["name"] == "power_on"}):
        end = max(r["finished_at"] for r in rows if r["name"] == "wait_ready" and r["boot_priority"] == p)
        phases[f"p{p}"] = (end - last).total_seconds()
        last = end
    return phases


def zerfaux_round(w: RecoveryWorld, delay_ms: int, name: str) -> tuple[float, float, dict[str, float]]:
    """(rto_seconds, wall seconds from insert to 'active') of one test failover; then its cleanup, untimed."""
    assert w.new_vcenter is not None and w.workdir is not None
    old = w.dr_sim
    w.dr_sim = dr_vcenter(w.new_vcenter, w.workdir, name, delay_ms)
    old.stop()
    db = w.db
    with ToolsHarness(w.dr_sim, skip=lambda _name: False, interval=0.02) as tools:
        start = time.monotonic()
        run_id = str(db.value("insert into recovery_runs (protection_group_id, kind, recovery_point_id)"
                              " values (%s, 'test', %s) returning id", (GROUP, w.point_id)))
        asyncio.run(w.drain(timeout=1800))
        wall = time.monotonic() - start
    run = db.one("select status, rto_seconds, error from recovery_runs where id = %s", (run_id,))
    if run["status"] != "active" or tools.errors:
        steps = db.sql("select name, status, error from recovery_run_steps where run_id = %s and status <> 'done'"
                       " order by seq limit 5", (run_id,))
        raise SystemExit(f"the test failover did not become active: {run} {steps} {tools.errors[:3]}")
    phases = zerfaux_phases(w, run_id)
    w.dr_sim.set_delay(0)
    db.sql("insert into recovery_runs (protection_group_id, kind, test_run_id) values (%s, 'cleanup', %s)",
           (GROUP, run_id))
    asyncio.run(w.drain(timeout=1800))
    return float(run["rto_seconds"]), wall, phases


# ---- the plain script ------------------------------------------------------------------------------


def ssh(w: RecoveryWorld, command: str) -> str:
    key = Path(w.secrets) / "dr-key"
    known = Path(w.secrets) / "known_hosts"
    known.write_text(w.target_host.host_key + "\n")
    argv = ["ssh", "-i", str(key), "-p", str(w.target_host.ssh_port), "-o", f"UserKnownHostsFile={known}",
            "-o", "BatchMode=yes", f"{w.target_host.ssh_user}@{w.target_host.ssh_host}", command]
    return subprocess.run(argv, capture_output=True, check=True, timeout=120, text=True).stdout


def collect(si: Any, vim_type: Any, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
    content = si.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim_type], True)
    try:
        spec = vim.PropertyCollector.FilterSpec(
            objectSet=[vim.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[
                vim.PropertyCollector.TraversalSpec(name="v", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[vim.PropertyCollector.PropertySpec(type=vim_type, pathSet=paths)])
        return [(o.obj, {p.name: p.val for p in o.propSet}) for o in content.propertyCollector.RetrieveContents([spec])]
    finally:
        view.DestroyView()


def wait_tools(si: Any, vm: Any) -> None:
    """Until Tools run: a long poll on the property (``WaitForUpdatesEx``), as a careful script would."""
    pc = vim.PropertyCollector
    collector = si.content.propertyCollector.CreatePropertyCollector()
    try:
        collector.CreateFilter(pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=vm, skip=False)], propSet=[
            pc.PropertySpec(type=vim.VirtualMachine, pathSet=["guest.toolsRunningStatus"], all=False)]),
            partialUpdates=True)
        version = ""
        while True:
            update = collector.WaitForUpdatesEx(version, pc.WaitOptions(maxWaitSeconds=5))
            if update is None:
                continue
            version = update.version
            for fs in update.filterSet or ():
                for ou in fs.objectSet or ():
                    if any(c.val == "guestToolsRunning" for c in ou.changeSet or ()):
                        return
    finally:
        collector.DestroyPropertyCollector()


def script_round(w: RecoveryWorld, sim: Simulator, tag: str, create_parallel: int,
                 phases: dict[str, float]) -> float:
    """The same test failover by hand; seconds from connect to the last VM ready."""
    snapshot, clone = f"{w.replica}@{w.snapshot}", f"{w.target_root}/{tag}"
    where = zfs_support.mountpoint(f"bench-{tag}")
    start = time.monotonic()
    si = SmartConnect(host=sim.host, port=sim.port, user=sim.username, pwd=sim.password,
                      sslContext=ssl.create_default_context(cafile=sim.cert_file))
    try:
        networks = {props["name"] for _, props in collect(si, vim.Network, ["name"])}
        assert "VM Network" in networks
        dc = si.content.rootFolder.childEntity[0]
        cluster = next(c for c in dc.hostFolder.childEntity if isinstance(c, vim.ClusterComputeResource))
        hosts = list(cluster.host)
        ssh(w, f"zfs get -H -o value guid {shlex.quote(snapshot)}")
        ssh(w, f"zfs get -H -o value available {shlex.quote(w.target_root)}")
        ssh(w, f"zfs hold {tag} {shlex.quote(snapshot)}")
        ssh(w, f"zfs clone -o mountpoint={where} {shlex.quote(snapshot)} {clone}")
        # A host without an NFS server (no exportfs, as here) sets the property and fails the share:
        # Zerfaux's export_clone records that as a warning and goes on, so does the script.
        ssh(w, f"zfs set sharenfs=on {clone} || zfs get -H -o value sharenfs {clone} | grep -qx on")
        for host in hosts:
            spec = vim.host.NasVolume.Specification(remoteHost=w.target_host.ssh_host, remotePath=where,
                                                    localPath=tag, accessMode="readWrite", type="NFS")
            host.configManager.datastoreSystem.CreateNasDatastore(spec=spec)
        for host in hosts:
            net = host.configManager.networkSystem
            net.AddVirtualSwitch(vswitchName=tag, spec=vim.host.VirtualSwitch.Specification(numPorts=128))
            try:
                net.AddPortGroup(portgrp=vim.host.PortGroup.Specification(
                    name=tag, vlanId=0, vswitchName=tag, policy=vim.host.NetworkPolicy()))
            except vim.fault.DuplicateName:
                pass  # vcsim: one network object per name per datacenter
        mark = time.monotonic()
        phases["prepare"] = mark - start
        dev = vim.vm.device
        add = dev.VirtualDeviceSpec.Operation.add

        def create(vm: Any) -> tuple[int, Any]:
            name = vm.plan.name
            disk = dev.VirtualDisk(key=-101, controllerKey=-100, unitNumber=0, capacityInKB=64,
                                   backing=dev.VirtualDisk.FlatVer2BackingInfo(
                                       fileName=f"[{tag}] {name}/{name}.vmdk", diskMode="persistent"))
            nic = dev.VirtualVmxnet3(key=-102, backing=dev.VirtualEthernetCard.NetworkBackingInfo(deviceName=tag))
            vm_name = f"{name}-test-{tag[-8:]}"
            config = vim.vm.ConfigSpec(
                name=vm_name, guestId="otherGuest64", numCPUs=1, memoryMB=512,
                files=vim.vm.FileInfo(vmPathName=f"[{tag}] {vm_name}/{vm_name}.vmx"),
                extraConfig=[vim.option.OptionValue(key="bench.run", value=tag)],
                deviceChange=[dev.VirtualDeviceSpec(operation=add, device=dev.VirtualLsiLogicController(
                    key=-100, busNumber=0, sharedBus="noSharing")),
                    dev.VirtualDeviceSpec(operation=add, device=disk), dev.VirtualDeviceSpec(operation=add, device=nic)])
            task = dc.vmFolder.CreateVM_Task(config=config, pool=cluster.resourcePool)
            WaitForTask(task)
            return vm.plan.priority, task.info.result

        morefs: dict[int, list[Any]] = {}
        with ThreadPoolExecutor(max_workers=create_parallel) as pool:
            for priority, made in pool.map(create, w.vms):
                morefs.setdefault(priority, []).append(made)

        def up(vm: Any) -> None:
            WaitForTask(vm.PowerOnVM_Task())
            wait_tools(si, vm)

        phases["create"] = time.monotonic() - mark
        for priority in sorted(morefs):
            mark = time.monotonic()
            with ThreadPoolExecutor(max_workers=len(morefs[priority])) as pool:
                list(pool.map(up, morefs[priority]))
            phases[f"p{priority}"] = time.monotonic() - mark
        return time.monotonic() - start
    finally:
        Disconnect(si)
        w.target_host.run(["zfs", "destroy", clone], check=False)
        w.target_host.run(["zfs", "release", tag, snapshot], check=False)


# ---- the benchmark ---------------------------------------------------------------------------------


def test_part(args: argparse.Namespace, start: Callable[..., Simulator], source_host: Any, target_host: Any,
              work: str) -> None:
    """The test failover benchmark (the module docstring)."""
    plan = tuple(VMPlan(f"b{i:03d}", 1 + i * args.priorities // args.vms, "VM Network") for i in range(args.vms))
    zerfaux: list[float] = []
    walls: list[float] = []
    script: list[float] = []
    z_phases: list[dict[str, float]] = []
    s_phases: list[dict[str, float]] = []
    with ExitStack() as stack:
        name, url = scratch_database("zf_bench_recovery")
        stack.callback(drop_database, name)
        migrate(url)
        seed(url)
        print(f"building the world: {args.vms} VMs in {args.priorities} priorities, replicated ...", flush=True)
        world_gen = build_world(Database(name, url), source_host, target_host, start, Path(work), plan, 64 * KiB)
        w = next(world_gen)
        stack.callback(lambda: next(world_gen, None))
        for r in range(args.rounds):
            order: list[Callable[[], None]] = []

            def ours(r: int = r) -> None:
                rto, wall, phases = zerfaux_round(w, args.delay_ms, f"bench-dr-z{r}")
                zerfaux.append(rto)
                z_phases.append(phases)
                walls.append(wall)
                print(f"  round {r + 1} zerfaux: RTO {rto:.2f} s (insert to active {wall:.2f} s)", flush=True)

            def theirs(r: int = r) -> None:
                sim = start(f"bench-dr-s{r}", datastores={PLACEHOLDER_DS: Path(work) / f"s{r}-placeholder"},
                            args=DR_ARGS)
                try:
                    sim.set_delay(args.delay_ms)
                    with ToolsHarness(sim, skip=lambda _name: False, interval=0.02):
                        phases: dict[str, float] = {}
                        seconds = script_round(w, sim, f"zerfaux-test-b{r:07d}", args.create_parallel, phases)
                        s_phases.append(phases)
                finally:
                    sim.stop()
                script.append(seconds)
                print(f"  round {r + 1} script:  {seconds:.2f} s", flush=True)

            order = [ours, theirs] if r % 2 == 0 else [theirs, ours]
            for step in order:
                step()
    z, s = statistics.median(zerfaux), statistics.median(script)
    print(f"test failover, {args.vms} VMs in {args.priorities} priorities, vcsim {args.delay_ms} ms per call,"
          f" median of {args.rounds}: zerfaux RTO {z:.2f} s (insert to active {statistics.median(walls):.2f} s),"
          f" plain pyVmomi script {s:.2f} s")
    for key in z_phases[0]:
        zp = statistics.median(p[key] for p in z_phases)
        sp = statistics.median(p.get(key, float("nan")) for p in s_phases)
        print(f"  {key:8s} zerfaux {zp:6.2f} s   script {sp:6.2f} s")
    print(f"RATIO {s / z:.2f} test failover orchestration overhead")


def migration_part(args: argparse.Namespace, start: Callable[..., Simulator], source_host: Any, target_host: Any,
                   work: str) -> None:
    """The planned migration benchmark (bench/migration.py), in tests/integration/failover_world.py's world."""
    from bench import migration
    from tests.integration.failover_world import build_failover_world, plan_of

    # Every VM's flat disk holds its share of the final delta.
    disk = max(64 * KiB, -(-args.delta_mib * 1024 // args.vms) * KiB)
    os.makedirs(work, exist_ok=True)
    with ExitStack() as stack:
        name, url = scratch_database("zf_bench_migration")
        stack.callback(drop_database, name)
        migrate(url)
        seed(url)
        print(f"building the migration world: {args.vms} VMs in {args.priorities} priorities, replicated,"
              " DR shells made ...", flush=True)
        began = time.monotonic()
        world_gen = build_failover_world(Database(name, url), source_host, target_host, start, Path(work),
                                         plan=plan_of(args.vms, args.priorities), disk_bytes=disk)
        w = next(world_gen)
        stack.callback(lambda: next(world_gen, None))
        print(f"  built in {time.monotonic() - began:.1f} s", flush=True)
        migration.run(w, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("test", "migration", "both"), default="test",
                        help="test failover (default), planned migration (bench/migration.py), or both in turn")
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--priorities", type=int, default=5)
    parser.add_argument("--delay-ms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    # Zerfaux creates test VMs 8 at a time (handlers/recovery/runner.py CREATE_LIMIT): the script too.
    parser.add_argument("--create-parallel", type=int, default=8)
    parser.add_argument("--delta-mib", type=int, default=64, help="planned migration: the final delta")
    parser.add_argument("--sides", default="zerfaux,script",
                        help="planned migration: which sides run (zerfaux, script, or both: no ratio with one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    suffix = secrets.token_hex(3)
    binary = build_vcsim()
    with ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="zerfaux-bench-recovery-")
        stack.callback(subprocess.run, ["rm", "-rf", work], check=False)
        zfs_support._MOUNTS[:] = [os.path.join(work, "mnt")]
        stack.enter_context(zfs_support.zfs_fuse_running(work))
        src_pool = stack.enter_context(zfs_support.pool(f"zxrs{suffix}", work))
        dst_pool = stack.enter_context(zfs_support.pool(f"zxrd{suffix}", work))
        sshd = stack.enter_context(zfs_support.sshd_running(work))
        source_host, target_host = zfs_support._host(sshd, src_pool), zfs_support._host(sshd, dst_pool)

        def start(sim_name: str, **kwargs: Any) -> Simulator:
            return start_simulator(binary, sim_name, Path(work), **kwargs)

        if args.kind in ("test", "both"):
            test_part(args, start, source_host, target_host, work)
        if args.kind in ("migration", "both"):
            migration_part(args, start, source_host, target_host, os.path.join(work, "migration"))


if __name__ == "__main__":
    main()
