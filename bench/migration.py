"""The planned migration half of bench/recovery.py (``--kind migration``): Zerfaux's RTO against a plain script.

The world is tests/integration/failover_world.py's, at ``--vms`` VMs in ``--priorities`` boot
priorities: flat disks in a zfs-fuse source dataset reached over the run's sshd, replicated to
the DR pool; the source VMs running with VMware Tools marked running (so they are shut down by
``ShutdownGuest``); the DR datastore presented at every DR host at the replica's mountpoint
(exactly what the run's ``present_datastore`` asks for, so that step finds it there); one DR
shell per protected VM made by the ``vm.dr_shell`` kind, with its disk and no NIC (every run adds
the NIC on the mapped recovery network). Both vcsim answer after ``--delay-ms`` per call during a
round; a harness thread marks each DR shell's Tools running once it is on (vcsim has none).

Between rounds (untimed, no delay) the world is put back as it was: both datasets rolled back to
the snapshot they shared when the world was built (``zfs rollback -r``), the replica unmounted,
``readonly=on``, ``sharenfs=off``; the DR shells powered off, their NICs removed, their Tools
marked not running; the source VMs powered on; the group 'protected', 'forward'.

The final delta: ``--delta-mib`` random bytes (the same bytes every round, either side) written
over the start of the VMs' flat disks from the moment the first replication's snapshot exists,
while that replication and the shutdowns go on (as guests write until they stop), so the final
replication carries it (the final streams' sizes are printed). The script waits for the writer
before its final snapshot, the wait counted; a Zerfaux round whose writer had not finished when
``replicate_final`` started does not count (it says so).

The plain script (``script_round``): no Zerfaux code, the runner's steps in the runner's order with
its parallelism (a priority's shutdowns together, 16 VM reconfigurations at once, a priority's
power-ons together), one pyVmomi session per vCenter and one ssh master connection per storage
host (``ControlMaster``, aes128-gcm, as Zerfaux keeps its connections): bulk reads of both sites'
VMs (``RetrieveContents``), ``zfs snapshot`` + ``ssh src zfs send -i | ssh dst zfs receive -u``,
``ShutdownGuest`` and a ``WaitForUpdatesEx`` on ``runtime.powerState`` per VM, the final snapshot
sent the same way and its GUID read on both ends, the pre-failover snapshot, ``readonly=off`` +
``zfs mount``, ``sharenfs=on``, ``CreateNasDatastore`` where a host lacks the datastore, each
shell's devices read (its disk is there) and one ``ReconfigVM_Task`` adding its NIC on the
recovery network, then per priority ``PowerOnVM_Task`` and a ``WaitForUpdatesEx`` on
``guest.toolsRunningStatus``, after one bulk read of site A's power states (no VM in two
places). Timed from the first call to the last VM ready, as Zerfaux's ``rto_seconds`` runs from
the run's start to its last VM ready. What it leaves out that Zerfaux does: reading each VM's
power events (``QueryEvents``: when it went off, for the report and the fencing record).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shlex
import shutil
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.integration.conftest import GROUP
from tests.integration.failover_world import RECOVERY, FailoverWorld
from tests.integration.recovery_world import ToolsHarness
from tests.support.vcsim import DR_DS, Simulator

MiB = 1024 * 1024
STEP_LIMIT = 16  # attach_disks and set_networks at once: the runner's VM_LIMIT (handlers/recovery/failover_runner.py)
_dev = vim.vm.device
STEP_SECONDS: dict[str, list[float]] = {}  # step name → each step's own duration, every counted Zerfaux round


# ---- the world -----------------------------------------------------------------------------------


@dataclass
class Site:
    """One protected VM at both sites."""

    name: str
    priority: int
    network: str  # its NIC's network at the DR site (network_mappings.recovery_network)
    protected_id: str
    source_moref: str
    shell_moref: str
    shell_name: str


@dataclass
class MigrationWorld:
    fw: FailoverWorld
    sites: list[Site]
    base: str  # the snapshot both datasets share when a round starts
    delta: bytes
    ssh_dir: Path

    @property
    def replica(self) -> str:
        return self.fw.replica

    @property
    def source(self) -> str:
        return self.fw.source

    def by_priority(self) -> dict[int, list[Site]]:
        out: dict[int, list[Site]] = {}
        for s in sorted(self.sites, key=lambda s: s.priority):
            out.setdefault(s.priority, []).append(s)
        return out

    def set_delay(self, ms: int) -> None:
        self.fw.source_sim.set_delay(ms)
        self.fw.dr_sim.set_delay(ms)

    def harness(self) -> ToolsHarness:
        names = frozenset(s.shell_name for s in self.sites)
        return ToolsHarness(self.fw.dr_sim, skip=lambda _name: False, interval=0.02, wants=names.__contains__)


def collect(si: Any, vim_type: Any, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
    """Every object of a type with ``paths``, in one ``RetrieveContents`` over a container view."""
    content = si.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim_type], True)
    try:
        pc = vim.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[
                pc.TraversalSpec(name="v", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[pc.PropertySpec(type=vim_type, pathSet=paths)])
        return [(o.obj, {p.name: p.val for p in o.propSet or ()})
                for o in content.propertyCollector.RetrieveContents([spec])]
    finally:
        view.DestroyView()


def connect(sim: Simulator) -> Any:
    return SmartConnect(host=sim.host, port=sim.port, user=sim.username, pwd=sim.password,
                        sslContext=ssl.create_default_context(cafile=sim.cert_file))


def parallel(fn: Callable[[Any], Any], items: list[Any], limit: int | None = None) -> list[Any]:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=limit or len(items)) as pool:
        return list(pool.map(fn, items))


def snapshots(run: Callable[..., subprocess.CompletedProcess[bytes]], dataset: str) -> list[str]:
    """The dataset's snapshot names, oldest first (zfs-fuse's ``zfs get`` has no ``-d``/``-t``)."""
    out = run(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg", "-d", "1", dataset]).stdout
    return [line.split("@", 1)[1] for line in out.decode().split()]


def build(fw: FailoverWorld, delta_mib: int) -> MigrationWorld:
    """The failover world as the benchmark's (module docstring): sites, the shared snapshot, the delta."""
    dr = fw.dr_sim.si()
    names = {vm._moId: str(p["name"]) for vm, p in collect(dr, vim.VirtualMachine, ["name"])}
    sites = [Site(v.name, v.plan.priority, RECOVERY[v.plan.network], v.protected_id, v.moref, v.shell,
                  names[v.shell]) for v in fw.vms]
    ssh_dir = Path(tempfile.mkdtemp(prefix="zfb-", dir="/tmp"))  # a control socket's path has ~100 bytes at most
    (ssh_dir / "known_hosts").write_text(fw.target_host.host_key + "\n")
    m = MigrationWorld(fw, sites, fw.points[-1], os.urandom(delta_mib * MiB), ssh_dir)
    reset(m)
    return m


def write_delta(m: MigrationWorld) -> float:
    """Overwrite the start of every VM's flat disk with its share of the delta; returns when it was written.

    No fsync: FUSE without writeback caching (zfs-fuse) hands each write to the daemon before it
    returns, so the next snapshot holds it (the final streams' sizes printed at the end show it)."""
    share = len(m.delta) // len(m.sites)
    for i, site in enumerate(sorted(m.sites, key=lambda s: s.name)):
        end = len(m.delta) if i == len(m.sites) - 1 else (i + 1) * share
        fd = os.open(m.fw.source_dir / site.name / f"{site.name}-flat.vmdk", os.O_WRONLY)
        try:
            os.pwrite(fd, m.delta[i * share:end], 0)
        finally:
            os.close(fd)
    return time.time()


def reset(m: MigrationWorld) -> None:
    """The world as built (module docstring), at no delay."""
    w, target = m.fw, m.fw.target_host
    m.set_delay(0)
    # zfs-fuse: a rollback right after an unmount fails with an I/O error; rolled back first, then unmounted.
    w.source_host.run(["zfs", "rollback", "-r", f"{w.source}@{m.base}"])
    target.run(["zfs", "rollback", "-r", f"{m.replica}@{m.base}"])
    target.run(["zfs", "umount", m.replica], check=False)
    target.run(["zfs", "set", "sharenfs=off", m.replica])
    target.run(["zfs", "set", "readonly=on", m.replica])
    dr, src = m.fw.dr_sim.si(), w.source_sim.si()
    nics = vim.vm.device.VirtualDeviceSpec.Operation.remove

    def shell(site: Site) -> None:
        vm = vim.VirtualMachine(site.shell_moref, dr._stub)
        if vm.runtime.powerState != "poweredOff":  # read again: a retry follows a call that may have worked
            WaitForTask(vm.PowerOffVM_Task())
        cards = [d for d in vm.config.hardware.device if isinstance(d, _dev.VirtualEthernetCard)]
        WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(
            deviceChange=[_dev.VirtualDeviceSpec(operation=nics, device=d) for d in cards],
            extraConfig=[vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsNotRunning"),
                         vim.option.OptionValue(key="SET.summary.quickStats.guestHeartbeatStatus", value="gray")])))


    def source(site: Site) -> None:
        vm = vim.VirtualMachine(site.source_moref, src._stub)
        if vm.runtime.powerState != "poweredOn":
            WaitForTask(vm.PowerOnVM_Task())

    for site in m.sites:  # one by one: vcsim 0.24 drops connections under concurrent reconfigurations at times
        retried(lambda: shell(site))
        retried(lambda: source(site))
    w.db.sql("update protection_groups set state = 'protected', direction = 'forward', state_changed_at = now()"
             " where id = %s", (GROUP,))


def retried(fn: Callable[[], Any]) -> Any:
    """Once more after a dropped connection (vcsim's answer to a request it panicked on)."""
    try:
        return fn()
    except (http.client.RemoteDisconnected, ConnectionError):
        time.sleep(0.5)
        return fn()


def check_migrated(m: MigrationWorld) -> list[str]:
    """What is wrong after a round, as the peers tell it: every DR VM on, every source VM off, the final GUID equal."""
    problems = []
    dr = {vm._moId: p for vm, p in collect(m.fw.dr_sim.si(), vim.VirtualMachine, ["runtime.powerState"])}
    src = {vm._moId: p for vm, p in collect(m.fw.source_sim.si(), vim.VirtualMachine, ["runtime.powerState"])}
    off = [s.name for s in m.sites if dr[s.shell_moref].get("runtime.powerState") != "poweredOn"]
    on = [s.name for s in m.sites if src[s.source_moref].get("runtime.powerState") != "poweredOff"]
    if off:
        problems.append(f"{len(off)} DR VMs not on ({off[:3]})")
    if on:
        problems.append(f"{len(on)} source VMs not off ({on[:3]})")
    final = snapshots(m.fw.source_host.run, m.fw.source)[-1]
    guid = ["zfs", "get", "-H", "-p", "-o", "value", "guid"]
    a = m.fw.source_host.run([*guid, f"{m.fw.source}@{final}"]).stdout.strip()
    b = m.fw.target_host.run([*guid, f"{m.replica}@{final}"], check=False).stdout.strip()
    if a != b:
        problems.append(f"final snapshot {final}: GUID {a!r} on the source, {b!r} on the replica")
    return problems


def final_stream_bytes(m: MigrationWorld) -> int:
    """Bytes of the incremental from the round's first replication to its final one (a check, untimed)."""
    first, last = (f"{m.fw.source}@{s}" for s in snapshots(m.fw.source_host.run, m.fw.source)[-2:])
    done = subprocess.run(f"zfs send -i {shlex.quote(first)} {shlex.quote(last)} | wc -c", shell=True,
                          capture_output=True, check=True, text=True)
    return int(done.stdout.strip())


# ---- Zerfaux -------------------------------------------------------------------------------------


@contextmanager
def delta_after_first_snapshot(m: MigrationWorld) -> Iterator[dict[str, float]]:
    """A thread that writes the delta as soon as the run's first replication made its snapshot
    (the ``replicate`` step running, a snapshot newer than the round's base on the source); yields its times."""
    times: dict[str, float] = {}
    stop = threading.Event()

    def loop() -> None:
        with psycopg.connect(m.fw.db.url, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("select s.status from recovery_run_steps s join recovery_runs r on r.id = s.run_id"
                                   " where r.protection_group_id = %s and r.kind = 'planned_migration'"
                                   " and r.status = 'running' and s.name = 'replicate'", (GROUP,)).fetchone()
                if row and row[0] in ("running", "done") and snapshots(m.fw.source_host.run, m.source)[-1] != m.base:
                    times["started"] = time.time()
                    times["durable"] = write_delta(m)
                    return
                stop.wait(0.02)

    thread = threading.Thread(target=loop, name="delta-writer", daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(60)


def steps_of(m: MigrationWorld, run_id: str) -> list[dict[str, Any]]:
    return m.fw.db.sql("select s.seq, s.name, s.status, s.started_at, s.finished_at, s.error, p.boot_priority"
                      " from recovery_run_steps s left join protected_vms p on p.id = s.protected_vm_id"
                      " where s.run_id = %s order by s.seq", (run_id,))


def zerfaux_phases(m: MigrationWorld, run_id: str) -> dict[str, float]:
    """Seconds of each phase from the run's steps: a step name's first start to its last finish (per
    priority for the VM steps that go by priority); ``book`` is the run's time outside every step."""
    started = m.fw.db.value("select started_at from recovery_runs where id = %s", (run_id,))
    rows = [r for r in steps_of(m, run_id) if r["started_at"] is not None and r["finished_at"] is not None]
    phases: dict[str, float] = {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r["name"]
        if r["name"] in ("shutdown_source", "power_on", "wait_ready"):
            key = f"{'shutdown' if r['name'] == 'shutdown_source' else 'boot'} p{r['boot_priority']}"
        groups.setdefault(key, []).append(r)
    spans = []
    for key, rs in groups.items():
        a, b = min(r["started_at"] for r in rs), max(r["finished_at"] for r in rs)
        spans.append((a, b))
        phases[key] = phases.get(key, 0.0) + (b - a).total_seconds()
    end = max(b for _, b in spans)
    covered, cursor = 0.0, started
    for a, b in sorted(spans):
        if b <= cursor:
            continue
        covered += (b - max(a, cursor)).total_seconds()
        cursor = b
    phases["book"] = (end - started).total_seconds() - covered
    return phases


def zerfaux_round(m: MigrationWorld, delay_ms: int) -> tuple[float, float, dict[str, float], list[str]]:
    """(rto_seconds, wall seconds from insert to completed, phases, problems) of one planned migration."""
    db = m.fw.db
    m.set_delay(delay_ms)
    with m.harness() as tools, delta_after_first_snapshot(m) as delta:
        start = time.monotonic()
        run_id = str(db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'planned_migration')"
                              " returning id", (GROUP,)))
        asyncio.run(m.fw.drain(timeout=1800))
        wall = time.monotonic() - start
    m.set_delay(0)
    run = db.one("select status, rto_seconds, error from recovery_runs where id = %s", (run_id,))
    if run["status"] != "completed" or tools.errors:
        steps = [r for r in steps_of(m, run_id) if r["status"] not in ("done", "skipped")][:5]
        raise SystemExit(f"the planned migration did not complete: {run} {steps} {tools.errors[:3]}")
    problems = check_migrated(m)
    final = next(r for r in steps_of(m, run_id) if r["name"] == "replicate_final")
    if "durable" not in delta or delta["durable"] > final["started_at"].timestamp():
        problems.append("the delta was still being written when replicate_final started: this round does not count")
    phases = zerfaux_phases(m, run_id)
    for r in steps_of(m, run_id):
        if r["started_at"] is not None and r["finished_at"] is not None:
            STEP_SECONDS.setdefault(r["name"], []).append((r["finished_at"] - r["started_at"]).total_seconds())
    if "durable" in delta:
        phases["delta_write"] = delta["durable"] - delta["started"]
    return float(run["rto_seconds"]), wall, phases, problems


# ---- the plain script ----------------------------------------------------------------------------


class Shell:
    """ssh to the storage hosts as a careful script would: one master connection per host, reused."""

    def __init__(self, m: MigrationWorld) -> None:
        self.m = m
        self.key = Path(m.fw.secrets) / "dr-key"

    def argv(self, host: Any, command: str) -> list[str]:
        d = self.m.ssh_dir
        return ["ssh", "-i", str(self.key), "-p", str(host.ssh_port), "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
                "-o", "BatchMode=yes", "-o", "Ciphers=aes128-gcm@openssh.com", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={d}/cm-%C", "-o", "ControlPersist=60", f"{host.ssh_user}@{host.ssh_host}", command]

    def src(self, command: str) -> str:
        return self._run(self.argv(self.m.fw.source_host, command))

    def tgt(self, command: str) -> str:
        return self._run(self.argv(self.m.fw.target_host, command))

    @staticmethod
    def _run(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, check=False, timeout=600, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[-1]!r} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def send(self, base: str, snap: str) -> None:
        """``zfs send -i | ssh | zfs receive -u``: the source's send over its ssh into the target's receive."""
        m = self.m
        send = shlex.join(self.argv(m.fw.source_host, shlex.join(["zfs", "send", "-i", f"{m.fw.source}@{base}",
                                                                 f"{m.fw.source}@{snap}"])))
        recv = shlex.join(self.argv(m.fw.target_host, shlex.join(["zfs", "receive", "-u", m.replica])))
        done = subprocess.run(f"set -o pipefail; {send} | {recv}", shell=True, executable="/bin/bash",
                              capture_output=True, timeout=600, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"send {base} -> {snap} exited {done.returncode}: {done.stderr.strip()}")

    def close(self) -> None:
        for host in (self.m.fw.source_host, self.m.fw.target_host):
            d = self.m.ssh_dir
            subprocess.run(["ssh", "-o", f"ControlPath={d}/cm-%C", "-O", "exit", "-p", str(host.ssh_port),
                            f"{host.ssh_user}@{host.ssh_host}"], capture_output=True, check=False, timeout=30)


def wait_property(si: Any, vm: Any, path: str, value: str) -> None:
    """Until ``path`` reads ``value``: a long poll (``WaitForUpdatesEx``) on a collector of its own."""
    pc = vim.PropertyCollector
    collector = si.content.propertyCollector.CreatePropertyCollector()
    try:
        collector.CreateFilter(pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=vm, skip=False)], propSet=[
            pc.PropertySpec(type=vim.VirtualMachine, pathSet=[path], all=False)]), partialUpdates=True)
        version = ""
        while True:
            update = collector.WaitForUpdatesEx(version, pc.WaitOptions(maxWaitSeconds=5))
            if update is None:
                continue
            version = update.version
            for fs in update.filterSet or ():
                for ou in fs.objectSet or ():
                    if any(c.val == value for c in ou.changeSet or ()):
                        return
    finally:
        collector.DestroyPropertyCollector()


def script_round(m: MigrationWorld, delay_ms: int, tag: str) -> tuple[float, dict[str, float], list[str]]:
    """The same planned migration by hand, in the runner's order; seconds from the first call to the last VM ready."""
    w = m.fw
    phases: dict[str, float] = {}
    sh = Shell(m)
    m.set_delay(delay_ms)
    writer: dict[str, float] = {}
    with m.harness():
        start = mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = phases.get(name, 0.0) + now - mark
            mark = now

        src, dr = connect(w.source_sim), connect(m.fw.dr_sim)
        try:
            # validate: the recovery network and the cluster's hosts at DR, the VMs at both sites, both datasets
            networks = {p.get("name") for _, p in collect(dr, vim.Network, ["name"])}
            assert {s.network for s in m.sites} <= networks, networks
            cluster = next(c for c, _ in collect(dr, vim.ClusterComputeResource, ["name"]))
            hosts = list(cluster.host)
            shells = {vm._moId: vm for vm, p in collect(dr, vim.VirtualMachine, ["name", "runtime.powerState"])
                      if p.get("runtime.powerState") == "poweredOff"}
            sources = {vm._moId: (vm, p) for vm, p in collect(
                src, vim.VirtualMachine, ["name", "runtime.powerState", "guest.toolsRunningStatus"])}
            assert all(s.shell_moref in shells and s.source_moref in sources for s in m.sites)
            base = sh.tgt(f"zfs list -H -t snapshot -o name -s createtxg -d 1 {shlex.quote(m.replica)} | tail -1")
            base = base.strip().split("@", 1)[1]
            phase("validate")
            # replicate, with the VMs still running
            first = f"bench_{tag}_1"
            sh.src(f"zfs snapshot {shlex.quote(f'{w.source}@{first}')}")
            writer["started"] = time.time()  # the guests go on writing after the first snapshot, as in a Zerfaux round
            thread = threading.Thread(target=lambda: writer.update(durable=write_delta(m)), name="delta-writer")
            thread.start()
            sh.send(base, first)
            phase("replicate")
            # shutdown_source, highest priority first, a priority's VMs together
            by_priority = m.by_priority()
            for priority in sorted(by_priority, reverse=True):

                def down(site: Site) -> None:
                    vm, props = sources[site.source_moref]
                    if props.get("guest.toolsRunningStatus") == "guestToolsRunning":
                        vm.ShutdownGuest()
                        wait_property(src, vm, "runtime.powerState", "poweredOff")
                    else:
                        WaitForTask(vm.PowerOffVM_Task())

                parallel(down, by_priority[priority])
                phase(f"shutdown p{priority}")
            thread.join()  # a guest's shutdown ends once it has written: waited for, and the wait counted
            phase("delta_wait")
            # replicate_final: the delta, with the VMs off; its GUID on both ends
            final = f"bench_{tag}_2"
            sh.src(f"zfs snapshot {shlex.quote(f'{w.source}@{final}')}")
            sh.send(first, final)
            guid = f"zfs get -H -p -o value guid {{}}@{final}"
            a, b = sh.src(guid.format(shlex.quote(w.source))), sh.tgt(guid.format(shlex.quote(m.replica)))
            assert a.strip() == b.strip(), (a, b)
            phase("replicate_final")
            sh.tgt(f"zfs snapshot {shlex.quote(f'{m.replica}@bench_pre_failover_{tag}')}")
            phase("pre_failover_snapshot")
            sh.tgt(f"zfs set readonly=off {shlex.quote(m.replica)} && zfs mount {shlex.quote(m.replica)}")
            phase("make_writable")
            # This machine has no NFS server: the property is set, the share fails, as Zerfaux's export warns.
            sh.tgt(f"zfs set sharenfs=on {shlex.quote(m.replica)} || zfs get -H -o value sharenfs"
                   f" {shlex.quote(m.replica)} | grep -qx on")
            phase("export")
            for host in hosts:
                if not any(ds.name == DR_DS for ds in host.datastore):
                    host.configManager.datastoreSystem.CreateNasDatastore(spec=vim.host.NasVolume.Specification(
                        remoteHost=w.target_host.ssh_host, remotePath=str(m.fw.replica_dir), localPath=DR_DS,
                        accessMode="readWrite", type="NFS"))
            phase("present_datastore")
            devices: dict[str, list[Any]] = {}

            def attach(site: Site) -> None:
                vm = shells[site.shell_moref]
                found = vm.config.hardware.device
                devices[site.shell_moref] = list(found)
                have = {getattr(d.backing, "fileName", "") for d in found if isinstance(d, _dev.VirtualDisk)}
                want = f"[{DR_DS}] {site.name}/{site.name}.vmdk"
                if want not in have:
                    raise AssertionError(f"{site.name}: the DR shell lacks {want} (it was made with it)")

            parallel(attach, m.sites, STEP_LIMIT)
            phase("attach_disks")

            def networks_on(site: Site) -> None:
                backing = _dev.VirtualEthernetCard.NetworkBackingInfo(deviceName=site.network)
                cards = [d for d in devices[site.shell_moref] if isinstance(d, _dev.VirtualEthernetCard)]
                if cards:
                    cards[0].backing = backing
                    change = _dev.VirtualDeviceSpec(operation=_dev.VirtualDeviceSpec.Operation.edit, device=cards[0])
                else:
                    change = _dev.VirtualDeviceSpec(operation=_dev.VirtualDeviceSpec.Operation.add,
                                                    device=_dev.VirtualVmxnet3(key=-300, backing=backing))
                WaitForTask(shells[site.shell_moref].ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))

            parallel(networks_on, m.sites, STEP_LIMIT)
            phase("set_networks")

            def up(site: Site) -> None:
                vm = shells[site.shell_moref]
                WaitForTask(vm.PowerOnVM_Task())
                wait_property(dr, vm, "guest.toolsRunningStatus", "guestToolsRunning")

            for priority in sorted(by_priority):
                # No VM in two places: the priority's VMs are off at site A, read again before any is on at B.
                now_at_a = {vm._moId: p.get("runtime.powerState") for vm, p in collect(
                    src, vim.VirtualMachine, ["runtime.powerState"])}
                assert all(now_at_a[s.source_moref] == "poweredOff" for s in by_priority[priority])
                parallel(up, by_priority[priority])
                phase(f"boot p{priority}")
            seconds = time.monotonic() - start
        finally:
            Disconnect(src)
            Disconnect(dr)
            sh.close()
            m.set_delay(0)
    problems = check_migrated(m)
    phases["delta_write"] = writer["durable"] - writer["started"]
    return seconds, phases, problems


# ---- the benchmark -------------------------------------------------------------------------------


def run(fw: FailoverWorld, args: Any) -> None:
    m = build(fw, args.delta_mib)
    try:
        measure(m, args)
    finally:
        shutil.rmtree(m.ssh_dir, ignore_errors=True)


def measure(m: MigrationWorld, args: Any) -> None:
    zerfaux: list[float] = []
    walls: list[float] = []
    script: list[float] = []
    z_phases: list[dict[str, float]] = []
    s_phases: list[dict[str, float]] = []
    streams: dict[str, list[int]] = {"zerfaux": [], "script": []}
    for r in range(args.rounds):

        def ours(r: int = r) -> None:
            rto, wall, phases, problems = zerfaux_round(m, args.delay_ms)
            streams["zerfaux"].append(final_stream_bytes(m))
            say = f"  round {r + 1} zerfaux: RTO {rto:.2f} s (insert to completed {wall:.2f} s)"
            if problems:
                print(f"{say}; NOT COUNTED: {'; '.join(problems)}", flush=True)
            else:
                zerfaux.append(rto)
                walls.append(wall)
                z_phases.append(phases)
                print(say, flush=True)
            reset(m)

        def theirs(r: int = r) -> None:
            seconds, phases, problems = script_round(m, args.delay_ms, f"r{r}")
            streams["script"].append(final_stream_bytes(m))
            say = f"  round {r + 1} script:  {seconds:.2f} s"
            if problems:
                print(f"{say}; NOT COUNTED: {'; '.join(problems)}", flush=True)
            else:
                script.append(seconds)
                s_phases.append(phases)
                print(say, flush=True)
            reset(m)

        sides = {"zerfaux": ours, "script": theirs}
        order = ["zerfaux", "script"] if r % 2 == 0 else ["script", "zerfaux"]
        for side in order:
            if side in args.sides.split(","):
                sides[side]()
    nan = float("nan")
    z = statistics.median(zerfaux) if zerfaux else nan
    s = statistics.median(script) if script else nan
    mib = {k: statistics.median(v) / MiB for k, v in streams.items() if v}
    print(f"planned migration, {len(m.sites)} VMs in {len(m.by_priority())} priorities, vcsim {args.delay_ms} ms per"
          f" call, {args.delta_mib} MiB final delta (final streams: zerfaux {mib.get('zerfaux', nan):.1f} MiB, script"
          f" {mib.get('script', nan):.1f} MiB), median of {len(zerfaux)}/{len(script)}: zerfaux RTO {z:.2f} s"
          f" (insert to completed {statistics.median(walls) if walls else nan:.2f} s), plain script {s:.2f} s")
    priorities = sorted(m.by_priority())
    keys = ["validate", "replicate", *(f"shutdown p{p}" for p in reversed(priorities)), "replicate_final",
            "pre_failover_snapshot", "load_key", "make_writable", "export", "present_datastore", "attach_disks",
            "set_networks", *(f"boot p{p}" for p in priorities), "finish", "book", "delta_wait", "delta_write"]
    for key in keys:
        zp = statistics.median(p.get(key, nan) for p in z_phases) if z_phases else nan
        sp = statistics.median(p.get(key, nan) for p in s_phases) if s_phases else nan
        print(f"  {key:22s} zerfaux {zp:6.2f} s   script {sp:6.2f} s")
    if STEP_SECONDS:
        print("  zerfaux's steps one by one (recovery_run_steps, every round): count, median, max seconds")
        for name in dict.fromkeys(k.split(" ")[0] for k in STEP_SECONDS):
            values = sorted(STEP_SECONDS[name])
            print(f"    {name:22s} {len(values):4d} {statistics.median(values):7.3f} {values[-1]:7.3f}")
    if not zerfaux or not script:
        raise SystemExit("no RATIO: a side has no counted round")
    print(f"RATIO {s / z:.2f} planned migration orchestration overhead")
