"""Real OpenZFS (2.1, Debian bookworm) as a test peer, in a QEMU guest under software emulation.

zfs-fuse cannot resume a receive, hold a snapshot or estimate a send, so the suite boots a guest
built by tests/openzfs/build-guest.sh (cached outside the clone; see docs/openzfs-guest.md) once per
session: a copy-on-write overlay over the cached root image, two blank virtio disks for a source and
a target pool, sshd forwarded to a random loopback port. Commands reach it through ssh with the
image's key, multiplexed over one connection (a new handshake costs seconds under emulation).

`python -m tests.support.openzfs build|smoke` builds the guest, or boots it once and reports timings.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.require import missing
from tests.support.zfshost import ZFSHost

log = logging.getLogger(__name__)

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "openzfs" / "build-guest.sh"
BUILD_TIMEOUT = 1800.0
SSH_TIMEOUT = 180.0
SHUTDOWN_TIMEOUT = 30.0
POOL_DISK_BYTES = 2 << 30
FEATURES = frozenset({"resume", "hold", "estimate"})


class GuestError(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class RemoteCommandError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        stderr = (self.stderr or b"").decode(errors="replace").strip()
        return f"{super().__str__()}; stderr: {stderr[-2000:]}"


@dataclass(frozen=True)
class OpenZFSHost(ZFSHost):
    ssh_options: tuple[str, ...] = ()

    def run(
        self, argv: Sequence[str], input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return ssh_run(self.ssh_options, self.ssh_port, argv, input=input, check=check)


def ssh_run(
    options: Sequence[str],
    port: int,
    argv: Sequence[str],
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 900.0,
) -> subprocess.CompletedProcess[bytes]:
    cmd = ["ssh", *options, "-p", str(port), "root@127.0.0.1", shlex.join(argv)]
    done = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RemoteCommandError(done.returncode, list(argv), done.stdout, done.stderr)
    return done


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    kernel_cmdline: str

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        env: dict[str, str] = {}
        for line in (directory / "guest.env").read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value.strip('"')
        return cls(directory, env["KERNEL_CMDLINE"])

    def path(self, name: str) -> Path:
        return self.directory / name


def build_guest() -> GuestImage:
    """Build the guest, or find it in the cache (ZERFAUX_OPENZFS_GUEST names a built one)."""
    prebuilt = os.environ.get("ZERFAUX_OPENZFS_GUEST")
    if prebuilt:
        return GuestImage.load(Path(prebuilt))
    # A session of its own, so that a timeout stops debootstrap and apt too (the script cleans up).
    build = subprocess.Popen(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = build.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        os.killpg(build.pid, signal.SIGTERM)
        try:
            build.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(build.pid, signal.SIGKILL)
            build.communicate()
        raise GuestError("build", f"{BUILD_SCRIPT.name} ran past {BUILD_TIMEOUT:.0f}s") from exc
    if build.returncode != 0:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()] or ["no output"]
        failed = [line for line in lines if "FAILED at step" in line]
        detail = lines[-1] if not failed or lines[-1] != failed[-1] else ""
        raise GuestError("build", " / ".join(filter(None, [*failed[-1:], detail])))
    return GuestImage.load(Path(stdout.strip().splitlines()[-1]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Guest:
    """One booted guest with a source and a target pool; start() once, stop() always."""

    def __init__(self, image: GuestImage, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.console = workdir / "console.log"
        self.run_id = secrets.token_hex(3)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0
        self.options: tuple[str, ...] = ()
        self.answered = False

    def start(self) -> None:
        for tool in ("qemu-system-x86_64", "qemu-img", "ssh"):
            if shutil.which(tool) is None:
                raise GuestError("boot", f"{tool} is not installed (scripts/bootstrap.sh test)")
        started = time.monotonic()
        self._make_disks()
        self._boot()
        self._wait_for_ssh(started)
        self.boot_seconds = time.monotonic() - started
        self._make_pools()
        log.info("OpenZFS guest up on port %d in %.0fs (pools %.0fs more)",
                 self.port, self.boot_seconds, time.monotonic() - started - self.boot_seconds)

    def host(self, role: str) -> OpenZFSHost:
        return OpenZFSHost(
            name="openzfs",
            ssh_host="127.0.0.1",
            ssh_port=self.port,
            ssh_user="root",
            private_key=self.image.path("guest_key").read_text(),
            host_key=self._known_hosts_line(),
            pool=self.pool(role),
            local=False,
            features=FEATURES,
            ssh_options=self.options,
        )

    def pool(self, role: str) -> str:
        return f"z{role}_{self.run_id}"

    def run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return ssh_run(self.options, self.port, argv, check=check)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.answered:  # a guest that never answered is killed at once
            try:
                ssh_run(self.options, self.port, ["systemctl", "poweroff"], check=False, timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.proc.wait(SHUTDOWN_TIMEOUT if self.answered else 0)
        except subprocess.TimeoutExpired:
            if self.answered:
                log.warning("OpenZFS guest did not power off in %.0fs; killing qemu", SHUTDOWN_TIMEOUT)
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ssh", *self.options, "-O", "exit", "-p", str(self.port), "root@127.0.0.1"],
                       capture_output=True, timeout=10)

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def _make_disks(self) -> None:
        overlay = self.workdir / "root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                        "-b", str(self.image.path("root.img")), str(overlay)],
                       check=True, capture_output=True)
        for role in ("src", "dst"):
            with open(self.workdir / f"{role}.img", "wb") as disk:
                disk.truncate(POOL_DISK_BYTES)
        key = self.workdir / "guest_key"
        shutil.copyfile(self.image.path("guest_key"), key)
        key.chmod(0o600)

    def _boot(self) -> None:
        for _ in range(3):  # the port picked may be taken before qemu binds it
            self.port = free_port()
            with open(self.workdir / "qemu.log", "wb") as qemu_log:
                self.proc = subprocess.Popen(self._qemu_argv(), stdin=subprocess.DEVNULL,
                                             stdout=qemu_log, stderr=subprocess.STDOUT)
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                break
            if "forwarding" not in (self.workdir / "qemu.log").read_text(errors="replace"):
                break
        if self.proc is None or self.proc.poll() is not None:
            output = (self.workdir / "qemu.log").read_text(errors="replace").strip()
            raise GuestError("boot", f"qemu exited: {output[-1000:]}")
        (self.workdir / "known_hosts").write_text(self._known_hosts_line() + "\n")
        self.options = (
            "-F", "/dev/null", "-i", str(self.workdir / "guest_key"), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.workdir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=auto", "-o", "ControlPath=/tmp/zerfaux-ssh-%C",
            "-o", "ControlPersist=300", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
        )

    def _qemu_argv(self) -> list[str]:
        argv = [
            "qemu-system-x86_64", "-nodefaults", "-accel", "tcg", "-m", "2048", "-smp", "2",
            "-display", "none", "-no-reboot", "-serial", f"file:{self.console}",
            "-kernel", str(self.image.path("vmlinuz")), "-initrd", str(self.image.path("initrd.img")),
            "-append", self.image.kernel_cmdline,
            "-drive", f"file={self.workdir / 'root.qcow2'},if=virtio,format=qcow2,cache=unsafe",
        ]
        for role in ("src", "dst"):  # /dev/vdb, /dev/vdc in the guest
            argv += ["-drive", f"file={self.workdir / f'{role}.img'},if=virtio,format=raw,cache=unsafe"]
        argv += ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                 "-device", "virtio-net-pci,netdev=net0"]
        return argv

    def _wait_for_ssh(self, started: float) -> None:
        deadline = started + SSH_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise GuestError("boot", f"qemu exited with {self.proc.returncode}; console:\n"
                                 + self.console_tail())
            try:
                done = ssh_run(self.options, self.port, ["true"], check=False, timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0:
                self.answered = True
                return
            last = done.stderr.decode(errors="replace").strip()
            time.sleep(1)
        raise GuestError("ssh", f"no answer on port {self.port} in {SSH_TIMEOUT:.0f}s "
                         f"(last: {last}); console:\n{self.console_tail()}")

    def _make_pools(self) -> None:
        script = (f"modprobe zfs && zpool create -f {self.pool('src')} /dev/vdb"
                  f" && zpool create -f {self.pool('dst')} /dev/vdc")
        done = self.run(["sh", "-c", script], check=False)
        if done.returncode != 0:
            raise GuestError("pools", done.stderr.decode(errors="replace").strip())

    def _known_hosts_line(self) -> str:
        key_type, key = self.image.path("host_key.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {key_type} {key}"


@pytest.fixture(scope="session")
def openzfs_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    try:
        image = build_guest()
    except GuestError as exc:
        missing("OpenZFS guest", str(exc))
    guest = Guest(image, tmp_path_factory.mktemp("openzfs"))
    try:
        guest.start()
    except (GuestError, OSError, subprocess.SubprocessError) as exc:
        guest.stop()
        missing("OpenZFS guest", str(exc) if isinstance(exc, GuestError) else f"boot: {exc}")
    try:
        yield guest
    finally:
        guest.stop()


@pytest.fixture
def openzfs_source(openzfs_guest: Guest) -> OpenZFSHost:
    return openzfs_guest.host("src")


@pytest.fixture
def openzfs_target(openzfs_guest: Guest) -> OpenZFSHost:
    return openzfs_guest.host("dst")


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["build"]:
        print(build_guest().directory)
        return 0
    if argv[:1] == ["smoke"]:
        import tempfile

        guest = Guest(build_guest(), Path(tempfile.mkdtemp(prefix="zerfaux-openzfs-")))
        try:
            guest.start()
            print(guest.run(["zfs", "version"]).stdout.decode().strip())
            print(f"boot (ssh answering) {guest.boot_seconds:.1f}s")
        finally:
            guest.stop()
        return 0
    print("usage: python -m tests.support.openzfs build|smoke", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
