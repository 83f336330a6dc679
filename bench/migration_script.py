"""The plain script of the planned migration benchmark (bench/migration.py).

``script_round``: no Zerfaux code, the runner's steps in the runner's order with
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

import http.client
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from bench.migration_world import (
    MigrationWorld, Site, check_migrated, collect, connect, parallel, retried, write_delta,
)
from tests.support.vcsim import DR_DS

STEP_LIMIT = 16  # attach_disks and set_networks at once: the runner's VM_LIMIT (handlers/recovery/failover_runner.py)
_dev = vim.vm.device


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
                spec = vim.vm.ConfigSpec(deviceChange=[change])
                try:
                    WaitForTask(shells[site.shell_moref].ReconfigVM_Task(spec=spec))
                except (http.client.RemoteDisconnected, ConnectionError):
                    # vcsim 0.24 now and then drops a connection under concurrent reconfigurations;
                    # the edit is the same again (Zerfaux's engine retries a transient failure too).
                    WaitForTask(shells[site.shell_moref].ReconfigVM_Task(spec=spec))

            parallel(networks_on, m.sites, STEP_LIMIT)
            phase("set_networks")

            def up(site: Site) -> None:
                vm = shells[site.shell_moref]
                try:
                    WaitForTask(vm.PowerOnVM_Task())
                except (http.client.RemoteDisconnected, ConnectionError):
                    # vcsim 0.24 drops a connection now and then under concurrent power-ons; Zerfaux
                    # retries such a (transient) failure, so the script does too, once.
                    time.sleep(0.5)
                    if vm.runtime.powerState != "poweredOn":
                        WaitForTask(vm.PowerOnVM_Task())
                retried(lambda: wait_property(dr, vm, "guest.toolsRunningStatus", "guestToolsRunning"))

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
