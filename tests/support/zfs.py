"""zfs-fuse and sshd for the replication tests: pools on sparse files, an sshd on a loopback port.

Everything is made for the run and removed after it: pool names carry a random suffix, keys are
generated into a temporary directory, sshd listens on 127.0.0.1 only. zfs-fuse is started only
if it is not running, and stopped at the end only if we started it and no pool is left in it.

Fixtures hand out ``ZFSHost`` objects (``zfs_target``, ``zfs_source``) so the same tests can be
parametrized over other hosts (the OpenZFS guest of tests/support/openzfs.py) later.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from handlers.secrets import SecretResolver
from tests.support.require import missing
from tests.support.zfshost import ZFSHost

POOL_BYTES = 2048 * 1024 * 1024  # sparse: only what is written takes space


class FuseHost(ZFSHost):
    """A zfs-fuse pool on this machine; reachable over the run's sshd as well."""

    def run(self, argv: Sequence[str], input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(list(argv), input=input, capture_output=True, check=False, timeout=600)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
        return done


@dataclass
class Sshd:
    port: int
    host_key: str  # known_hosts line
    private_key: str
    public_key: str
    process: subprocess.Popen[bytes]
    directory: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _zfs_works() -> bool:
    try:
        return subprocess.run(["zpool", "list"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def zfs_fuse_running(workdir: str) -> Iterator[None]:
    """Start zfs-fuse unless it already runs; stop it afterwards only if we started it and it is empty."""
    for tool in ("zfs-fuse", "zfs", "zpool"):
        if shutil.which(tool) is None:
            missing("zfs-fuse", f"{tool} is not on PATH (apt-get install zfs-fuse)")
    if not os.path.exists("/dev/fuse"):
        missing("zfs-fuse", "/dev/fuse does not exist")
    started: int | None = None
    if not _zfs_works():
        pidfile = os.path.join(workdir, "zfs-fuse.pid")
        done = subprocess.run(["zfs-fuse", "--pidfile", pidfile], capture_output=True, timeout=30)
        if done.returncode != 0:
            missing("zfs-fuse", f"zfs-fuse did not start: {done.stderr.decode(errors='replace')}")
        for _ in range(100):
            if _zfs_works():
                break
            time.sleep(0.1)
        else:
            missing("zfs-fuse", "zfs-fuse started but zpool does not answer")
        with open(pidfile) as fh:
            started = int(fh.read().strip())
    try:
        yield
    finally:
        if started is not None:
            pools = subprocess.run(["zpool", "list", "-H", "-o", "name"], capture_output=True, timeout=60)
            if not pools.stdout.strip():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started, signal.SIGTERM)
                # Wait for it to go: a zfs-fuse started while this one still exits fails to start.
                for _ in range(100):
                    try:
                        os.kill(started, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)


@contextlib.contextmanager
def pool(name: str, workdir: str, size: int = POOL_BYTES) -> Iterator[str]:
    path = os.path.join(workdir, f"{name}.img")
    with open(path, "wb") as fh:
        fh.truncate(size)
    done = subprocess.run(["zpool", "create", "-m", "none", name, path], capture_output=True, timeout=120)
    if done.returncode != 0:
        os.unlink(path)
        missing("zfs-fuse", f"zpool create failed: {done.stderr.decode(errors='replace')}")
    try:
        yield name
    finally:
        for _ in range(5):  # zfs-fuse sometimes reports a just-unmounted dataset busy for a moment
            if subprocess.run(["zpool", "destroy", "-f", name], capture_output=True, timeout=300).returncode == 0:
                break
            time.sleep(1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _keygen(path: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zerfaux-test", "-f", path],
                   check=True, capture_output=True)


@contextlib.contextmanager
def sshd_running(workdir: str) -> Iterator[Sshd]:
    if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
        missing("sshd", "openssh-server is not installed")
    if os.geteuid() != 0:
        missing("sshd", "zfs-fuse and root login need root")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    d = tempfile.mkdtemp(prefix="sshd-", dir=workdir)
    _keygen(os.path.join(d, "host_ed25519"))
    _keygen(os.path.join(d, "user_ed25519"))
    shutil.copy(os.path.join(d, "user_ed25519.pub"), os.path.join(d, "authorized_keys"))
    port = _free_port()
    config = os.path.join(d, "sshd_config")
    with open(config, "w") as fh:
        fh.write(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxStartups 200:30:400\nMaxSessions 100\nLogLevel ERROR\nAcceptEnv none\n"
            # Debian's bash sources ~/.bashrc for commands run by sshd when SHLVL < 2; root's on
            # these machines runs `pyenv init` (~250 ms a command), which a storage host would not.
            "SetEnv SHLVL=1\n"
        )
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    with open(os.path.join(d, "sshd.log"), "wb") as log:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", config], stderr=log)
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                missing("sshd", f"sshd exited: {_read(os.path.join(d, 'sshd.log'))}")
            time.sleep(0.05)
        host_pub = _read(os.path.join(d, "host_ed25519.pub")).split()
        yield Sshd(
            port=port,
            host_key=f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}",
            private_key=_read(os.path.join(d, "user_ed25519")),
            public_key=_read(os.path.join(d, "user_ed25519.pub")),
            process=proc,
            directory=d,
        )
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def _host(sshd: Sshd, pool_name: str) -> FuseHost:
    return FuseHost(
        name="zfs-fuse", ssh_host="127.0.0.1", ssh_port=sshd.port, ssh_user="root",
        private_key=sshd.private_key, host_key=sshd.host_key, pool=pool_name, local=True,
        features=frozenset({"hold"}),  # zfs-fuse 0.7 here: hold yes; resume and estimate no
    )


_MOUNTS: list[str] = []


def mountpoint(tag: str) -> str:
    """A mountpoint for a test dataset, under the run's directory (zfs leaves the directories behind)."""
    base = _MOUNTS[0] if _MOUNTS else tempfile.gettempdir()
    return os.path.join(base, tag)


@pytest.fixture(scope="session")
def zfs_workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="zerfaux-zfs-")
    _MOUNTS[:] = [os.path.join(d, "mnt")]
    yield d
    _MOUNTS.clear()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def zfs_sshd(zfs_workdir: str) -> Iterator[Sshd]:
    with sshd_running(zfs_workdir) as sshd:
        yield sshd


@pytest.fixture(scope="session")
def zfs_pools(zfs_workdir: str) -> Iterator[tuple[str, str]]:
    suffix = secrets.token_hex(3)
    with zfs_fuse_running(zfs_workdir), pool(f"zxsrc{suffix}", zfs_workdir) as src, pool(f"zxdr{suffix}", zfs_workdir) as dst:
        yield src, dst


@pytest.fixture(scope="session")
def zfs_target(zfs_sshd: Sshd, zfs_pools: tuple[str, str]) -> FuseHost:
    """The DR host: reached by the backend over SSH only."""
    return _host(zfs_sshd, zfs_pools[1])


@pytest.fixture(scope="session")
def zfs_source(zfs_sshd: Sshd, zfs_pools: tuple[str, str]) -> FuseHost:
    """The storage host: a local source, or a source over SSH (same sshd, another pool)."""
    return _host(zfs_sshd, zfs_pools[0])


def secret_env(*hosts: ZFSHost) -> SecretResolver:
    """A resolver where secret ``key-<n>`` is the n-th host's private key."""
    env = {f"ZERFAUX_SECRET_KEY_{i}": h.private_key for i, h in enumerate(hosts)}
    return SecretResolver(env)
