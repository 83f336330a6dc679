"""``zerfaux demo``: ask for each kind of work as a frontend would and watch it converge.

A listener runs in the same process, so the demo works alone; a ``make run`` listener running
beside it simply shares the work (the claim decides who does what).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from listener import sqlfile
from listener.config import Settings

DEMO = sqlfile.load(Path(__file__).with_name("demo.sql"))

Row = dict[str, Any]


def print_try_it(url: str, stubs: bool) -> None:
    psql = f'psql "{url}"'
    mode = "stub backends (ZERFAUX_USE_STUBS=true)" if stubs else "REAL backends"
    print(f"""
Zerfaux is listening on the embedded Postgres with {mode}.
In another terminal, ask for work as a frontend would:

  # 1. inventory sync of the primary vCenter
  {psql} -c "update vcenters set sync_requested_at = now() where name = 'vc-primary'"
  # 2. protect a VM and move it onto the protection datastore (Storage vMotion)
  {psql} -c "insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion) select g.id, v.id, true from protection_groups g, vcenter_vms v where g.name = 'gold' and v.name = 'vc-primary-vm-0001'"
  # 3. replicate the group's dataset (watch bytes_transferred grow)
  {psql} -c "insert into replication_jobs (protection_group_id) select id from protection_groups where name = 'gold'"
  {psql} -c "select status, bytes_transferred, bytes_estimated, snapshot_name, error from replication_jobs order by created_at"
  # 4. create the DR shell VM at the DR vCenter
  {psql} -c "update protected_vms set needs_dr_shell = true"
  {psql} -c "select needs_storage_vmotion, dr_shell_vm_created, dr_shell_vm_id, last_error from protected_vms"
  # 5. a test failover of gold at the DR site (map its VM's network first), then its cleanup
  {psql} -c "insert into network_mappings (protection_group_id, source_network, recovery_network) select id, 'VM Network', 'dr-network' from protection_groups where name = 'gold'"
  {psql} -c "insert into recovery_runs (protection_group_id, kind) select id, 'test' from protection_groups where name = 'gold'"
  {psql} -c "select kind, status, rto_seconds, error from recovery_runs order by created_at"
  {psql} -c "insert into recovery_runs (protection_group_id, kind, test_run_id) select protection_group_id, 'cleanup', id from recovery_runs where kind = 'test' and status = 'active'"
  # 6. let gold's 15-minute RPO schedule it (next_replication_at says when)
  {psql} -c "update protection_groups set paused = false where name = 'gold'"
  {psql} -c "select name, rpo_minutes, rpo_status, current_rpo_seconds, next_replication_at from protection_status"
  # cancel a running replication job
  {psql} -c "update replication_jobs set cancel_requested = true where status in ('pending', 'running')"
  # what happened
  .venv/bin/zerfaux status
""", flush=True)


async def _wait_for(
    label: str, poll: Callable[[], Awaitable[Row | None]], done: Callable[[Row], bool],
    describe: Callable[[Row], str], timeout: float,
) -> Row | None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        row = await poll()
        if row is not None:
            line = describe(row)
            if line != last:
                print(f"  {label}: {line}", flush=True)
                last = line
            if done(row):
                return row
        await asyncio.sleep(0.25)
    print(f"  {label}: did not converge within {timeout:.0f}s", flush=True)
    return None


async def _demo(settings: Settings, url: str, timeout: float) -> int:
    from listener.service import build_listener, serve

    listener = build_listener(replace(settings, sweep_seconds=min(settings.sweep_seconds, 2.0)))
    engine = asyncio.create_task(serve(listener))
    steps = asyncio.create_task(_steps(url, timeout))
    try:
        # A listener that cannot start (another mode's database, no backends) ends the demo at
        # once with its reason, instead of every step waiting out its timeout.
        await asyncio.wait({engine, steps}, return_when=asyncio.FIRST_COMPLETED)
        if engine.done() and not steps.done():
            engine.result()
        failures = await steps
    finally:
        steps.cancel()
        listener.dispatcher.stop()
        await engine
    print("demo: everything converged" if not failures else f"demo: {failures} step(s) did not converge")
    return 0 if not failures else 1


async def _steps(url: str, timeout: float) -> int:
    """Ask for each kind of work in turn; answer how many steps did not converge."""
    failures = 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as db:

        async def one(name: str, **params: Any) -> Row | None:
            cur = await db.execute(DEMO[name], params)
            return await cur.fetchone()

        print("1. inventory sync of vc-primary", flush=True)
        await db.execute(DEMO["request_sync"])
        row = await _wait_for(
            "vcenters", lambda: one("sync_state"),
            lambda r: bool(r["done"]) or bool(r["last_sync_error"]),
            lambda r: f"{r['vms']} VMs" + (f", error: {r['last_sync_error']}" if r["last_sync_error"] else ""),
            timeout,
        )
        failures += row is None or bool(row["last_sync_error"])

        print("2. protect vc-primary-vm-0001 and Storage vMotion it", flush=True)
        protected = await one("protect_vm")
        if protected is None:
            print("  no VM named vc-primary-vm-0001: the sync did not bring it", flush=True)
            return 1
        pid = protected["id"]
        row = await _wait_for(
            "protected_vms", lambda: one("vmotion_state", id=pid),
            lambda r: not r["needs_storage_vmotion"] or bool(r["last_error"]),
            lambda r: f"needs_storage_vmotion={r['needs_storage_vmotion']} datastore={r['datastore']}"
            + (f" error: {r['last_error']}" if r["last_error"] else ""),
            timeout,
        )
        failures += row is None or bool(row["last_error"])

        print("3. replicate the gold group's dataset", flush=True)
        job = await one("insert_job")
        assert job is not None
        row = await _wait_for(
            "replication_jobs", lambda: one("job_state", id=job["id"]),
            lambda r: r["status"] in ("completed", "failed", "cancelled"),
            lambda r: f"{r['status']} {r['bytes_transferred']}/{r['bytes_estimated'] or '?'} bytes"
            + (f" snapshot {r['snapshot_name']}" if r["snapshot_name"] else "")
            + (f" error: {r['error']}" if r["error"] else ""),
            timeout,
        )
        failures += row is None or row["status"] != "completed"

        print("4. create the DR shell VM", flush=True)
        await db.execute(DEMO["request_dr_shell"], {"id": pid})
        row = await _wait_for(
            "protected_vms", lambda: one("dr_shell_state", id=pid),
            lambda r: bool(r["dr_shell_vm_created"]) or bool(r["last_error"]),
            lambda r: f"dr_shell_vm_created={r['dr_shell_vm_created']} dr_shell_vm_id={r['dr_shell_vm_id']}"
            + (f" error: {r['last_error']}" if r["last_error"] else ""),
            timeout,
        )
        failures += row is None or not row["dr_shell_vm_created"]

        failures += await _test_failover(one)

        print("7. a group with a one-minute RPO replicates by itself (twice: about 35 s)", flush=True)
        group = await one("add_scheduled_group")
        assert group is not None
        row = await _wait_for(
            "every-minute", lambda: one("scheduled_state", id=group["id"], since=group["since"]),
            lambda r: int(r["replicated"]) >= 2 or int(r["failed"]) > 0,
            lambda r: f"{r['replicated']} scheduled replication(s) done, next at {r['next_at'] or '-'}"
            + (f", {r['failed']} failed" if r["failed"] else "")
            + (f", RPO {r['rpo_status']}" if r["rpo_status"] else ""),
            max(timeout, 90.0),
        )
        failures += row is None or int(row["replicated"]) < 2
    return failures


def _describe_run(r: Row) -> str:
    line = f"{r['status']}, {r['finished']}/{r['steps']} steps" + (f" (now {r['current']})" if r["current"] else "")
    if r["rto_seconds"] is not None:
        line += f", RTO {float(r['rto_seconds']):.1f} s"
    return line + (f", error: {r['error']}" if r["error"] else "")


async def _test_failover(one: Callable[..., Awaitable[Row | None]], timeout: float = 120.0) -> int:
    """A test failover of gold (the VM just replicated, booted at the DR site from a clone, on an
    isolated port group), then its cleanup; answers how many of the two did not converge."""
    print("5. test failover of gold at the DR site (recovery_runs kind 'test')", flush=True)
    await one("map_networks")
    test = await one("insert_test_run")
    assert test is not None
    row = await _wait_for("recovery_runs", lambda: one("run_state", id=test["id"]),
                          lambda r: r["status"] in ("active", "failed", "cancelled"), _describe_run, timeout)
    if row is None or row["status"] != "active":
        return 2
    print(f"  the test is up: RTO {float(row['rto_seconds']):.1f} s (see zerfaux report run {test['id']})", flush=True)
    print("6. clean the test up (recovery_runs kind 'cleanup')", flush=True)
    cleanup = await one("insert_cleanup_run", id=test["id"])
    assert cleanup is not None
    row = await _wait_for("recovery_runs", lambda: one("run_state", id=cleanup["id"]),
                          lambda r: r["status"] in ("completed", "failed", "cancelled"),
                          lambda r: _describe_run(r) + (f", point tested at {r['tested_at']:%H:%M:%S}"
                                                        if r["tested_at"] else ""), timeout)
    return int(row is None or row["status"] != "completed")


def run_demo(settings: Settings, url: str, timeout: float) -> int:
    return asyncio.run(_demo(settings, url, timeout))
