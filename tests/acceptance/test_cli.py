"""The real `zerfaux` CLI in a subprocess, used the way an operator and a frontend would."""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import GROUP, add_groups, queue_jobs
from tests.support.engine import spawn
from tests.support.pg import Database


def wait_for(check, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("did not converge in time")


def finish(proc: subprocess.Popen[str], sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
    """Signal (unless ``sig`` is None), wait, and return the exit code and all output."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_run_converges_rows_a_frontend_inserts_and_stops_cleanly_on_sigterm(seeded_db: Database) -> None:
    db = seeded_db
    proc = spawn(db.url, "run", env={"ZERFAUX_STUB_SECONDS": "0.5"})
    try:
        db.sql("update vcenters set sync_requested_at = now() where name = 'vc-primary'")
        wait_for(lambda: db.value("select count(*) from vcenter_vms") == 50)
        db.sql("insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion, needs_dr_shell)"
               " select %s, id, true, true from vcenter_vms where name = 'vc-primary-vm-0002'", (GROUP,))
        db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
        wait_for(lambda: db.value("select status from replication_jobs") == "completed")
        wait_for(lambda: db.value("select dr_shell_vm_created and not needs_storage_vmotion from protected_vms"))
    finally:
        code, out = finish(proc)
    assert code == 0, out
    assert "kind=replication.run attempt=1 succeeded" in out
    assert "no new claims" in out


def test_run_until_idle_drains_and_exits_zero(seeded_db: Database) -> None:
    queue_jobs(seeded_db, add_groups(seeded_db, 5))
    proc = spawn(seeded_db.url, "run", "--until-idle")
    code, out = finish(proc, sig=None, timeout=60)
    assert code == 0, out
    assert seeded_db.value("select count(*) from replication_jobs where status = 'completed'") == 5


def test_status_shows_the_queue_workers_and_recent_operations(seeded_db: Database) -> None:
    seeded_db.sql("update vcenters set sync_requested_at = now()")
    assert finish(spawn(seeded_db.url, "run", "--until-idle"), sig=None, timeout=60)[0] == 0
    seeded_db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    proc = spawn(seeded_db.url, "status")
    code, out = finish(proc, sig=None, timeout=30)
    assert code == 0, out
    assert re.search(r"vcenter\.sync\s+succeeded\s+2", out)
    assert re.search(r"replication\.run\s+queued\s+1", out)
    assert "Oldest queued operation:" in out and "Live workers" in out
    assert "Mode: stub" in out


def test_an_unreachable_database_stops_start_up_naming_it_without_the_password() -> None:
    proc = spawn("postgresql://zerfaux:hunter2@127.0.0.1:1/nowhere", "run")
    code, out = finish(proc, sig=None, timeout=60)
    assert code == 3, out
    assert "127.0.0.1:1" in out and "zerfaux:***@" in out
    assert "hunter2" not in out


def test_a_bad_setting_is_named_with_its_fix(seeded_db: Database) -> None:
    code, out = finish(spawn(seeded_db.url, "run", env={"ZERFAUX_CONCURRENCY": "lots"}), sig=None, timeout=30)
    assert code == 2 and "ZERFAUX_CONCURRENCY must be a number, got 'lots'" in out


def test_real_backends_missing_their_tools_fail_at_start_saying_what_is_missing(seeded_db: Database, tmp_path: Path) -> None:
    proc = spawn(seeded_db.url, "run", env={"ZERFAUX_USE_STUBS": "false", "PATH": str(tmp_path)})
    code, out = finish(proc, sig=None, timeout=60)
    assert code == 5, out
    assert "ZERFAUX_USE_STUBS=false" in out


@pytest.fixture
def embedded_home() -> Iterator[Path]:
    """A home for the embedded Postgres that its server user can reach: as root, pgserver runs
    Postgres as an unprivileged user, and pytest's own temp dirs are private to root."""
    home = Path(tempfile.mkdtemp(prefix="zerfaux-embedded-", dir="/tmp"))
    home.chmod(0o755)
    yield home / "zf"
    shutil.rmtree(home, ignore_errors=True)


def test_make_run_path_embedded_postgres_prints_commands_that_work(embedded_home: Path) -> None:
    home = embedded_home
    proc = spawn(None, "run", env={"ZERFAUX_HOME": str(home), "ZERFAUX_STUB_SECONDS": "0.2"})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "zerfaux status" in line:
                break
        commands = [l.strip() for l in lines if l.strip().startswith("psql ")]
        assert len(commands) >= 7, "".join(lines)
        sync, protect, replicate, _, dr_shell, _, _ = commands[:7]
        uri = shlex.split(sync)[1]

        def run(command: str) -> None:
            subprocess.run(shlex.split(command), check=True, capture_output=True, timeout=30)

        def query(sql: str) -> str:
            return subprocess.run(["psql", uri, "-Atc", sql], check=True, capture_output=True, text=True).stdout.strip()

        run(sync)
        wait_for(lambda: query("select count(*) from vcenter_vms") == "50", timeout=60)
        run(protect)
        run(replicate)
        wait_for(lambda: query("select status from replication_jobs") == "completed", timeout=60)
        wait_for(lambda: query("select needs_storage_vmotion from protected_vms") == "f", timeout=60)
        run(dr_shell)
        wait_for(lambda: query("select dr_shell_vm_created from protected_vms") == "t", timeout=60)
    finally:
        code, out = finish(proc, timeout=60)
    assert code == 0, "".join(lines) + out


def test_demo_on_the_embedded_default_converges_and_says_so(embedded_home: Path) -> None:
    proc = spawn(None, "demo", env={"ZERFAUX_HOME": str(embedded_home), "ZERFAUX_STUB_SECONDS": "0.5"})
    code, out = finish(proc, sig=None, timeout=180)
    assert code == 0, out
    for step in ("1. inventory sync", "2. protect", "3. replicate", "4. create the DR shell"):
        assert step in out
    assert "replication_jobs: completed" in out and "dr_shell_vm_created=True" in out
    assert "5. test failover of gold" in out and "the test is up: RTO" in out, out
    assert "6. clean the test up" in out and "point tested at" in out, out
    assert "demo: everything converged" in out
