"""A WAN on this machine: the DR host's sshd in a network namespace behind a shaped veth pair.

    listener ──► delay relay (host end, 10.213.N.1) ══ veth, tbf 200 Mbit/s ══► sshd (netns, 10.213.N.2:22)
                 20 ms each way                        0.1 % loss (nftables, inside the namespace)

* ``ip netns add`` and a veth pair with a /30 from 10.213.0.0/16, which only these tests use;
* ``tc qdisc … tbf`` on both ends of the pair (the bandwidth);
* an nftables table inside the namespace: ``numgen random mod 1000 < 1 drop`` on input and output
  (the loss), and two empty chains that ``partition()`` fills with a drop-all rule;
* a second sshd started inside the namespace with ``ip netns exec``, with the host and user keys of
  the run's sshd (tests/support/zfs.py), so the same key pair reaches both;
* the round trip comes from tests/support/delay_relay.py in front of that sshd (no ``netem`` here).

``zfs`` run by that sshd reaches the zfs-fuse daemon through its socket in /var/run/zfs, which a
network namespace does not hide. Everything is removed on exit, on failure too: the namespace
(taking its veth end, its nftables table and its sshd's socket with it), the host end, the relay.
Under ZERFAUX_REQUIRE_REAL=1 a WAN that cannot be set up fails the test.
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
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.delay_relay import DelayRelay
from tests.support.require import missing
from tests.support.zfs import Sshd

RATE = "200mbit"
LOSS_PER_MILLE = 1
ONE_WAY_DELAY = 0.020
TABLE = "zerfaux_wan"


@dataclass
class Wan:
    namespace: str
    host_if: str  # the host's end of the veth pair
    host_addr: str
    ns_addr: str  # the namespace's end, where its sshd listens on port 22
    relay: DelayRelay
    sshd_host_key: str  # known_hosts line for the relay's address and port

    @property
    def ssh_host(self) -> str:
        return self.relay.host

    @property
    def ssh_port(self) -> int:
        return self.relay.port

    def nft(self, script: str) -> None:
        _run(["ip", "netns", "exec", self.namespace, "nft", "-f", "-"], script)

    def partition(self) -> None:
        """Drop every packet in and out of the namespace (established connections stall, as on a cut link)."""
        self.nft(f"add rule inet {TABLE} cut_in drop\nadd rule inet {TABLE} cut_out drop\n")

    def heal(self) -> None:
        self.nft(f"flush chain inet {TABLE} cut_in\nflush chain inet {TABLE} cut_out\n")

    def tx_bytes(self) -> int:
        """Bytes the host sent into the link so far (the stream plus SSH, TCP and IP overhead)."""
        with open(f"/sys/class/net/{self.host_if}/statistics/tx_bytes") as fh:
            return int(fh.read())

    def counters(self) -> str:
        """The namespace's nftables rules with their counters (what the loss rule dropped)."""
        return _run(["ip", "netns", "exec", self.namespace, "nft", "list", "table", "inet", TABLE])


def _run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _nft_script(loss_per_mille: int) -> str:
    loss = f"numgen random mod 1000 < {loss_per_mille} counter drop" if loss_per_mille else "counter"
    return f"""table inet {TABLE} {{
    chain cut_in {{ type filter hook input priority -10; policy accept; }}
    chain cut_out {{ type filter hook output priority -10; policy accept; }}
    chain loss_in {{ type filter hook input priority 0; policy accept; iifname != "lo" {loss}; }}
    chain loss_out {{ type filter hook output priority 0; policy accept; oifname != "lo" {loss}; }}
}}
"""


def _tools() -> None:
    if os.geteuid() != 0:
        missing("netns", "network namespaces need root")
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            missing("netns", f"{tool} is not on PATH (apt-get install iproute2 nftables)")


def _start_sshd(namespace: str, addr: str, base: Sshd, workdir: str) -> subprocess.Popen[bytes]:
    d = tempfile.mkdtemp(prefix="sshd-wan-", dir=workdir)
    config = os.path.join(d, "sshd_config")
    with open(os.path.join(base.directory, "sshd_config")) as fh:
        lines = [ln for ln in fh.read().splitlines() if not ln.startswith(("Port ", "ListenAddress ", "PidFile "))]
    with open(config, "w") as fh:
        fh.write(f"Port 22\nListenAddress {addr}\nPidFile {d}/sshd.pid\n" + "\n".join(lines) + "\n")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    log = open(os.path.join(d, "sshd.log"), "wb")  # noqa: SIM115  # lives as long as sshd
    proc = subprocess.Popen(["ip", "netns", "exec", namespace, sshd, "-D", "-e", "-f", config], stderr=log)
    log.close()
    for _ in range(100):
        probe = subprocess.run(["ip", "netns", "exec", namespace, "bash", "-c", f"exec 3<>/dev/tcp/{addr}/22"],
                               capture_output=True, timeout=10)
        if probe.returncode == 0:
            return proc
        if proc.poll() is not None:
            with open(os.path.join(d, "sshd.log")) as fh:
                raise RuntimeError(f"sshd in {namespace} exited: {fh.read()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"sshd in {namespace} did not listen on {addr}:22")


@contextlib.contextmanager
def wan(base: Sshd, workdir: str, rate: str = RATE, loss_per_mille: int = LOSS_PER_MILLE,
        one_way_delay: float = ONE_WAY_DELAY) -> Iterator[Wan]:
    """The namespace, its link and its sshd, for the duration of the block."""
    _tools()
    tag = secrets.token_hex(3)
    namespace, host_if, ns_if = f"zfwan{tag}", f"zwh{tag}", f"zwn{tag}"
    net = int(tag, 16) % 64 * 4  # a /30 inside 10.213.N.0/24
    third = int(tag[:2], 16)
    host_addr, ns_addr = f"10.213.{third}.{net + 1}", f"10.213.{third}.{net + 2}"
    sshd: subprocess.Popen[bytes] | None = None
    relay: DelayRelay | None = None
    try:
        try:
            _run(["ip", "netns", "add", namespace])
            _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", namespace])
            _run(["ip", "addr", "add", f"{host_addr}/30", "dev", host_if])
            _run(["ip", "link", "set", host_if, "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{ns_addr}/30", "dev", ns_if])
            _run(["ip", "-n", namespace, "link", "set", ns_if, "up"])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
            shape = ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
            _run(["tc", "qdisc", "add", "dev", host_if, "root", *shape])
            _run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", ns_if, "root", *shape])
            _run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], _nft_script(loss_per_mille))
            sshd = _start_sshd(namespace, ns_addr, base, workdir)
            relay = DelayRelay(host_addr, (ns_addr, 22), one_way_delay)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            missing("netns", f"the WAN namespace could not be set up: {exc}")
        with open(os.path.join(base.directory, "host_ed25519.pub")) as fh:
            kind, b64 = fh.read().split()[:2]
        yield Wan(namespace, host_if, host_addr, ns_addr, relay, f"[{host_addr}]:{relay.port} {kind} {b64}")
    finally:
        if relay is not None:
            relay.close()
        if sshd is not None:
            # ip netns exec execs sshd: the pid is sshd's; its sessions die with the namespace's link.
            with contextlib.suppress(ProcessLookupError):
                sshd.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sshd.wait(10)
        _kill_namespace_processes(namespace)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30, check=False)


def _kill_namespace_processes(namespace: str) -> None:
    """Whatever still runs in the namespace (an sshd session, a zfs receive) goes with it."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30, check=False)
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def reachable(host: str, port: int, timeout: float = 5.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False
