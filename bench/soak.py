"""Soak: a steady stream of every kind of work for minutes, two `zerfaux run` processes.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 20] [--listeners 2] [--sample-seconds 30]

Asks for ``--rate`` operations a second (replication jobs inserted; storage-vMotion and DR-shell
flags flipped on a pool of protected VMs, again and again; vCenter syncs requested round the
pool of vCenters) against a scratch database, with stub backends in a shared stub world
(ZERFAUX_STUB_WORLD, random 0-50 ms durations). Every ``--sample-seconds`` it reads, per
listener process, its RSS and open file descriptors from /proc and its connections from
pg_stat_activity (each listener has its own application_name), and the queue's depth. At the
end it waits for the queue to drain and audits the effects journal.

Verdict (last line): listener RSS grew less than 10 % from the end of warm-up (the first fifth
of the run) to the end; no listener's descriptors or connections still growing in the second
half of the run (a pool opens connections on demand up to its bound, a leak keeps going) nor past
the pool's bound;
the queue stayed bounded (never more than 30 s of arrivals); nothing lost or done twice.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.common import drop_database, scratch_database  # noqa: E402
from listener.migrate import migrate, seed  # noqa: E402
from tests.support.workload import (  # noqa: E402
    ADD_GROUPS, PROTECTION_DS, Asked, Proc, add_vcenters, add_vms, audit, group_params, listener_env, pending,
    prepare, protect, sql,
)

POOL = 100  # protected VMs per flag, flipped again and again
VCENTERS = 20
CONCURRENCY = 8  # the store's pool holds at most this + 4, plus one LISTEN connection


@dataclass
class Sample:
    t: float
    asked: int
    done: int
    queued: int
    running: int
    rss_kb: list[int]
    fds: list[int]
    conns: list[int]


@dataclass
class Load:
    url: str
    asked: Asked = field(default_factory=Asked)
    requests: int = 0

    def __post_init__(self) -> None:
        prepare(self.url, max_concurrent=8)
        self.vcenters = add_vcenters(self.url, VCENTERS, prefix="soak")
        self.moves = protect(self.url, add_vms(self.url, POOL, "nfs-01", "soak-mv"))
        self.shells = protect(self.url, add_vms(self.url, POOL, PROTECTION_DS, "soak-sh"))
        self.conn = psycopg.connect(self.url, autocommit=True)
        self._steps = itertools.cycle(["job", "move", "shell", "sync"])
        self._vc = itertools.cycle(self.vcenters)
        self._mv = itertools.cycle(self.moves)
        self._sh = itertools.cycle(self.shells)

    def one(self) -> None:
        """Ask for one operation, the way a frontend would."""
        step = next(self._steps)
        if step == "job":
            # A group of its own: a group holds one pending or running job at a time.
            group = self.conn.execute(ADD_GROUPS, group_params(1, "soak")).fetchone()
            assert group is not None
            row = self.conn.execute("insert into replication_jobs (protection_group_id) values (%s) returning id",
                                    (group[0],)).fetchone()
            assert row is not None
            self.asked.jobs.add(str(row[0]))
        elif step == "move":
            pvm = next(self._mv)
            self.conn.execute("update protected_vms set needs_storage_vmotion = true where id = %s", (pvm,))
            self.asked.moves.add(pvm)
        elif step == "shell":
            pvm = next(self._sh)
            self.conn.execute("update protected_vms set needs_dr_shell = true where id = %s", (pvm,))
            self.asked.shells.add(pvm)
        else:
            vc = next(self._vc)
            self.conn.execute("update vcenters set sync_requested_at = clock_timestamp() where id = %s", (vc,))
            self.asked.syncs.add(vc)
        self.requests += 1


def proc_figures(pid: int) -> tuple[int, int]:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def sample(url: str, t0: float, load: Load, procs: list[Proc]) -> Sample:
    state = sql(url, "select count(*) filter (where status = 'queued') as queued,"
                     " count(*) filter (where status = 'running') as running,"
                     " count(*) filter (where status = 'succeeded') as done from zerfaux.operations")[0]
    conns = {r["application_name"]: int(r["n"]) for r in sql(
        url, "select application_name, count(*) as n from pg_stat_activity"
             " where datname = current_database() group by application_name")}
    figures = [proc_figures(p.pid) for p in procs]
    return Sample(time.monotonic() - t0, load.requests, int(state["done"]), int(state["queued"]),
                  int(state["running"]), [f[0] for f in figures], [f[1] for f in figures],
                  [conns.get(f"zerfaux-soak-{i}", 0) for i in range(len(procs))])


def row(s: Sample) -> str:
    per = "  ".join(f"{r / 1024:6.1f} {f:4d} {c:3d}" for r, f, c in zip(s.rss_kb, s.fds, s.conns))
    return f"{s.t:7.0f} {s.asked:7d} {s.done:7d} {s.queued:6d} {s.running:4d}   {per}"


def verdict(samples: list[Sample], rate: float, bound: int, audit_problems: list[str], lost: int,
            duplicated: int) -> list[str]:
    end = samples[-1].t
    warm = [s for s in samples if s.t <= end / 5] or samples[:1]
    first = [s for s in samples if s.t <= end / 2]
    second = samples[len(first):] or samples[-1:]
    failures = []
    for i in range(len(samples[0].rss_kb)):
        base = warm[-1].rss_kb[i]
        growth = (max(s.rss_kb[i] for s in samples[-3:]) - base) / base
        if growth >= 0.10:
            failures.append(f"listener {i} RSS grew {growth:.1%} after warm-up")
        # A pool opens connections on demand up to its bound; a leak keeps growing: compare halves.
        if max(s.fds[i] for s in second) > max(s.fds[i] for s in first):
            failures.append(f"listener {i} file descriptors still growing: {[s.fds[i] for s in samples]}")
        if max(s.conns[i] for s in second) > max(s.conns[i] for s in first):
            failures.append(f"listener {i} connections still growing: {[s.conns[i] for s in samples]}")
        if max(s.conns[i] for s in samples) > bound:
            failures.append(f"listener {i} held more than {bound} connections")
    if max(s.queued for s in samples) > rate * 30:
        failures.append(f"queue reached {max(s.queued for s in samples)} queued operations")
    if lost or duplicated:
        failures.append(f"{lost} lost, {duplicated} duplicated: {audit_problems[:5]}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="operations asked per second")
    parser.add_argument("--listeners", type=int, default=2)
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    name, url = scratch_database("zf_soak")
    world = Path(tempfile.mkdtemp(prefix="zf-soak-world-"))
    procs: list[Proc] = []
    try:
        migrate(url)
        seed(url)
        load = Load(url)
        env = listener_env(world, ZERFAUX_STUB_SECONDS="0", ZERFAUX_STUB_SECONDS_JITTER="0.05",
                           ZERFAUX_SWEEP_SECONDS="5", ZERFAUX_LEASE_SECONDS="15",
                           ZERFAUX_CONCURRENCY=str(CONCURRENCY))
        procs = [Proc(url, "run", env={**env, "ZERFAUX_WORKER_ID": f"soak-{i}", "PGAPPNAME": f"zerfaux-soak-{i}"})
                 for i in range(args.listeners)]
        for proc in procs:
            proc.wait_for_line("listening as")
        print(f"soak: {args.minutes:g} min at {args.rate:g} operations/s, {args.listeners} listeners "
              f"(pids {', '.join(str(p.pid) for p in procs)}), database {name}, world {world}")
        head = "  ".join(f"rss{i}MB fd{i} db{i}" for i in range(len(procs)))
        print(f"{'t(s)':>7} {'asked':>7} {'done':>7} {'queued':>6} {'run':>4}   {head}", flush=True)
        samples: list[Sample] = []
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_op, next_sample = t0, t0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample(url, t0, load, procs))
                print(row(samples[-1]), flush=True)
                next_sample += args.sample_seconds
            if now >= end:
                break
            if now >= next_op:
                load.one()
                next_op += 1.0 / args.rate
            time.sleep(max(0.0, min(next_op, next_sample, end) - time.monotonic()))
        drain_start = time.monotonic()
        while any(pending(url).values()):
            if time.monotonic() - drain_start > 300:
                print(f"soak: queue not drained after 300 s: {pending(url)}")
                break
            time.sleep(0.5)
        samples.append(sample(url, t0, load, procs))
        print(row(samples[-1]) + "   (drained)", flush=True)
        for p in procs:
            if p.popen.poll() is not None:
                print(f"soak: listener {p.pid} died:\n{p.output[-3000:]}")
        result = audit(url, world, load.asked)
        print(f"asked {load.requests} operations; {result.operations} enqueued (a flag already up or a sync "
              f"already queued is one operation); {result.attempts} attempts; by status {result.by_status}")
        print(f"effects: {dict(sorted((f'{k}/{e}', n) for (k, e), n in result.effects.items()))}")
        failures = verdict(samples, args.rate, CONCURRENCY + 5, result.problems, result.lost, result.duplicated)
        rss = [f"{s.rss_kb[i] / 1024:.1f}" for s in (samples[0], samples[-1]) for i in range(len(procs))]
        summary = (f"{result.operations} operations, {result.lost} lost, {result.duplicated} duplicated, "
                   f"RSS MB first/last {rss}, max queued {max(s.queued for s in samples)}")
        print(("SOAK FAIL: " + "; ".join(failures) + f" ({summary})") if failures else f"SOAK PASS: {summary}")
        return 1 if failures else 0
    finally:
        for proc in procs:
            proc.stop()
        if not args.keep:
            drop_database(name)


if __name__ == "__main__":
    sys.exit(main())
