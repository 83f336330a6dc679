"""Load for the reliability scenarios: rows that ask for every kind of work, listener processes
whose output is drained, and the audit that counts effects in the stub world's journal.

Shared by tests/integration/test_many_workers.py, test_downtime.py, test_crash_stub.py and
bench/soak.py. Needs a database with the migrations and supabase/seed.sql applied.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from handlers.backends.stub.world import StubWorld
from tests.support.engine import spawn

PRIMARY = "00000000-0000-4000-a000-000000000001"
DR = "00000000-0000-4000-a000-000000000002"
TARGET = "00000000-0000-4000-b000-000000000001"
GROUP = "00000000-0000-4000-c000-000000000001"
PROTECTION_DS = "zfs-protect-01"
KINDS = ("vcenter.sync", "replication.run", "vm.storage_vmotion", "vm.dr_shell")


def sql(url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def value(url: str, query: str, params: Any = None) -> Any:
    return next(iter(sql(url, query, params)[0].values()))


# --- asking for work --------------------------------------------------------------------------

def prepare(url: str, max_concurrent: int = 8) -> None:
    """Room for replication jobs to run side by side (the seed allows 2 per target)."""
    sql(url, "update replication_targets set max_concurrent = %s where id = %s", (max_concurrent, TARGET))


def add_vcenters(url: str, n: int, prefix: str = "load") -> list[str]:
    """Extra vCenters to sync: syncing them never touches the primary's protected VMs."""
    rows = sql(url, "insert into vcenters (name, host, username, password_secret)"
                    " select %s || '-vc-' || i, %s || '-vc-' || i || '.example.internal', 'admin', 'pw'"
                    "   from generate_series(1, %s) i returning id", (prefix, prefix, n))
    return [str(r["id"]) for r in rows]


def add_vms(url: str, n: int, datastore: str, prefix: str) -> list[str]:
    """VMs at the primary vCenter with one disk on ``datastore``."""
    rows = sql(url, """
        insert into vcenter_vms (vcenter_id, moref, name, datastore, num_cpu, memory_mb, guest_id, disks)
        select %(vc)s, %(p)s || '-vm-' || i, %(p)s || '-' || i, %(ds)s, 2, 4096, 'ubuntu64Guest',
               jsonb_build_array(jsonb_build_object(
                   'file', '[' || %(ds)s || '] ' || %(p)s || '-' || i || '/disk.vmdk',
                   'capacity', 17179869184, 'datastore', %(ds)s, 'controller', 'pvscsi'))
          from generate_series(1, %(n)s) i returning id""", {"vc": PRIMARY, "p": prefix, "ds": datastore, "n": n})
    return [str(r["id"]) for r in rows]


def protect(url: str, vm_ids: Iterable[str], vmotion: bool = False, dr_shell: bool = False) -> list[str]:
    rows = sql(url, "insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion, needs_dr_shell)"
                    " select %s, unnest(%s::uuid[]), %s, %s returning id", (GROUP, list(vm_ids), vmotion, dr_shell))
    return [str(r["id"]) for r in rows]


def request_syncs(url: str, vcenter_ids: Iterable[str]) -> None:
    sql(url, "update vcenters set sync_requested_at = clock_timestamp() where id = any(%s::uuid[])",
        (list(vcenter_ids),))


ADD_GROUPS = """
    insert into protection_groups (name, source_vcenter_id, dr_vcenter_id, replication_target_id,
                                   source_dataset, protection_datastore)
    select %(p)s || '-group-' || gen_random_uuid(), %(vc)s, %(dr)s, %(t)s, 'tank/' || %(p)s || '-' || i, %(ds)s
      from generate_series(1, %(n)s) i returning id"""


def group_params(n: int, prefix: str) -> dict[str, Any]:
    return {"p": prefix, "vc": PRIMARY, "dr": DR, "t": TARGET, "ds": PROTECTION_DS, "n": n}


def add_groups(url: str, n: int, prefix: str = "load") -> list[str]:
    """Protection groups like the seed's: a group has at most one pending or running job, so
    ``n`` jobs queued at once need ``n`` groups."""
    return [str(r["id"]) for r in sql(url, ADD_GROUPS, group_params(n, prefix))]


def request_replications(url: str, n: int, prefix: str = "load") -> list[str]:
    """``n`` jobs queued at once, one in each of ``n`` new groups."""
    rows = sql(url, "insert into replication_jobs (protection_group_id) select unnest(%s::uuid[]) returning id",
               (add_groups(url, n, prefix),))
    return [str(r["id"]) for r in rows]


@dataclass
class Asked:
    """Everything asked for, by kind, to audit against."""

    syncs: set[str] = field(default_factory=set)  # vcenter ids
    jobs: set[str] = field(default_factory=set)  # replication job ids
    moves: set[str] = field(default_factory=set)  # protected_vm ids asking for a storage vMotion
    shells: set[str] = field(default_factory=set)  # protected_vm ids asking for a DR shell

    @property
    def total(self) -> int:
        return len(self.syncs) + len(self.jobs) + len(self.moves) + len(self.shells)


def ask_mix(url: str, asked: Asked, syncs: int, jobs: int, moves: int, shells: int, tag: str) -> None:
    """One batch of every kind: new vCenters synced, jobs inserted, VMs protected with a flag."""
    if syncs:
        vcs = add_vcenters(url, syncs, prefix=f"{tag}")
        request_syncs(url, vcs)
        asked.syncs.update(vcs)
    if jobs:
        asked.jobs.update(request_replications(url, jobs, f"{tag}-job"))
    if moves:
        asked.moves.update(protect(url, add_vms(url, moves, "nfs-01", f"{tag}-mv"), vmotion=True))
    if shells:
        asked.shells.update(protect(url, add_vms(url, shells, PROTECTION_DS, f"{tag}-sh"), dr_shell=True))


# --- listener processes ---------------------------------------------------------------------

class Proc:
    """A `zerfaux` subprocess whose output is read continuously (a full pipe would block it)."""

    def __init__(self, url: str | None, *args: str, env: dict[str, str] | None = None) -> None:
        self.popen = spawn(url, *args, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.popen.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"listener exited with {self.popen.returncode}:\n{self.output[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in the listener's output within {timeout}s:\n{self.output[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(10)
        self._closed()
        return code

    def wait(self, timeout: float) -> int:
        """Wait for it to exit by itself (`run --until-idle`); kill it past ``timeout``."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            self._closed()
            raise AssertionError(f"still running after {timeout}s:\n{self.output[-3000:]}") from None
        self._closed()
        return code

    def kill(self) -> None:
        """SIGKILL: no release, no goodbye; its leases must expire."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)
        self._closed()

    def _closed(self) -> None:
        self._reader.join(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def listener_env(world: Path, **extra: str) -> dict[str, str]:
    return {"ZERFAUX_STUB_WORLD": str(world), "ZERFAUX_STUB_VMS": "2", **extra}


# --- the audit ------------------------------------------------------------------------------

def wait_converged(url: str, asked: Asked, timeout: float, procs: Iterable[Proc] = ()) -> float:
    """Seconds until nothing asked is left undone; fails (with the listeners' tails) past timeout."""
    start = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - start < timeout:
        last = pending(url)
        if not any(last.values()):
            return time.monotonic() - start
        time.sleep(0.25)
    tails = "\n".join(p.output[-2000:] for p in procs)
    raise AssertionError(f"not converged within {timeout}s: {last}\n{tails}")


def pending(url: str) -> dict[str, Any]:
    return sql(url, """
        select (select count(*) from zerfaux.operations where status in ('queued', 'running')) as active,
               (select count(*) from vcenters where sync_requested_at is not null
                   and (last_synced_at is null or last_synced_at < sync_requested_at)) as unsynced,
               (select count(*) from replication_jobs where status <> 'completed') as jobs_open,
               (select count(*) from protected_vms where needs_storage_vmotion or needs_dr_shell) as flags_up""")[0]


@dataclass
class Audit:
    operations: int
    attempts: int
    by_status: dict[str, int]
    lost: int  # asked for, yet its effect never happened or its row never converged
    duplicated: int  # an effect that happened more than once
    retries_adopted: int  # a repeat attempt that found its effect done (adopted / already-there)
    effects: Counter[tuple[str, str]]
    problems: list[str]

    def figures(self) -> dict[str, Any]:
        return {"operations": self.operations, "attempts": self.attempts, "lost": self.lost,
                "duplicated": self.duplicated, "retries_adopted": self.retries_adopted,
                "by_status": self.by_status,
                "effects": {f"{k}/{e}": n for (k, e), n in sorted(self.effects.items())}}


def audit(url: str, world: Path, asked: Asked) -> Audit:
    """Count effects per subject in the journal and check every row converged."""
    journal = StubWorld(world).journal()
    effects = Counter((e["kind"], e["effect"]) for e in journal)
    per: dict[tuple[str, str], Counter[str]] = {}
    for e in journal:
        per.setdefault((e["kind"], e["subject"]), Counter())[e["effect"]] += 1
    problems: list[str] = []
    lost = duplicated = 0

    def check(kind: str, subject: str, effect: str) -> None:
        nonlocal lost, duplicated
        n = per.get((kind, subject), Counter())[effect]
        if n == 0:
            lost += 1
            problems.append(f"{kind} {subject}: no {effect!r} effect")
        elif n > 1:
            duplicated += n - 1
            problems.append(f"{kind} {subject}: {n} {effect!r} effects")

    for job in asked.jobs:
        check("replication.run", job, "sent")
    for pvm in asked.shells:
        check("vm.dr_shell", pvm, "created")
    moved = {str(r["id"]): f"{r['vcenter_id']}/{r['moref']}" for r in sql(url,
             "select p.id, v.vcenter_id, v.moref from protected_vms p join vcenter_vms v on v.id = p.vm_id"
             " where p.id = any(%s::uuid[])", (list(asked.moves),))}
    for pvm in asked.moves:
        check("vm.storage_vmotion", moved.get(pvm, f"?{pvm}"), "relocated")
    for vc in asked.syncs:
        if not per.get(("vcenter.sync", vc), Counter())["read"]:
            lost += 1
            problems.append(f"vcenter.sync {vc}: never read")

    rows = {
        "jobs not completed": value(url, "select count(*) from replication_jobs where id = any(%s::uuid[])"
                                         " and status <> 'completed'", (list(asked.jobs),)),
        "shells not recorded": value(url, "select count(*) from protected_vms where id = any(%s::uuid[])"
                                          " and (needs_dr_shell or not dr_shell_vm_created or dr_shell_vm_id is null"
                                          "      or last_error is not null)", (list(asked.shells),)),
        "moves not recorded": value(url, "select count(*) from protected_vms p join vcenter_vms v on v.id = p.vm_id"
                                         " where p.id = any(%s::uuid[]) and (p.needs_storage_vmotion"
                                         "  or v.datastore <> %s or p.last_error is not null)",
                                    (list(asked.moves), PROTECTION_DS)),
        "vcenters not synced": value(url, "select count(*) from vcenters where id = any(%s::uuid[])"
                                          " and (last_synced_at is null or last_synced_at < sync_requested_at"
                                          "      or last_sync_error is not null)", (list(asked.syncs),)),
    }
    for what, n in rows.items():
        if n:
            lost += n
            problems.append(f"{n} {what}")
    ops = sql(url, "select status, count(*) as n, sum(attempts) as attempts from zerfaux.operations group by status")
    by_status = {r["status"]: int(r["n"]) for r in ops}
    return Audit(
        operations=sum(by_status.values()),
        attempts=sum(int(r["attempts"] or 0) for r in ops),
        by_status=by_status,
        lost=lost,
        duplicated=duplicated,
        retries_adopted=effects[("vm.dr_shell", "adopted")] + effects[("replication.run", "already-there")]
        + effects[("vm.storage_vmotion", "already-there")],
        effects=effects,
        problems=problems,
    )


def dump(path: Path, figures: dict[str, Any]) -> None:
    """Figures of a run, kept beside the test's temporary files for docs/reliability.md."""
    path.write_text(json.dumps(figures, indent=2, default=str))
