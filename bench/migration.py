"""The planned migration half of bench/recovery.py (``--kind migration``): Zerfaux's RTO against a plain script.

The world is tests/integration/recovery_world.py's (``--vms`` protected VMs with flat disks in a
zfs-fuse dataset, replicated over the run's sshd), turned into a site pair a planned migration
runs between:

- the group's source is reached over the same sshd (``source_ssh_*``), as the DR pool is;
- the replica gets a mountpoint; the DR vcsim (a cluster of two hosts, answering after
  ``--delay-ms`` per call like the source vcsim) has ``replication_targets.dr_datastore``
  presented by ``CreateNasDatastore`` at that mountpoint (tests/vcsim/main.go's ESXi-like
  override), the same call and arguments the run's ``present_datastore`` makes;
- each protected VM's DR shell is made by the ``vm.dr_shell`` kind (the replica mounted while
  they are made, so vcsim finds the disks; unmounted after), with its disk and no NIC;
- ``VM Network`` maps to ``zf-lab`` at the DR site, so every shell's NIC is added by the run;
- the source VMs run, with VMware Tools marked running (vcsim has none), so they are shut down
  by ``ShutdownGuest``; a harness thread marks each DR VM's Tools running once it is on.

Between rounds (untimed, no delay) the world is put back as it was: both datasets rolled back to
the snapshot they shared when the world was built (``zfs rollback -r``), the replica unmounted,
``readonly`` and ``sharenfs`` as they were; the DR VMs powered off, their NICs removed and
their Tools marked not running; the source VMs powered on; the group 'protected', 'forward'.

The final delta: ``--delta-mib`` random bytes (the same bytes every round, either kind) written
over the start of the VMs' flat disks once the first replication has finished, while the VMs
are shut down (as guests flush while they stop), so the final replication carries it. A Zerfaux
round whose writer had not finished when ``replicate_final`` started does not count (said so).
"""

from __future__ import annotations

import asyncio
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.integration.conftest import DR, GROUP
from tests.integration.recovery_world import (
    DR_ARGS, LAB_NETWORK, PLACEHOLDER_DS, RecoveryWorld, ToolsHarness, add_port_group, mark_tools_running,
)
from tests.support.vcsim import DR_DS, Simulator
from tests.support.zfs import mountpoint

MiB = 1024 * 1024
SHELL_SUFFIX = "-dr"  # protection_groups.dr_vm_suffix's default: the DR shells' names
STEP_LIMIT = 8  # per-VM vCenter steps outside boot (attach_disks, set_networks) at once: as the runner
_dev = vim.vm.device


# ---- the world -----------------------------------------------------------------------------------


@dataclass
class Site:
    """One protected VM at both sites."""

    name: str
    priority: int
    protected_id: str
    source_moref: str
    shell_moref: str = ""


@dataclass
class MigrationWorld:
    w: RecoveryWorld
    dr_sim: Simulator
    sites: list[Site]
    base: str  # the snapshot both datasets share when a round starts
    replica_mountpoint: str
    readonly: str  # the replica's readonly property as built
    delta: bytes
    ssh_dir: Path
    timings: dict[str, float] = field(default_factory=dict)  # how long building took, by part

    @property
    def replica(self) -> str:
        return self.w.replica

    def by_priority(self) -> dict[int, list[Site]]:
        out: dict[int, list[Site]] = {}
        for s in sorted(self.sites, key=lambda s: s.priority):
            out.setdefault(s.priority, []).append(s)
        return out

    def set_delay(self, ms: int) -> None:
        self.w.source_sim.set_delay(ms)
        self.dr_sim.set_delay(ms)

    def harness(self) -> ToolsHarness:
        return DRToolsHarness(self.dr_sim, skip=lambda _name: False, interval=0.02)


class DRToolsHarness(ToolsHarness):
    """The recovery world's harness for DR shells (named ``<vm>-dr``) instead of test VMs."""

    def _powered_on(self) -> list[tuple[Any, str]]:
        return [(vm, str(p["name"])) for vm, p in collect(self._si, vim.VirtualMachine, ["name", "runtime.powerState"])
                if p.get("runtime.powerState") == "poweredOn" and str(p.get("name")).endswith(SHELL_SUFFIX)]


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
        return [(o.obj, {p.name: p.val for p in o.propSet or ()}) for o in content.propertyCollector.RetrieveContents([spec])]
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


def build(w: RecoveryWorld, delay_ms: int, delta_mib: int) -> MigrationWorld:
    """The recovery world as a site pair for planned migrations (module docstring)."""
    assert w.new_vcenter is not None and w.workdir is not None
    db, target, timings = w.db, w.target_host, {}
    start = time.monotonic()
    db.sql("update protection_groups set source_ssh_host = %s, source_ssh_port = %s, source_ssh_user = %s,"
           " source_ssh_key_secret = 'dr-key', source_ssh_host_key = %s, retention_snapshots = 100,"
           " dr_network = null where id = %s",
           (w.source_host.ssh_host, w.source_host.ssh_port, w.source_host.ssh_user, w.source_host.host_key, GROUP))
    db.sql("update network_mappings set recovery_network = %s where protection_group_id = %s", (LAB_NETWORK, GROUP))
    # The source moved on after the world's point: one more replication, so both sides share the newest.
    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    asyncio.run(w.drain())
    job = db.one("select status, error, snapshot_name from replication_jobs order by created_at desc limit 1")
    assert job["status"] == "completed", job["error"]
    base = str(job["snapshot_name"])
    where = mountpoint(f"bench-replica-{w.source.rsplit('/', 1)[1]}")
    target.run(["zfs", "set", "atime=off", w.replica])
    target.run(["zfs", "set", f"mountpoint={where}", w.replica])
    readonly = target.run(["zfs", "get", "-H", "-o", "value", "readonly", w.replica]).stdout.decode().strip()
    timings["replicate"] = time.monotonic() - start

    mark = time.monotonic()
    old = w.dr_sim
    name = f"bench-mig-dr-{base[-8:].lower()}"
    dr = w.new_vcenter(DR, name, {PLACEHOLDER_DS: w.workdir / f"{name}-placeholder"}, DR_ARGS)
    old.stop()
    w.dr_sim = dr
    add_port_group(dr, LAB_NETWORK)
    if target.run(["zfs", "get", "-H", "-o", "value", "mounted", w.replica]).stdout.strip() != b"yes":
        target.run(["zfs", "mount", w.replica])  # setting the mountpoint may have mounted it already
    si = dr.si()
    for host in [h for h, _ in collect(si, vim.HostSystem, ["name"])]:
        spec = vim.host.NasVolume.Specification(remoteHost=target.ssh_host, remotePath=where, localPath=DR_DS,
                                                accessMode="readWrite", type="NFS")
        host.configManager.datastoreSystem.CreateNasDatastore(spec=spec)
    db.sql("update protected_vms set needs_dr_shell = true where protection_group_id = %s", (GROUP,))
    asyncio.run(w.drain(timeout=1800))
    rows = db.sql("select p.id, p.dr_shell_vm_id, p.last_error, p.boot_priority, v.name, v.moref from protected_vms p"
                  " join vcenter_vms v on v.id = p.vm_id where p.protection_group_id = %s", (GROUP,))
    bad = [r for r in rows if not r["dr_shell_vm_id"]]
    assert not bad, f"DR shells not made: {bad[:3]}"
    target.run(["zfs", "rollback", f"{w.replica}@{base}"])
    target.run(["zfs", "umount", w.replica])
    timings["dr_shells"] = time.monotonic() - mark

    mark = time.monotonic()
    sites = [Site(r["name"], int(r["boot_priority"]), str(r["id"]), r["moref"], r["dr_shell_vm_id"]) for r in rows]
    src = w.source_sim.si()

    def running(site: Site) -> None:
        vm = vim.VirtualMachine(site.source_moref, src._stub)
        mark_tools_running(vm)  # survives power cycles (FACTS.md)
        WaitForTask(vm.PowerOnVM_Task())

    parallel(running, sites, 8)
    timings["source_on"] = time.monotonic() - mark
    ssh_dir = Path(tempfile.mkdtemp(prefix="zfb-", dir="/tmp"))  # a control socket's path has ~100 bytes at most
    (ssh_dir / "known_hosts").write_text(target.host_key + "\n")
    delta = os.urandom(delta_mib * MiB)
    m = MigrationWorld(w, dr, sites, base, where, readonly, delta, ssh_dir, timings)
    reset(m)
    del delay_ms
    return m


def write_delta(m: MigrationWorld) -> float:
    """Overwrite the start of every VM's flat disk with its share of the delta; returns when it was durable."""
    share = len(m.delta) // len(m.sites)
    for i, site in enumerate(sorted(m.sites, key=lambda s: s.name)):
        end = len(m.delta) if i == len(m.sites) - 1 else (i + 1) * share
        path = m.w.source_dir / site.name / f"{site.name}-flat.vmdk"
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, m.delta[i * share:end], 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.time()


def reset(m: MigrationWorld) -> None:
    """The world as built (module docstring), at no delay."""
    w, target = m.w, m.w.target_host
    m.set_delay(0)
    # zfs-fuse: a rollback right after an unmount fails with an I/O error; rolled back first, then unmounted.
    w.source_host.run(["zfs", "rollback", "-r", f"{w.source}@{m.base}"])
    target.run(["zfs", "rollback", "-r", f"{m.replica}@{m.base}"])
    target.run(["zfs", "umount", m.replica], check=False)
    target.run(["zfs", "set", "sharenfs=off", m.replica])
    target.run(["zfs", "set", f"readonly={m.readonly}", m.replica])
    dr, src = m.dr_sim.si(), w.source_sim.si()
    nics = vim.vm.device.VirtualDeviceSpec.Operation.remove
    states = {vm._moId: p for vm, p in collect(dr, vim.VirtualMachine, ["runtime.powerState", "config.hardware.device"])}

    def shell(site: Site) -> None:
        vm = vim.VirtualMachine(site.shell_moref, dr._stub)
        props = states[site.shell_moref]
        if props.get("runtime.powerState") != "poweredOff":
            WaitForTask(vm.PowerOffVM_Task())
        cards = [d for d in props.get("config.hardware.device") or () if isinstance(d, _dev.VirtualEthernetCard)]
        WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(
            deviceChange=[_dev.VirtualDeviceSpec(operation=nics, device=d) for d in cards],
            extraConfig=[vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsNotRunning"),
                         vim.option.OptionValue(key="SET.summary.quickStats.guestHeartbeatStatus", value="gray")])))

    source_states = {vm._moId: p.get("runtime.powerState") for vm, p in collect(src, vim.VirtualMachine,
                                                                                  ["runtime.powerState"])}

    def source(site: Site) -> None:
        if source_states.get(site.source_moref) != "poweredOn":
            WaitForTask(vim.VirtualMachine(site.source_moref, src._stub).PowerOnVM_Task())

    parallel(shell, m.sites, 8)
    parallel(source, m.sites, 8)
    columns = {r["column_name"] for r in w.db.sql("select column_name from information_schema.columns"
                                                  " where table_name = 'protection_groups'")}
    if "direction" in columns:  # the issue-14 schema
        w.db.sql("update protection_groups set state = 'protected', direction = 'forward', state_changed_at = now()"
                 " where id = %s", (GROUP,))


def check_migrated(m: MigrationWorld) -> list[str]:
    """What is wrong after a round, as the peers tell it: every DR VM on, every source VM off, the final GUID equal."""
    problems = []
    dr = {vm._moId: p for vm, p in collect(m.dr_sim.si(), vim.VirtualMachine, ["runtime.powerState"])}
    src = {vm._moId: p for vm, p in collect(m.w.source_sim.si(), vim.VirtualMachine, ["runtime.powerState"])}
    off = [s.name for s in m.sites if dr[s.shell_moref].get("runtime.powerState") != "poweredOn"]
    on = [s.name for s in m.sites if src[s.source_moref].get("runtime.powerState") != "poweredOff"]
    if off:
        problems.append(f"{len(off)} DR VMs not on ({off[:3]})")
    if on:
        problems.append(f"{len(on)} source VMs not off ({on[:3]})")
    final = snapshots(m.w.source_host.run, m.w.source)[-1]
    guid = ["zfs", "get", "-H", "-p", "-o", "value", "guid"]
    a = m.w.source_host.run([*guid, f"{m.w.source}@{final}"]).stdout.strip()
    b = m.w.target_host.run([*guid, f"{m.replica}@{final}"], check=False).stdout.strip()
    if a != b:
        problems.append(f"final snapshot {final}: GUID {a!r} on the source, {b!r} on the replica")
    return problems


def final_stream_bytes(m: MigrationWorld) -> int:
    """Bytes of the incremental from the round's first replication to its final one (a check, untimed)."""
    first, last = (f"{m.w.source}@{s}" for s in snapshots(m.w.source_host.run, m.w.source)[-2:])
    done = subprocess.run(f"zfs send -i {shlex.quote(first)} {shlex.quote(last)} | wc -c", shell=True,
                          capture_output=True, check=True, text=True)
    return int(done.stdout.strip())


# ---- Zerfaux -------------------------------------------------------------------------------------


@contextmanager
def delta_after_replicate(m: MigrationWorld) -> Iterator[dict[str, float]]:
    """A thread that writes the delta once the run's ``replicate`` step is done; yields its times."""
    times: dict[str, float] = {}
    stop = threading.Event()

    def loop() -> None:
        with psycopg.connect(m.w.db.url, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("select s.status from recovery_run_steps s join recovery_runs r on r.id = s.run_id"
                                   " where r.protection_group_id = %s and r.kind = 'planned_migration'"
                                   " and r.status = 'running' and s.name = 'replicate'", (GROUP,)).fetchone()
                if row and row[0] == "done":
                    times["started"] = time.time()
                    times["durable"] = write_delta(m)
                    return
                stop.wait(0.01)

    thread = threading.Thread(target=loop, name="delta-writer", daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(60)


def steps_of(m: MigrationWorld, run_id: str) -> list[dict[str, Any]]:
    return m.w.db.sql("select s.seq, s.name, s.status, s.started_at, s.finished_at, s.error, p.boot_priority"
                      " from recovery_run_steps s left join protected_vms p on p.id = s.protected_vm_id"
                      " where s.run_id = %s order by s.seq", (run_id,))


def zerfaux_phases(m: MigrationWorld, run_id: str) -> dict[str, float]:
    """Seconds of each phase from the run's steps: a step name's first start to its last finish (per
    priority for the VM steps that go by priority); ``book`` is the run's time outside every step."""
    started = m.w.db.value("select started_at from recovery_runs where id = %s", (run_id,))
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
    db = m.w.db
    m.set_delay(delay_ms)
    with m.harness() as tools, delta_after_replicate(m) as delta:
        start = time.monotonic()
        run_id = str(db.value("insert into recovery_runs (protection_group_id, kind) values (%s, 'planned_migration')"
                              " returning id", (GROUP,)))
        asyncio.run(m.w.drain(timeout=1800))
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
    return float(run["rto_seconds"]), wall, zerfaux_phases(m, run_id), problems


# ---- the plain script ----------------------------------------------------------------------------


class Shell:
    """ssh to the storage hosts as a careful script would: one master connection per host, reused."""

    def __init__(self, m: MigrationWorld) -> None:
        self.m = m
        self.key = Path(m.w.secrets) / "dr-key"

    def argv(self, host: Any, command: str) -> list[str]:
        d = self.m.ssh_dir
        return ["ssh", "-i", str(self.key), "-p", str(host.ssh_port), "-o", f"UserKnownHostsFile={d / 'known_hosts'}",
                "-o", "BatchMode=yes", "-o", "Ciphers=aes128-gcm@openssh.com", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={d}/cm-%C", "-o", "ControlPersist=60", f"{host.ssh_user}@{host.ssh_host}", command]

    def src(self, command: str) -> str:
        return self._run(self.argv(self.m.w.source_host, command))

    def tgt(self, command: str) -> str:
        return self._run(self.argv(self.m.w.target_host, command))

    @staticmethod
    def _run(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, check=False, timeout=600, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[-1]!r} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def send(self, base: str, snap: str) -> None:
        """``zfs send -i | ssh | zfs receive -u``: the source's send over its ssh into the target's receive."""
        m = self.m
        send = shlex.join(self.argv(m.w.source_host, shlex.join(["zfs", "send", "-i", f"{m.w.source}@{base}",
                                                                 f"{m.w.source}@{snap}"])))
        recv = shlex.join(self.argv(m.w.target_host, shlex.join(["zfs", "receive", "-u", m.replica])))
        done = subprocess.run(f"set -o pipefail; {send} | {recv}", shell=True, executable="/bin/bash",
                              capture_output=True, timeout=600, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"send {base} -> {snap} exited {done.returncode}: {done.stderr.strip()}")

    def close(self) -> None:
        for host in (self.m.w.source_host, self.m.w.target_host):
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
    w = m.w
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

        src, dr = connect(w.source_sim), connect(m.dr_sim)
        try:
            # validate: the recovery network and the cluster's hosts at DR, the VMs at both sites, both datasets
            networks = {p.get("name") for _, p in collect(dr, vim.Network, ["name"])}
            assert LAB_NETWORK in networks, networks
            cluster = next(c for c, _ in collect(dr, vim.ClusterComputeResource, ["name"]))
            hosts = list(cluster.host)
            shells = {vm._moId: vm for vm, _ in collect(dr, vim.VirtualMachine, ["name"])}
            sources = {vm._moId: (vm, p) for vm, p in collect(
                src, vim.VirtualMachine, ["name", "runtime.powerState", "guest.toolsRunningStatus"])}
            assert all(s.shell_moref in shells and s.source_moref in sources for s in m.sites)
            base = sh.tgt(f"zfs list -H -t snapshot -o name -s createtxg -d 1 {shlex.quote(m.replica)} | tail -1")
            base = base.strip().split("@", 1)[1]
            phase("validate")
            # replicate, with the VMs still running
            first = f"bench_{tag}_1"
            sh.src(f"zfs snapshot {shlex.quote(f'{w.source}@{first}')}")
            sh.send(base, first)
            phase("replicate")
            thread = threading.Thread(target=lambda: writer.update(durable=write_delta(m)), name="delta-writer")
            thread.start()
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
            thread.join()
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
                        remoteHost=w.target_host.ssh_host, remotePath=m.replica_mountpoint, localPath=DR_DS,
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
                nic = _dev.VirtualVmxnet3(key=-300, backing=_dev.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=LAB_NETWORK))
                change = _dev.VirtualDeviceSpec(operation=_dev.VirtualDeviceSpec.Operation.add, device=nic)
                WaitForTask(shells[site.shell_moref].ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))

            parallel(networks_on, m.sites, STEP_LIMIT)
            phase("set_networks")

            def up(site: Site) -> None:
                vm = shells[site.shell_moref]
                WaitForTask(vm.PowerOnVM_Task())
                wait_property(dr, vm, "guest.toolsRunningStatus", "guestToolsRunning")

            for priority in sorted(by_priority):
                parallel(up, by_priority[priority])
                phase(f"boot p{priority}")
            seconds = time.monotonic() - start
        finally:
            Disconnect(src)
            Disconnect(dr)
            sh.close()
            m.set_delay(0)
    problems = check_migrated(m)
    if writer.get("durable") is None:
        problems.append("the delta writer did not finish")
    return seconds, phases, problems


# ---- the benchmark -------------------------------------------------------------------------------


def run(w: RecoveryWorld, args: Any) -> None:
    print(f"turning it into a site pair: DR shells, source VMs running, {args.delta_mib} MiB final delta ...",
          flush=True)
    m = build(w, args.delay_ms, args.delta_mib)
    try:
        measure(m, args)
    finally:
        shutil.rmtree(m.ssh_dir, ignore_errors=True)


def measure(m: MigrationWorld, args: Any) -> None:
    print("  built: " + ", ".join(f"{k} {v:.1f} s" for k, v in m.timings.items()), flush=True)
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
    if not zerfaux or not script:
        raise SystemExit(f"no ratio: zerfaux {zerfaux}, script {script}")
    z, s = statistics.median(zerfaux), statistics.median(script)
    mib = {k: statistics.median(v) / MiB for k, v in streams.items() if v}
    print(f"planned migration, {len(m.sites)} VMs in {len(m.by_priority())} priorities, vcsim {args.delay_ms} ms per"
          f" call, {args.delta_mib} MiB final delta (final streams: zerfaux {mib.get('zerfaux', 0):.1f} MiB, script"
          f" {mib.get('script', 0):.1f} MiB), median of {len(zerfaux)}/{len(script)}: zerfaux RTO {z:.2f} s"
          f" (insert to completed {statistics.median(walls):.2f} s), plain script {s:.2f} s")
    keys = list(dict.fromkeys([*z_phases[0], *s_phases[0]]))
    for key in keys:
        zp = statistics.median(p.get(key, float("nan")) for p in z_phases)
        sp = statistics.median(p.get(key, float("nan")) for p in s_phases)
        print(f"  {key:22s} zerfaux {zp:6.2f} s   script {sp:6.2f} s")
    print(f"RATIO {s / z:.2f} planned migration orchestration overhead")
