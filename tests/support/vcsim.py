"""vCenter simulators (govmomi's vcsim, built from tests/vcsim/main.go) for the tests.

Two session-wide simulators play the source and the DR vCenter, both over TLS with a
certificate made for the run and a required username/password. The DR one has a datastore
``zfs-dr-01`` backed by a directory laid out like a ZFS replica (``<vm>/disk.vmdk`` plus
``<vm>/disk-flat.vmdk``); the source one has ``zfs-protect-01`` to storage-vMotion onto.
``vcsim_factory`` starts extra ones a test may stop or slow down. Each simulator also reads its
own state through a separate pyVmomi session (``Simulator.vm``...), the oracle the tests compare
zerfaux's results against. Every simulator is stopped at the end, whatever happened; started
with ``-stdin``, it also exits by itself if this process dies.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from handlers.secrets import SecretResolver, env_key
from handlers.types import VCenterEndpoint
from tests.support.require import missing

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tests" / "vcsim" / "build.sh"
USERNAME = "zerfaux"
SOURCE_DS = "zfs-protect-01"
DR_DS = "zfs-dr-01"
# The DR datastore no replica backs, for DR shells' configuration files (replication_targets.placeholder_datastore).
PLACEHOLDER_DS = "zerfaux-placeholder"
START_TIMEOUT = 60.0


@dataclass
class Simulator:
    name: str
    host: str
    port: int
    username: str
    password: str
    cert_file: str
    thumbprint_sha1: str
    thumbprint_sha256: str
    vm_count: int
    process: subprocess.Popen[str]
    datastore_dirs: dict[str, Path] = field(default_factory=dict)
    _si: Any = None

    @property
    def secret_name(self) -> str:
        return f"vcsim-{self.name}"

    def endpoint(self, **changes: Any) -> VCenterEndpoint:
        base = VCenterEndpoint(
            id=f"vc-{self.name}-{self.port}",
            name=self.name,
            host=self.host,
            port=self.port,
            username=self.username,
            password_secret=self.secret_name,
            verify_tls=True,
        )
        return replace(base, **changes)

    def environ(self, password: str | None = None) -> dict[str, str]:
        return {env_key(self.secret_name): self.password if password is None else password}

    def secrets(self, password: str | None = None) -> SecretResolver:
        return SecretResolver(self.environ(password))

    def row(self, **changes: Any) -> dict[str, Any]:
        """A ``vcenters`` row for this simulator (``id`` left to the caller's database)."""
        row = {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password_secret": self.secret_name,
            "verify_tls": True,
        }
        row.update(changes)
        return row

    # -- running ----------------------------------------------------------------------------

    def set_delay(self, ms: int) -> None:
        """Milliseconds vcsim waits before answering each SOAP call, from now on."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"delay {ms}\n")
        self.process.stdin.flush()
        _read_line(self.process, 10.0)  # the simulator acknowledges, so the delay is in force

    def stop(self) -> None:
        if self._si is not None:
            from pyVim.connect import Disconnect

            si, self._si = self._si, None
            Disconnect(si)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    # -- the oracle: vcsim's own view, read with plain pyVmomi --------------------------------

    def si(self) -> Any:
        from pyVim.connect import SmartConnect

        if self._si is None:
            context = ssl.create_default_context(cafile=self.cert_file)
            self._si = SmartConnect(
                host=self.host, port=self.port, user=self.username, pwd=self.password, sslContext=context
            )
        return self._si

    def find(self, vim_type: Any) -> list[Any]:
        content = self.si().content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim_type], True)
        try:
            return list(view.view)
        finally:
            view.DestroyView()

    def vm(self, moref: str) -> Any:
        from pyVmomi import vim

        return vim.VirtualMachine(moref, self.si()._stub)

    def vm_datastores(self, moref: str) -> list[str]:
        return sorted(ds.name for ds in self.vm(moref).datastore)

    def vm_disk_files(self, moref: str) -> list[str]:
        from pyVmomi import vim

        devices = self.vm(moref).config.hardware.device
        return [getattr(d.backing, "fileName", "") for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]

    def vms_named(self, name: str) -> list[Any]:
        from pyVmomi import vim

        return [vm for vm in self.find(vim.VirtualMachine) if vm.name == name]

    def count_vms_named(self, name: str) -> int:
        return len(self.vms_named(name))

    def add_replica(
        self, directory: str, disks: int = 1, datastore: str = DR_DS, stem: str = "disk"
    ) -> list[str]:
        """Lay out ``<directory>/disk.vmdk`` (+ ``disk_1.vmdk``...) as a ZFS replica would hold them.

        Each descriptor gets its ``-flat.vmdk`` extent. Returns their datastore paths,
        ``[zfs-dr-01] <directory>/disk.vmdk`` first.
        """
        root = self.datastore_dirs[datastore] / directory
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        base = stem
        for i in range(disks):
            stem = base if i == 0 else f"{base}_{i}"
            (root / f"{stem}.vmdk").write_text(_descriptor(stem))
            (root / f"{stem}-flat.vmdk").write_bytes(b"\0" * 4096)
            paths.append(f"[{datastore}] {directory}/{stem}.vmdk")
        return paths


def mark_tools_running(sim: Simulator, vm_name_or_moref: str) -> str:
    """Play VMware Tools for one VM (vcsim 0.24 simulates none); returns its moref.

    ``ReconfigVM_Task`` with extraConfig ``SET.<property path>`` writes the property itself in
    vcsim, visible to ``WaitForUpdatesEx`` like a real change: Tools running and a green
    heartbeat, as a booted guest with Tools would show them.
    """
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    if vm_name_or_moref.startswith("vm-"):
        vm = sim.vm(vm_name_or_moref)
    else:
        named = sim.vms_named(vm_name_or_moref)
        if len(named) != 1:
            raise LookupError(f"{len(named)} VMs named {vm_name_or_moref!r} at vcsim {sim.name}")
        vm = named[0]
    spec = vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsRunning"),
        vim.option.OptionValue(key="SET.summary.quickStats.guestHeartbeatStatus", value="green"),
    ])
    WaitForTask(vm.ReconfigVM_Task(spec=spec))
    return str(vm._moId)


def _descriptor(stem: str) -> str:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n"
        f"RW 8 VMFS \"{stem}-flat.vmdk\"\n"
    )


def _read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if line:
                return line
        if process.poll() is not None:
            raise RuntimeError(f"vcsim exited with status {process.returncode}")
    raise RuntimeError(f"vcsim printed nothing within {timeout:.0f} s")


def build_vcsim() -> str:
    """Path of the simulator binary, built (or taken from the cache) by tests/vcsim/build.sh."""
    try:
        done = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing("vcsim", f"{BUILD} could not run: {exc}")
    if done.returncode != 0:
        missing("vcsim", f"{BUILD} failed: {done.stderr.strip()[-800:]}")
    return done.stdout.strip().splitlines()[-1]


def start_simulator(
    binary: str,
    name: str,
    workdir: Path,
    *,
    datastores: dict[str, Path] | None = None,
    delay_ms: int = 0,
    args: tuple[str, ...] = ("-cluster", "2", "-host", "2", "-vm", "3", "-standalone-host", "1"),
) -> Simulator:
    password = secrets.token_urlsafe(12)
    datastores = datastores or {}
    argv = [binary, "-username", USERNAME, "-password", password, "-stdin", "-delay", str(delay_ms), *args]
    for ds_name, directory in datastores.items():
        directory.mkdir(parents=True, exist_ok=True)
        argv += ["-local-ds", f"{ds_name}={directory}"]
    log = open(workdir / f"vcsim-{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=workdir
    )
    log.close()
    try:
        info = json.loads(_read_line(process, START_TIMEOUT))
    except Exception:
        process.kill()
        process.wait()
        raise
    return Simulator(
        name=name,
        host=info["host"],
        port=info["port"],
        username=USERNAME,
        password=password,
        cert_file=info["cert_file"],
        thumbprint_sha1=info["thumbprint_sha1"],
        thumbprint_sha256=info["thumbprint_sha256"],
        vm_count=info["vms"],
        process=process,
        datastore_dirs=dict(datastores),
    )


@pytest.fixture(scope="session")
def vcsim_binary() -> str:
    return build_vcsim()


@pytest.fixture(scope="session")
def vcsim_source(vcsim_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    workdir = tmp_path_factory.mktemp("vcsim-source")
    sim = start_simulator(vcsim_binary, "source", workdir, datastores={SOURCE_DS: workdir / "protect"})
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture(scope="session")
def vcsim_dr(vcsim_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    workdir = tmp_path_factory.mktemp("vcsim-dr")
    sim = start_simulator(vcsim_binary, "dr", workdir, datastores={DR_DS: workdir / "replica", PLACEHOLDER_DS: workdir / "placeholder"})
    sim.add_replica("dir")  # the layout the issue names: dir/disk.vmdk + dir/disk-flat.vmdk
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def vcsim_factory(vcsim_binary: str, tmp_path: Path) -> Iterator[Callable[..., Simulator]]:
    """Start extra simulators for one test (to stop, slow down...); all stopped after it."""
    started: list[Simulator] = []

    def start(name: str = "extra", **kwargs: Any) -> Simulator:
        sim = start_simulator(vcsim_binary, name, tmp_path, **kwargs)
        started.append(sim)
        return sim

    try:
        yield start
    finally:
        for sim in started:
            sim.stop()


def vcsim_available() -> bool:
    """Cheap check for skip decisions outside fixtures: is the Go toolchain with govmomi here?"""
    gopath = os.environ.get("ZERFAUX_GOPATH", "/usr/share/gocode")
    return (Path(gopath) / "src/github.com/vmware/govmomi/simulator").is_dir()
