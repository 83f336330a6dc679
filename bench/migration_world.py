"""The planned migration benchmark's world (bench/migration.py): built once, put back after every round.

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
"""

from __future__ import annotations

import http.client
import os
import shlex
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyVim.connect import SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.integration.conftest import GROUP
from tests.integration.failover_world import RECOVERY, FailoverWorld
from tests.integration.recovery_world import ToolsHarness
from tests.support.vcsim import Simulator

MiB = 1024 * 1024
_dev = vim.vm.device


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
