"""The planned migration half of bench/recovery.py (``--kind migration``): Zerfaux's RTO against a plain script.

Three modules: ``migration_world`` (the world, its reset between rounds, the final delta),
``migration_script`` (the plain script), and this one (Zerfaux's round, the rounds alternating,
the figures). A Zerfaux round: ``insert into recovery_runs (protection_group_id, kind) values
(..., 'planned_migration')``, the real dispatcher in this process (``ZERFAUX_USE_STUBS=false``)
until idle; its figure is the run's ``rto_seconds`` (run start to its last VM ready), the wall
time from the insert beside it, and its phases and steps from ``recovery_run_steps``.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bench.migration_script import script_round
from bench.migration_world import (
    MiB, MigrationWorld, build, check_migrated, final_stream_bytes, reset, snapshots, write_delta,
)
from tests.integration.conftest import GROUP
from tests.integration.failover_world import FailoverWorld

STEP_SECONDS: dict[str, list[float]] = {}  # step name → each step's own duration, every Zerfaux round


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
