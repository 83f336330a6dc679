"""Reliability: the Postgres server itself stopped and started mid-run (issue 7, scenario 4).

The listener keeps running, /readyz says the store is gone while it is, and every operation
converges once the server is back: nothing lost, nothing left running.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import add_groups, queue_jobs
from tests.support.engine import spawn
from tests.support.pg import Database, admin_url
from tests.support.require import missing


def _cluster() -> tuple[str, str]:
    if not shutil.which("pg_ctlcluster") or not Path("/etc/postgresql").is_dir():
        missing("pg_ctlcluster", "the Debian Postgres cluster tools are needed to restart the server")
    if "127.0.0.1:5432" not in admin_url() and "localhost:5432" not in admin_url():
        missing("local Postgres cluster", f"the test database {admin_url()} is not the local cluster")
    version = sorted(Path("/etc/postgresql").iterdir(), key=lambda p: p.name)[-1].name
    return version, "main"


def _ctl(action: str) -> None:
    version, name = _cluster()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action], check=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError("did not happen in time")


@pytest.fixture
def cluster_restored() -> Iterator[None]:
    _cluster()
    yield
    _ctl("start") if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"]).returncode else None


def test_the_listener_rides_out_a_database_restart_and_readyz_reports_it(world: Database, cluster_restored: None) -> None:
    port = _free_port()
    proc = spawn(world.url, "run", env={"ZERFAUX_STUB_SECONDS": "1", "ZERFAUX_HTTP_PORT": str(port),
                                        "ZERFAUX_HTTP_HOST": "127.0.0.1", "ZERFAUX_SWEEP_SECONDS": "1"})
    ready = f"http://127.0.0.1:{port}/readyz"
    try:
        _wait(lambda: httpx.get(ready, timeout=2).status_code == 200, 60)
        queue_jobs(world, add_groups(world, 6))
        _wait(lambda: world.value("select count(*) from replication_jobs where status = 'running'") > 0, 30)

        _ctl("stop")
        outage = httpx.get(ready, timeout=10)
        assert outage.status_code == 503, outage.text
        assert "store" in outage.text.lower()
        time.sleep(3)  # long enough for heartbeats and claims to fail and be retried
        assert proc.poll() is None, "the listener died during the outage"
        _ctl("start")

        _wait(lambda: httpx.get(ready, timeout=2).status_code == 200, 60)
        world.sql("update vcenters set sync_requested_at = now()")
        _wait(lambda: world.value("select count(*) from replication_jobs where status = 'completed'") == 6, 120)
        _wait(lambda: world.value("select count(*) from vcenters where last_synced_at is not null") == 2, 60)
        assert world.value("select count(*) from zerfaux.operations where status not in ('succeeded')") == 0
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
