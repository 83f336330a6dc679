"""A listener cut off from its database stops its own ``zfs send`` before another takes the job (issue 11, §1).

zfs-fuse with the source on the listener's machine; the target's sshd behind a 6 MB/s relay (a WAN
link of about 50 Mbit/s), so a full send of the test's dataset lasts well past the lease. Listener A
reaches Postgres through a TCP relay the test cuts (half-open: nothing answers, nothing errors);
listener B reaches it directly. Every 100 ms the test lists the ``zfs send`` processes: A's own send
must be gone within lease + 3 s of the cut, two sends of the dataset must never run at once, the job
completes once (by B), the replica is identical by GUID and checksum, and no hold is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import GROUP, TARGET
from tests.integration.test_zfs_dispatch import Real, real, same_data  # noqa: F401  (fixture)
from tests.support.engine import eventually
from tests.support.platforms import FUSE_LOCAL, MiB, Platform, guids, held, write
from tests.support.tcp_proxy import tcp_proxy
from tests.support.throttle import throttled
from tests.support.workload import Proc

pytestmark = [pytest.mark.zfs, pytest.mark.parametrize("platform", [FUSE_LOCAL], indirect=True)]

LEASE = 6.0
RATE = 6_000_000  # bytes/s through the target's link


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def owner(pid: int, depth: int = 4) -> tuple[int, ...]:
    """The send's ancestors, nearest first: a wire-compression stage puts a shell between the
    listener and its `zfs send`."""
    chain = []
    for _ in range(depth):
        pid = parent(pid)
        if pid <= 1:
            break
        chain.append(pid)
    return tuple(chain)


class Sampler:
    """``pgrep -af 'zfs send'`` every 100 ms: which sends of ``dataset`` run, and whose child each is."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.samples: list[tuple[float, list[tuple[int, ...]]]] = []  # (monotonic time, ancestors of each send)
        self.seen: list[str] = []  # every distinct `zfs send` line, for the failure message
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.1):
            out = subprocess.run(["pgrep", "-af", "zfs send"], capture_output=True, text=True).stdout
            # zfs-fuse's zfs cuts its own argv at the '@' (seen here: "zfs send pool/ds snap"), OpenZFS's does not.
            lines = [line for line in out.splitlines()
                     if line.split()[1:3] and line.split()[1].rsplit("/", 1)[-1] == "zfs" and line.split()[2] == "send"
                     and any(w == self.dataset or w.startswith(self.dataset + "@") for w in line.split()[3:])]
            self.seen += [f"{line} (parent {parent(int(line.split()[0]))})" for line in lines
                          if not any(seen.startswith(line + " (") for seen in self.seen)]
            sends = [int(line.split()[0]) for line in lines]
            self.samples.append((time.monotonic(), [owner(pid) for pid in sends]))

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)

    def last_seen(self, ppid: int) -> float | None:
        return max((t for t, owners in self.samples if any(ppid in chain for chain in owners)), default=None)


async def test_a_cut_off_listener_stops_its_send_within_lease_and_the_other_completes_once(
        real: Real, platform: Platform, tmp_path: Path) -> None:
    source, target = platform.source, platform.target
    write(source, real.source, "disk-flat.vmdk", 160 * MiB)
    db = urlsplit(real.db.url)
    env = {**real.env, "ZERFAUX_LEASE_SECONDS": str(LEASE)}
    sampler: Sampler | None = None
    b: Proc | None = None
    with tcp_proxy(db.hostname or "127.0.0.1", db.port or 5432) as relay, throttled(target.ssh_port, RATE) as link:
        real.db.sql("update replication_targets set ssh_port = %s where id = %s", (link.port, TARGET))
        a = Proc(relay.url_for(real.db.url), "run", env={**env, "ZERFAUX_WORKER_ID": "cut-off"})
        try:
            a.wait_for_line("listening as")
            sampler = Sampler(real.source)
            job = real.db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
            await eventually(lambda: real.db.value("select bytes_transferred > %s from replication_jobs", (4 * MiB,)),
                             timeout=90)
            b = Proc(real.db.url, "run", env={**env, "ZERFAUX_WORKER_ID": "direct"})
            b.wait_for_line("listening as")
            assert sampler.last_seen(a.pid), (a.pid, sampler.seen, a.output[-3000:])
            cut = time.monotonic()
            relay.cut()
            await eventually(lambda: real.db.value("select status from replication_jobs") in ("completed", "failed"),
                             timeout=240, interval=0.5)
            sampler.stop()
        finally:
            if sampler is not None:
                sampler.stop()
            a.kill()
            if b is not None:
                b.stop()
    assert b is not None
    gone = sampler.last_seen(a.pid)
    assert gone is not None and gone - cut < LEASE + 3, (gone - cut if gone else None, a.output[-3000:])
    assert sampler.last_seen(b.pid), "the direct listener sent the stream again"
    assert max(len(parents) for _, parents in sampler.samples) == 1  # never two sends of the dataset at once
    row = real.db.one("select * from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed", row["error"]
    op = real.db.one("select status, attempts, worker_id from zerfaux.operations where kind = 'replication.run'")
    assert (op["status"], op["worker_id"]) == ("succeeded", "direct"), op
    assert not any("kind=replication.run" in line and "succeeded" in line for line in a.lines)
    same_data(real, source, target, row["snapshot_name"])
    for host, dataset in ((source, real.source), (target, real.target)):
        for snap in guids(host, dataset):
            assert not held(host, f"{dataset}@{snap}"), f"{dataset}@{snap} still held on {host.name}"
    figures = {"lease": LEASE, "send_gone_after_cut_s": round(gone - cut, 2), "attempts": op["attempts"],
               "most_sends_at_once": 1, "samples": len(sampler.samples)}
    with (Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "fencing_zfs.jsonl").open("a") as fh:
        fh.write(json.dumps(figures) + "\n")
