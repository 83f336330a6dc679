"""A failover, its rollback, a planned migration and its reprotect survive SIGKILL at every step (issue 14).

Real peers: the world of tests/integration/failover_world.py (two vcsim, zfs-fuse pools behind
sshd on both sides, three protected VMs in two boot priorities, DR shells, one recovery point),
built once for this module. The four runs follow each other in it as a person would do them,
so each starts from what the previous one left (and its checks are the next one's ground):

1. ``failover`` to the newest point with the source up (fencing runs) → 'awaiting_commit';
2. ``rollback`` of it → 'protected' (the source VMs are then powered on again, as a person does);
3. ``planned_migration`` → 'failed_over' (its first ``replicate`` is the incremental after the rollback);
4. DR-side writes into the replica (the DR VMs' disks) and a write at the original site, then
   ``reprotect`` → 'protected', direction 'reverse'.

Every run is killed at every step name of its kind, in order (for a per-VM step, at the first
VM's): a ``zerfaux run`` subprocess holds the operation, a second one stands by. When the step
shows 'running', the holder is SIGKILLed ``KILL_AFTER`` later; the standby takes the operation
over once the lease expires and resumes from that step; a new standby is started. If that kill
landed inside the step's effect, the step is killed again when the next listener writes its
outcome. So every step is killed once with its whole effect done and not recorded, most also
inside the effect, and each is done again by another listener; the last one finishes the run.
Landing there exactly: a test-only trigger in this world's database holds the outcome write of
the step being killed (its ``recovery_run_steps`` row leaving 'running') on an advisory lock the
test holds. The dead listener's connections (named by its worker id through ``PGAPPNAME``) are
ended, as dropped connections would be, so the outcome it was writing never lands. The
simulators answer after ``DELAY_MS`` per call meanwhile, so a vCenter step is killed between its
calls. Where each kill landed goes to ``$ZERFAUX_FIGURES_DIR/failover_crash.jsonl``.

Checked after each kill (at both vCenters, through their API): no protected VM powered on at
both sites. After each run: its status and the group's; every step finished, the skipped ones
exactly those the kind skips here; each killed step's ``detail.previous_attempts`` names every
killed worker's attempt, left 'running'; one operation, one attempt more than kills at least;
exactly one DR VM per protected VM (no VM made or lost at either vCenter), powered on or off as
the kind says, with its disks and NICs once; the source VMs' power states; ``zfs get guid`` of
everything the world has on both hosts before and after: nothing lost but what the kind means to
remove (the rollback's pre-failover snapshot), nothing new but what it documents (the run's
pre-failover snapshot, its replication snapshots on both ends with equal GUIDs, the reprotect's
kept snapshot, the kept dataset, the clone under the old name); the final GUIDs equal where the
kind says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pyVmomi import vim

from tests.integration.conftest import GROUP, TARGET
from tests.integration.failover_world import FailoverWorld, build_failover_world, write_into
from tests.integration.recovery_world import sha256
from tests.support.pg import create_database, drop_database
from tests.support.require import missing
from tests.support.vcsim import Simulator, start_simulator
from tests.support.workload import Proc
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost

pytestmark = [pytest.mark.zfs, pytest.mark.vcsim]

LEASE, SWEEP = 2.0, 0.25
DELAY_MS = 20  # per SOAP call at both simulators while a run is killed: a vCenter step spans several calls
KILL_AFTER = 0.03  # after a step shows 'running': inside a multi-call step's effect, or at its outcome write
PAUSE_KEY = 14_000_014  # the advisory lock the trigger waits on
INSIDE, AT_OUTCOME = "inside the effect", "at the outcome write"

# Every step name of each kind, in plan order (docs/recovery.md, "Failover runs: the engine").
STEPS = {
    "failover": ["validate", "fence_source", "pre_failover_snapshot", "load_key", "make_writable", "clone_point",
                 "export", "present_datastore", "attach_disks", "set_networks", "power_on", "wait_ready", "finish"],
    "rollback": ["validate", "power_off", "detach_disks", "unexport", "remove_datastore", "rollback_replica",
                 "destroy_clone", "set_readonly", "finish"],
    "planned_migration": ["validate", "replicate", "shutdown_source", "replicate_final", "pre_failover_snapshot",
                          "load_key", "make_writable", "export", "present_datastore", "attach_disks", "set_networks",
                          "power_on", "wait_ready", "finish"],
    "reprotect": ["validate", "check_source_changes", "keep_source_changes", "replicate_reverse", "finish"],
}
# What these runs do not need, by what they are: the newest point needs no clone; the DR datastore is
# not a clone's, so a rollback removes none and destroys no clone. Planned and 'skipped', or not planned.
NOT_HERE = {"failover": {"clone_point"}, "rollback": {"remove_datastore", "destroy_clone"},
            "planned_migration": set(), "reprotect": set()}
MAY_SKIP = {"failover": {"load_key"}, "planned_migration": {"load_key"}}  # the replica is not encrypted
FINISHED = {"done", "warning", "skipped"}

PAUSE_SQL = f"""
create schema if not exists crash_probe;
create table if not exists crash_probe.pause (run_id uuid, name text, primary key (run_id, name));
create or replace function crash_probe.hold_outcome() returns trigger language plpgsql
set search_path = pg_catalog, pg_temp as $$
begin
    if exists (select 1 from crash_probe.pause p where p.run_id = new.run_id and p.name = new.name)
       and new.seq = (select min(s.seq) from public.recovery_run_steps s
                       where s.run_id = new.run_id and s.name = new.name) then
        perform pg_advisory_xact_lock({PAUSE_KEY});
    end if;
    return new;
end $$;
drop trigger if exists crash_probe_hold_outcome on public.recovery_run_steps;
create trigger crash_probe_hold_outcome before update on public.recovery_run_steps for each row
    when (old.status = 'running' and new.status is distinct from 'running')
    execute function crash_probe.hold_outcome();
"""


@dataclass
class Kill:
    step: str
    seq: int
    worker: str
    attempt: int
    landed: str  # INSIDE | AT_OUTCOME
    at: float


@dataclass
class Chain:
    kind: str
    run_id: str
    kills: list[Kill] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # target steps that went 'skipped' without running
    seconds: float = 0.0
    split_brain: list[str] = field(default_factory=list)


# -- the world, once for the module ----------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_world(pg_template: str, zfs_source: ZFSHost, zfs_target: ZFSHost, vcsim_binary: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverWorld]:
    from listener.migrate import seed

    if not zfs_source.local:
        missing("a local zfs", "the source datastore is a directory on this machine")
    workdir = tmp_path_factory.mktemp("failover-crash")
    db = create_database(pg_template)
    seed(db.url)

    def start(name: str, **kwargs: Any) -> Simulator:
        return start_simulator(vcsim_binary, name, workdir, **kwargs)

    gen = build_failover_world(db, zfs_source, zfs_target, start, workdir)
    try:
        world = next(gen)
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute(PAUSE_SQL)
        yield world
    finally:
        gen.close()
        drop_database(db.name)


@pytest.fixture
def env(crash_world: FailoverWorld) -> dict[str, str]:
    return {**crash_world.env, "ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": str(SWEEP)}


# -- reading the peers ----------------------------------------------------------------------------


def _vm_states(sim: Simulator) -> dict[str, str]:
    """moref → runtime.powerState of every VM at ``sim``, in one PropertyCollector call."""
    content = sim.si().content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        spec = vim.PropertyCollector.FilterSpec(
            objectSet=[vim.PropertyCollector.ObjectSpec(
                obj=view, skip=True,
                selectSet=[vim.PropertyCollector.TraversalSpec(name="v", path="view", skip=False,
                                                               type=vim.view.ContainerView)])],
            propSet=[vim.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["runtime.powerState"])])
        return {str(o.obj._moId): str(o.propSet[0].val) for o in content.propertyCollector.RetrieveContents([spec])}
    finally:
        view.DestroyView()


def _both_on(w: FailoverWorld) -> list[str]:
    """Protected VMs powered on at both vCenters at once (split brain)."""
    src, dr = _vm_states(w.source_sim), _vm_states(w.dr_sim)
    return [v.name for v in w.vms if src.get(v.moref) == "poweredOn" and dr.get(v.shell) == "poweredOn"]


def _zfs(w: FailoverWorld) -> dict[str, dict[str, int]]:
    """side → {dataset or snapshot: GUID} of everything this world has on that host (kept and renamed ones too)."""
    out: dict[str, dict[str, int]] = {}
    for side, host, prefix in (("source", w.source_host, w.source), ("dr", w.target_host, w.target_root)):
        text = host.run(["zfs", "get", "-Hp", "-r", "-o", "name,value", "guid", host.pool]).stdout.decode()
        rows = (line.split("\t") for line in text.splitlines() if line.strip())
        out[side] = {n: int(g) for n, g in rows if n == prefix or n.startswith((prefix + "@", prefix + "/",
                                                                                   prefix + "_zerfaux_"))}
    return out


@dataclass
class ZfsChange:
    lost: dict[str, list[str]]  # side → names whose GUID is gone from that host
    new: dict[str, list[str]]  # side → names with a GUID the host did not have
    renamed: dict[str, dict[str, str]]  # side → old name → new name (same GUID)


def _change(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> ZfsChange:
    lost, new, renamed = {}, {}, {}
    for side in before:
        b, a = before[side], after[side]
        a_by_guid = {g: n for n, g in a.items()}
        b_guids = set(b.values())
        lost[side] = sorted(n for n, g in b.items() if g not in a_by_guid)
        new[side] = sorted(n for n, g in a.items() if g not in b_guids)
        renamed[side] = {n: a_by_guid[g] for n, g in b.items() if g in a_by_guid and a_by_guid[g] != n}
    return ZfsChange(lost, new, renamed)


def _snap(name: str) -> str:
    return name.split("@", 1)[1] if "@" in name else ""


def _newest(host: ZFSHost, dataset: str) -> str:
    out = host.run(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-s", "creation", "-r", dataset]).stdout
    names = [n for n in out.decode().split() if n.startswith(dataset + "@")]
    assert names, f"{dataset} has no snapshot"
    return _snap(names[-1])


# -- the run's rows ---------------------------------------------------------------------------------


def _run(w: FailoverWorld, run_id: str) -> dict[str, Any]:
    return w.db.one("select * from recovery_runs where id = %s", (run_id,))


def _steps(w: FailoverWorld, run_id: str) -> list[dict[str, Any]]:
    return w.db.sql("select seq, name, status, error, detail, protected_vm_id from recovery_run_steps"
                    " where run_id = %s order by seq", (run_id,))


def _op(w: FailoverWorld, run_id: str) -> dict[str, Any]:
    return w.db.one("select status, attempts, worker_id, last_error from zerfaux.operations"
                    " where kind = 'recovery.run' and subject_id::text = %s", (run_id,))


def _figures(chain: Chain) -> None:
    out = Path(os.environ.get("ZERFAUX_FIGURES_DIR", tempfile.gettempdir())) / "failover_crash.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps({"kind": chain.kind, "seconds": round(chain.seconds, 2), "skipped": chain.skipped,
                             "kills": [k.__dict__ for k in chain.kills]}, default=str) + "\n")


# -- killing a run at every step ------------------------------------------------------------------


class Listeners:
    """``zerfaux run`` subprocesses, by worker id: the one holding the run and a standby."""

    def __init__(self, url: str, env: dict[str, str], kind: str) -> None:
        self.url, self.env, self.kind = url, env, kind
        self.procs: dict[str, Proc] = {}

    def spawn(self) -> str:
        worker = f"{self.kind}-{len(self.procs) + 1}"
        # PGAPPNAME: its connections carry its worker id, so the test can end them once it is dead.
        self.procs[worker] = Proc(self.url, "run", env={**self.env, "ZERFAUX_WORKER_ID": worker, "PGAPPNAME": worker})
        return worker

    def output(self) -> str:
        return "\n---\n".join(f"[{w}]\n{p.output[-2500:]}" for w, p in self.procs.items())

    def stop_all(self) -> dict[str, int]:
        """SIGTERM to the living ones, each once it listens (a signal while it starts is not a clean stop)."""
        alive = {w: p for w, p in self.procs.items() if p.popen.poll() is None}
        for p in alive.values():
            with contextlib.suppress(AssertionError):
                p.wait_for_line("listening as", timeout=30)
        return {w: p.stop() for w, p in alive.items()}


def _until(check: Callable[[], Any], timeout: float, what: str, listeners: Listeners | None = None,
           interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s\n{listeners.output() if listeners else ''}")


def kill_at_every_step(w: FailoverWorld, env: dict[str, str], kind: str, terminal: Sequence[str],
                       names: Sequence[str] | None = None, **columns: Any) -> Chain:
    """Insert a ``kind`` run and SIGKILL its listener at each of its steps; the last listener finishes it."""
    names = list(names or STEPS[kind])
    ends = (*terminal, "failed", "cancelled")
    listeners = Listeners(w.db.url, env, kind)
    lock = psycopg.connect(w.db.url, autocommit=True)
    db = psycopg.connect(w.db.url, autocommit=True, row_factory=dict_row)  # one connection for the polling

    def q(query: str, *params: Any) -> list[dict[str, Any]]:
        return db.execute(query, params).fetchall()

    dead: set[str] = set()

    def kill(step: dict[str, Any]) -> str:
        """SIGKILL the listener holding the run while ``step`` runs; where the kill landed."""
        [op] = q("select worker_id, attempts from zerfaux.operations where kind = 'recovery.run'"
                 " and subject_id = %s and status = 'running'", chain.run_id)
        victim = str(op["worker_id"])
        listeners.procs[victim].kill()
        time.sleep(0.02)  # what it had sent reaches the server, and the pause
        # Its backend still waits on the pause if the kill came at the outcome write. Every backend of
        # the dead listener is then ended, as a dropped connection would be: that write never lands.
        [blocked] = q(BLOCKED + " and a.application_name = %s", PAUSE_KEY, victim)
        q("select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s", victim)
        _until(lambda: not q("select 1 from pg_stat_activity where application_name = %s", victim), 30,
               f"the backends of {victim} end", listeners)
        dead.add(victim)
        [now] = q("select status from recovery_run_steps where run_id = %s and seq = %s", chain.run_id, step["seq"])
        assert now["status"] == "running", (kind, step, now)
        landed = AT_OUTCOME if blocked["n"] else INSIDE
        chain.kills.append(Kill(step["name"], int(step["seq"]), victim, int(op["attempts"]), landed,
                                round(time.monotonic() - t0, 2)))
        chain.split_brain += [f"{step['name']}: {n}" for n in _both_on(w)]
        listeners.spawn()
        return landed

    def again(run_id: str) -> str | None:
        """'blocked' once the listener now holding the run writes the paused step's outcome, 'ended' if
        the run ended first."""
        holder = q("select worker_id from zerfaux.operations where kind = 'recovery.run' and subject_id = %s"
                   " and status = 'running'", run_id)
        if holder and holder[0]["worker_id"] not in dead and \
                q(BLOCKED + " and a.application_name = %s", PAUSE_KEY, holder[0]["worker_id"])[0]["n"]:
            return "blocked"
        if q("select 1 from recovery_runs where id = %s and status = any(%s)", run_id, list(ends)):
            return "ended"
        return None

    t0 = time.monotonic()
    try:
        lock.execute("select pg_advisory_lock(%s)", (PAUSE_KEY,))
        for worker in (listeners.spawn(), listeners.spawn()):
            listeners.procs[worker].wait_for_line("listening as")
        for sim in (w.source_sim, w.dr_sim):
            sim.set_delay(DELAY_MS)
        with psycopg.connect(w.db.url) as conn:  # the run and its pauses in one transaction: no listener sees one alone
            cols = ["protection_group_id", "kind", *columns]
            vals = [GROUP, kind, *(Jsonb(v) if isinstance(v, dict) else v for v in columns.values())]
            row = conn.execute(f"insert into recovery_runs ({', '.join(cols)}) values"
                               f" ({', '.join(['%s'] * len(vals))}) returning id", vals).fetchone()
            assert row is not None
            run_id = str(row[0])
            conn.execute("insert into crash_probe.pause (run_id, name) select %s, unnest(%s::text[])",
                         (run_id, names))
        chain = Chain(kind, run_id)
        plan = _until(lambda: q("select name from recovery_run_steps where run_id = %s order by seq", run_id)
                      or _ended_unplanned(q("select status, error from recovery_runs where id = %s", run_id)[0], ends),
                      60, f"{kind}: the plan is written", listeners)
        planned = list(dict.fromkeys(s["name"] for s in plan))
        documented = [n for n in names if n in planned or n not in NOT_HERE.get(kind, set())]
        assert planned == documented, f"{kind}: the plan's step names {planned} are not the documented {documented}"
        todo = list(planned)
        while todo:
            rows = _until(lambda: _moved(q(CURRENT, list(todo), run_id), ends), 120 + LEASE,
                          f"{kind}: one of {todo} runs", listeners)
            for r in rows:
                if r["status"] == "skipped" and r["name"] in todo:
                    chain.skipped.append(r["name"])
                    todo.remove(r["name"])
            running = [r for r in rows if r["status"] == "running" and r["name"] in todo]
            if not running:
                if rows[0]["run_status"] in ends:
                    break
                continue
            step = running[0]
            time.sleep(KILL_AFTER)
            if kill(step) == INSIDE:
                # The next listener does the step again: killed once more when its outcome is being written.
                if _until(lambda: again(run_id), 120 + LEASE, f"{kind}: {step['name']} is done again",
                          listeners) == "ended":
                    break  # the run ended: the checks say how
                assert kill(step) == AT_OUTCOME
            q("delete from crash_probe.pause where run_id = %s and name = %s returning name", run_id, step["name"])
            todo.remove(step["name"])
        _until(lambda: q("select 1 from recovery_runs where id = %s and status = any(%s)", run_id, list(ends)),
               120 + LEASE, f"{kind}: the run ends", listeners, interval=0.1)
        chain.seconds = time.monotonic() - t0
    finally:
        db.close()
        lock.close()  # the pause's lock goes with its session
        for sim in (w.source_sim, w.dr_sim):
            sim.set_delay(0)
        codes = listeners.stop_all()
    assert all(c == 0 for c in codes.values()), (codes, listeners.output())
    _figures(chain)
    return chain


def _ended_unplanned(run: dict[str, Any], ends: Sequence[str]) -> None:
    assert run["status"] not in ends, f"the run ended before it wrote its plan: {run}"


# The run's status beside the first step (lowest seq) of each name still to kill.
CURRENT = """
select r.status as run_status, s.name, s.seq, s.status
  from recovery_runs r
  left join lateral (select distinct on (t.name) t.name, t.seq, t.status from recovery_run_steps t
                      where t.run_id = r.id and t.name = any(%s) order by t.name, t.seq) s on true
 where r.id = %s order by s.seq
"""
BLOCKED = ("select count(*) as n from pg_locks l join pg_stat_activity a on a.pid = l.pid"
           " where l.locktype = 'advisory' and not l.granted and l.objid = %s")


def _moved(rows: list[dict[str, Any]], ends: Sequence[str]) -> list[dict[str, Any]] | None:
    """The rows when a step to kill runs or was skipped, or the run ended; else None (poll again)."""
    if any(r["status"] in ("running", "skipped") for r in rows) or (rows and rows[0]["run_status"] in ends):
        return rows
    return None


# -- what every run must show -----------------------------------------------------------------------


def _check_steps(w: FailoverWorld, chain: Chain, status: str) -> list[dict[str, Any]]:
    run, steps, op = _run(w, chain.run_id), _steps(w, chain.run_id), _op(w, chain.run_id)
    where = {"kills": [(k.step, k.landed) for k in chain.kills], "error": run["error"]}
    assert run["status"] == status, (where, [(s["name"], s["status"], s["error"]) for s in steps])
    assert not [s for s in steps if s["status"] not in FINISHED], (where, steps)
    first = {}
    for s in steps:
        first.setdefault(s["name"], s)
    skipped = {n for n, s in first.items() if s["status"] == "skipped"}
    not_here = NOT_HERE[chain.kind] & set(first)
    assert not_here <= skipped <= not_here | MAY_SKIP.get(chain.kind, set()), (skipped, where)
    # Every step killed with its effect done and not yet recorded (a step recorded 'skipped' without
    # running had no effect to kill); some also inside the effect before that.
    assert set(chain.skipped) <= not_here | MAY_SKIP.get(chain.kind, set()), (chain.skipped, where)
    done_unrecorded = [k.step for k in chain.kills if k.landed == AT_OUTCOME]
    assert sorted(done_unrecorded + chain.skipped) == sorted(first), (
        f"not killed at the outcome write: {set(first) - set(done_unrecorded)}")
    assert (op["status"], op["attempts"] >= len(chain.kills) + 1) == ("succeeded", True), (op, where)
    assert chain.split_brain == [], f"powered on at both sites after a kill: {chain.split_brain}"
    assert _both_on(w) == []
    return steps


def _check_history(w: FailoverWorld, chain: Chain) -> None:
    """Each killed step's ``detail.previous_attempts`` holds the killed attempt, left 'running'."""
    by_seq = {s["seq"]: s for s in _steps(w, chain.run_id)}
    lost = []
    for k in chain.kills:
        previous = (by_seq[k.seq]["detail"] or {}).get("previous_attempts") or []
        if not any(p.get("worker") == k.worker and p.get("status") == "running" for p in previous):
            lost.append((k.step, k.worker, k.landed, [(p.get("worker"), p.get("status")) for p in previous]))
    assert lost == [], f"killed attempts missing from previous_attempts: {lost}"


def _check_vms(w: FailoverWorld, before: dict[str, dict[str, str]], dr_on: bool, source_on: bool) -> None:
    """No VM made or lost at either vCenter; every DR shell (one per protected VM) and source VM as said."""
    after = {"source": _vm_states(w.source_sim), "dr": _vm_states(w.dr_sim)}
    for side in after:
        assert sorted(after[side]) == sorted(before[side]), (side, before[side], after[side])
    want_dr, want_src = ("poweredOn" if dr_on else "poweredOff"), ("poweredOn" if source_on else "poweredOff")
    assert {v.name: after["dr"][v.shell] for v in w.vms} == {v.name: want_dr for v in w.vms}
    assert {v.name: after["source"][v.moref] for v in w.vms} == {v.name: want_src for v in w.vms}
    others = {m: s for m, s in after["dr"].items() if m not in {v.shell for v in w.vms}}
    assert others == {m: s for m, s in before["dr"].items() if m in others}, "another DR VM changed power"
    for v in w.vms:
        disks = w.disk_files(v, "dr")
        if dr_on:
            src = w.disk_files(v, "source")
            assert len(disks) == len(src) == len(set(disks)), (v.name, disks, src)
            assert w.vm_datastores(v, "dr") == [w.db.value("select dr_datastore from replication_targets where id = %s", (TARGET,))], disks
            assert len(w.nic_networks(v, "dr")) == len(w.nic_networks(v, "source")), v.name
        else:
            assert disks == [], (v.name, disks)


def _states(w: FailoverWorld) -> dict[str, dict[str, str]]:
    return {"source": _vm_states(w.source_sim), "dr": _vm_states(w.dr_sim)}


def _pre_failover(run_id: str) -> str:
    return "zerfaux_pre_failover_" + run_id.replace("-", "")[:8]


# -- the four runs, in the order a person would do them -------------------------------------------------


def test_failover_to_the_newest_point_killed_at_every_step(crash_world: FailoverWorld, env: dict[str, str]) -> None:
    w = crash_world
    assert w.group()["state"] == "protected"
    vms, zfs = _states(w), _zfs(w)
    assert all(vms["source"][v.moref] == "poweredOn" for v in w.vms), "the source is up: fencing has VMs to stop"
    with w.harness():
        chain = kill_at_every_step(w, env, "failover", ("awaiting_commit",), options={"skip_source": False})
    steps = _check_steps(w, chain, "awaiting_commit")
    assert w.group()["state"] == "awaiting_commit"
    assert [s["detail"].get("fenced") for s in steps if s["name"] == "fence_source"] == [True] * len(w.vms)
    _check_vms(w, vms, dr_on=True, source_on=False)
    change = _change(zfs, _zfs(w))
    assert change.lost == {"source": [], "dr": []}, change
    assert change.new == {"source": [], "dr": [f"{w.replica}@{_pre_failover(chain.run_id)}"]}, change
    assert change.renamed == {"source": {}, "dr": {}}, change
    _check_history(w, chain)


def test_rollback_of_that_failover_killed_at_every_step(crash_world: FailoverWorld, env: dict[str, str]) -> None:
    w = crash_world
    assert w.group()["state"] == "awaiting_commit", "needs the failover of the previous test"
    failover_id = str(w.db.value("select id from recovery_runs where kind = 'failover' order by created_at desc"))
    point = str(w.db.value("select p.snapshot_name from recovery_runs r join recovery_points p"
                           " on p.id = r.recovery_point_id where r.id = %s", (failover_id,)))
    vms, zfs = _states(w), _zfs(w)
    with w.harness():
        chain = kill_at_every_step(w, env, "rollback", ("completed",))
    _check_steps(w, chain, "completed")
    group = w.group()
    assert (group["state"], group["direction"]) == ("protected", "forward")
    assert _run(w, failover_id)["status"] == "completed"
    _check_vms(w, vms, dr_on=False, source_on=False)  # the source stays fenced: a person powers it on
    change = _change(zfs, _zfs(w))
    # The pre-failover snapshot held nothing beyond the point: it goes, so the point is the newest again.
    assert change.lost == {"source": [], "dr": [f"{w.replica}@{_pre_failover(failover_id)}"]}, change
    assert change.new == {"source": [], "dr": []}, change
    assert _newest(w.target_host, w.replica) == point
    assert _read_only(w, "dr", w.replica), "the replica is writable after the rollback"
    _check_history(w, chain)


def test_planned_migration_killed_at_every_step(crash_world: FailoverWorld, env: dict[str, str]) -> None:
    w = crash_world
    assert w.group()["state"] == "protected", "needs the rollback of the previous test"
    for v in w.vms:  # after the rollback a person powers the source VMs on again
        if _vm_states(w.source_sim)[v.moref] != "poweredOn":
            w.source_sim.vm(v.moref).PowerOnVM_Task()
    _until(lambda: all(_vm_states(w.source_sim)[v.moref] == "poweredOn" for v in w.vms), 20, "source VMs on")
    vms, zfs = _states(w), _zfs(w)
    with w.harness():
        chain = kill_at_every_step(w, env, "planned_migration", ("completed",))
    steps = _check_steps(w, chain, "completed")
    run = _run(w, chain.run_id)
    assert (w.group()["state"], run["data_loss_seconds"]) == ("failed_over", 0), run
    _check_vms(w, vms, dr_on=True, source_on=False)
    for s in steps:
        if s["name"] == "power_on":
            assert s["detail"].get("source_state") == "poweredOff", s
    for v in w.vms:  # each DR VM powered on after its source VM went off, by vCenter's own clocks
        _, _, src_off = w.power(v, "source")
        _, dr_on, _ = w.power(v, "dr")
        assert src_off is not None and dr_on is not None and dr_on >= src_off, (v.name, src_off, dr_on)
    final = (run["report"] or {}).get("final_point") or {}
    assert final.get("snapshot_name"), run["report"]
    src, dr = w.guids("source"), w.guids("dr")
    assert src[final["snapshot_name"]] == dr[final["snapshot_name"]] == int(final["guid"]), (final, src, dr)
    assert str(w.db.value("select snapshot_name from recovery_points where id = %s",
                          (run["recovery_point_id"],))) == final["snapshot_name"]
    change = _change(zfs, _zfs(w))
    assert change.lost == {"source": [], "dr": []}, change
    assert change.renamed == {"source": {}, "dr": {}}, change
    sent = {_snap(n) for n in change.new["source"]}
    assert all(s.startswith("zerfaux_") for s in sent) and final["snapshot_name"] in sent, change
    assert all(src[s] == dr.get(s) for s in sent), ("a run snapshot on the source only", change, src, dr)
    assert sorted(change.new["dr"]) == sorted([f"{w.replica}@{s}" for s in sent]
                                              + [f"{w.replica}@{_pre_failover(chain.run_id)}"]), change
    _check_history(w, chain)


def test_reprotect_after_the_migration_with_writes_on_both_sides_killed_at_every_step(
    crash_world: FailoverWorld, env: dict[str, str]
) -> None:
    w = crash_world
    assert w.group()["state"] == "failed_over", "needs the planned migration of the previous test"
    vm = w.vms[0]
    common = _newest(w.target_host, w.replica)
    # The DR VMs wrote (into the replica, now their live dataset); someone also wrote at the original site.
    write_into(w.replica_dir / vm.flat, os.urandom(64 * 1024), 4096)
    dr_hash = w.replica_hashes()[vm.flat]
    stray = os.urandom(32 * 1024)
    (w.source_dir / "written-after-migration.bin").write_bytes(stray)
    os.sync()
    vms, zfs = _states(w), _zfs(w)
    with w.harness():
        chain = kill_at_every_step(w, env, "reprotect", ("completed",))
    _check_steps(w, chain, "completed")
    run = _run(w, chain.run_id)
    group = w.group()
    assert (group["state"], group["direction"]) == ("protected", "reverse")
    _check_vms(w, vms, dr_on=True, source_on=False)

    # What the original site held beyond the common snapshot: kept where the report says, readable.
    kept = _find(run["report"] or {}, "kept_dataset")
    kept_snap = _find(run["report"] or {}, "kept_snapshot")
    assert kept and kept.startswith(w.source + "_zerfaux_kept_"), run["report"]
    assert kept_snap and kept_snap.split("@", 1)[0] == kept, run["report"]
    assert int(w.zfs_get("source", "userrefs", kept_snap)) >= 1, "the kept snapshot is not held"
    assert _file_hash(w.source_host, kept_snap, "written-after-migration.bin") == _digest(stray)

    change = _change(zfs, _zfs(w))
    assert change.lost == {"source": [], "dr": []}, change
    # The original dataset (and its snapshots) renamed to the kept name, its GUIDs unchanged.
    assert change.renamed["dr"] == {}, change
    assert change.renamed["source"] and all(new.startswith(kept) and old.replace(w.source, kept, 1) == new
                                             for old, new in change.renamed["source"].items()), change
    sent = sorted(_snap(n) for n in change.new["dr"])
    assert sent and all(s.startswith("zerfaux_") for s in sent), change  # the reverse replication's snapshots
    assert sorted(change.new["source"]) == sorted([w.source, kept_snap, *(f"{w.source}@{s}" for s in sent)]), change
    newest = _newest(w.target_host, w.replica)
    assert newest in sent and common != newest, (newest, sent, common)
    assert w.guids("source")[newest] == w.guids("dr")[newest], "the reverse replication's newest GUIDs differ"
    assert _file_hash(w.source_host, f"{w.source}@{newest}", vm.flat) == dr_hash, "the DR write did not go back"
    assert _read_only(w, "source", w.source), "the new direction's target is writable after the reprotect"
    _check_history(w, chain)


def _read_only(w: FailoverWorld, side: str, dataset: str) -> bool:
    """Whether ``dataset`` refuses writes. Mounted: a file cannot be created in it (EROFS). zfs-fuse
    shows ``readonly`` as "off temporary" on a mounted dataset after ``zfs set readonly=on``, so
    the property alone says nothing there; unmounted, the property is what a mount will honour."""
    if w.zfs_get(side, "mounted", dataset) != "yes":
        return w.zfs_get(side, "readonly", dataset) == "on"
    probe = Path(w.mountpoint(w.source_host if side == "source" else w.target_host, dataset)) / ".crash-probe"
    try:
        probe.open("x").close()
    except OSError as exc:
        return exc.errno == errno.EROFS
    probe.unlink()
    return False


def _find(report: Any, key: str) -> str | None:
    """``key``'s value anywhere in the report (it names what it kept in the keep step's part)."""
    if isinstance(report, dict):
        if isinstance(report.get(key), str):
            return str(report[key])
        for value in report.values():
            if (found := _find(value, key)) is not None:
                return found
    if isinstance(report, list):
        for value in report:
            if (found := _find(value, key)) is not None:
                return found
    return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_hash(host: ZFSHost, snapshot: str, path: str) -> str | None:
    """SHA-256 of ``path`` in ``snapshot``, read through a temporary clone (the world's hosts are local)."""
    tag = uuid.uuid4().hex[:8]
    clone, where = f"{host.pool}/crashverify{tag}", mountpoint(f"crash-verify-{tag}")
    host.run(["zfs", "clone", "-o", f"mountpoint={where}", snapshot, clone])
    try:
        file = Path(where) / path
        return sha256(file) if file.is_file() else None
    finally:
        for _ in range(20):
            done = host.run(["zfs", "destroy", "-f", clone], check=False)
            if done.returncode == 0 or b"does not exist" in done.stderr:
                break
            time.sleep(0.25)  # zfs-fuse: the mount may be busy for a moment after the read
