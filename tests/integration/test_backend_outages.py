"""Backend outages with real backends (issue 7, scenario 2): the vCenter simulator, or the DR
host's sshd, is down while operations run through the dispatcher (ZERFAUX_USE_STUBS=false).

Every attempt fails transiently and is retried with backoff; the row says so while it waits
("attempt N of M failed, next attempt at …"); after max_attempts the operation fails with an error
naming the unreachable host. When the service comes back before the attempts run out, the next
attempt succeeds and the effect happens once. Each test starts its own simulator or sshd, so
stopping it disturbs no other test. Figures: docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from tests.integration.conftest import GROUP, PRIMARY, TARGET, add_vm, protect
from tests.integration.test_zfs_backend import MiB, guids, write
from tests.support.engine import engine_settings, running
from tests.support.pg import Database
from tests.support.vcsim import SOURCE_DS, Simulator, start_simulator
from tests.support.zfs import Sshd, mountpoint, sshd_running
from tests.support.zfshost import ZFSHost

SIM_ARGS = ("-cluster", "1", "-host", "1", "-vm", "2", "-standalone-host", "0")
# Backoff 0.5 s, 1 s, 2 s, 4 s (+ jitter): time to bring a service back after attempt 2.
RETRY = {"ZERFAUX_RETRY_BASE_SECONDS": "0.5", "ZERFAUX_RETRY_MAX_SECONDS": "5"}


async def _watch(db: Database, query: str, params: tuple[Any, ...], done: Callable[[Any], bool],
                 timeout: float, seen: list[Any]) -> Any:
    """Poll ``query`` until ``done(value)``, recording every distinct value seen on the way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = db.value(query, params)
        if not seen or seen[-1] != value:
            seen.append(value)
        if done(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not done within {timeout}s; seen: {seen!r}")


def _figures(tmp_path: Path, figures: dict[str, Any]) -> None:
    out = Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "outages_real.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps(figures, default=str) + "\n")


def _retry_texts(seen: list[Any]) -> list[str]:
    return [s.split(" failed, next attempt")[0] for s in seen if isinstance(s, str) and " failed, next attempt at " in s]


# --- the vCenter simulator stopped -----------------------------------------------------------

class Outage:
    """A simulator of the test's own behind the primary vCenter row, stopped and started at will."""

    def __init__(self, binary: str, db: Database, tmp_path: Path) -> None:
        self.binary, self.db, self.dir = binary, db, tmp_path
        self.secrets = tmp_path / "secrets"
        self.secrets.mkdir(mode=0o700)
        self.bundle = tmp_path / "ca.pem"
        self.sim: Simulator | None = None
        self.port = 0
        self.start()
        self.env = {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(self.secrets),
                    "ZERFAUX_VCENTER_CA_BUNDLE": str(self.bundle), **RETRY}

    def start(self) -> Simulator:
        """Same inventory (morefs are deterministic); a new password and certificate, written
        where the listener reads them at each login. A new port too, switched to in the row only
        once the secrets are written: on the old port a retry could log in between the
        simulator's start and the write and be refused for good (a wrong password or
        certificate is a permanent error), which is not the outage under test."""
        sim = start_simulator(self.binary, "outage", self.dir, datastores={SOURCE_DS: self.dir / "protect"},
                              args=SIM_ARGS)
        self.sim, self.port = sim, sim.port
        (self.secrets / "outage-password").write_text(sim.password)
        self.bundle.write_text(Path(sim.cert_file).read_text())
        self.db.sql("update vcenters set host = %s, port = %s, username = %s, password_secret = 'outage-password',"
                    " verify_tls = true where id = %s", (sim.host, sim.port, sim.username, PRIMARY))
        return sim

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.stop()


@pytest.fixture
def outage(world: Database, vcsim_binary: str, tmp_path: Path) -> Iterator[Outage]:
    o = Outage(vcsim_binary, world, tmp_path)
    try:
        yield o
    finally:
        o.stop()


def _vm_off_the_protection_datastore(sim: Simulator) -> Any:
    return next(v for v in sim.find(vim.VirtualMachine) if SOURCE_DS not in [d.name for d in v.datastore])


async def test_vcenter_down_retries_then_fails_in_words(outage: Outage, tmp_path: Path) -> None:
    db = outage.db
    assert outage.sim is not None
    vm = _vm_off_the_protection_datastore(outage.sim)
    protected = protect(db, add_vm(db, name=vm.name, moref=vm._moId, datastore="LocalDS_0"))
    outage.stop()
    started = time.monotonic()
    db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    db.sql("update protected_vms set needs_storage_vmotion = true where id = %s", (protected,))
    db.sql("update zerfaux.operations set max_attempts = 3")
    sync_seen: list[Any] = []
    move_seen: list[Any] = []
    async with running(engine_settings(db.url, **outage.env)):
        await asyncio.gather(
            _watch(db, "select last_sync_error from vcenters where id = %s", (PRIMARY,),
                   lambda e: bool(e) and e.startswith("failed after"), 60, sync_seen),
            _watch(db, "select last_error from protected_vms where id = %s", (protected,),
                   lambda e: bool(e) and e.startswith("failed after"), 60, move_seen),
        )
    elapsed = time.monotonic() - started
    ops = {o["kind"]: o for o in db.sql("select * from zerfaux.operations")}
    where = f"vCenter 'vc-primary' (127.0.0.1:{outage.port}) cannot be reached"
    for kind, seen in (("vcenter.sync", sync_seen), ("vm.storage_vmotion", move_seen)):
        op = ops[kind]
        assert (op["status"], op["attempts"]) == ("failed", 3), op
        assert op["last_error"].startswith(f"failed after 3 attempts: {where}"), op["last_error"]
        assert seen[-1] == op["last_error"]
        assert _retry_texts(seen) == ["attempt 1 of 3", "attempt 2 of 3"], seen
    assert db.value("select needs_storage_vmotion from protected_vms where id = %s", (protected,)) is True
    _figures(tmp_path, {"case": "vcenter down", "operations": 2, "attempts": 6, "seconds": round(elapsed, 2),
                        "final": ops["vm.storage_vmotion"]["last_error"]})


async def test_vcenter_back_before_the_attempts_run_out_and_the_work_succeeds(outage: Outage, tmp_path: Path) -> None:
    db = outage.db
    assert outage.sim is not None
    vm = _vm_off_the_protection_datastore(outage.sim)
    protected = protect(db, add_vm(db, name=vm.name, moref=vm._moId, datastore="LocalDS_0"))
    outage.stop()
    db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    db.sql("update protected_vms set needs_storage_vmotion = true where id = %s", (protected,))
    seen: list[Any] = []
    async with running(engine_settings(db.url, **outage.env)):
        await _watch(db, "select last_error from protected_vms where id = %s", (protected,),
                     lambda e: bool(e) and e.startswith("attempt 2 failed"), 60, seen)
        sim = outage.start()
        back = time.monotonic()
        await _watch(db, "select status from zerfaux.operations where kind = 'vm.storage_vmotion'", (),
                     lambda s: s in ("succeeded", "failed"), 60, [])
        await _watch(db, "select status from zerfaux.operations where kind = 'vcenter.sync'", (),
                     lambda s: s in ("succeeded", "failed"), 60, [])
        recovered = time.monotonic() - back
    ops = {o["kind"]: o for o in db.sql("select * from zerfaux.operations")}
    # The vMotion's second failure is what the test waited for; the sync ran beside it and may
    # have failed only once before the simulator came back (the two are not in lockstep).
    minimum = {"vcenter.sync": 2, "vm.storage_vmotion": 3}
    for kind in ("vcenter.sync", "vm.storage_vmotion"):
        op = ops[kind]
        assert op["status"] == "succeeded" and minimum[kind] <= op["attempts"] <= 5, \
            (kind, op["status"], op["attempts"], op["last_error"])
    assert ops["vm.storage_vmotion"]["result"]["relocated"] is True
    assert sim.vm_datastores(vm._moId) == [SOURCE_DS]
    # Not vcenter_vms.datastore: the sync may run after the move, and vcsim's relocation leaves
    # the VM's file paths (which the sync reads the primary datastore from) where they were.
    row = db.one("select needs_storage_vmotion, last_error from protected_vms where id = %s", (protected,))
    assert (row["needs_storage_vmotion"], row["last_error"]) == (False, None)
    vc = db.one("select last_synced_at, last_sync_error from vcenters where id = %s", (PRIMARY,))
    assert vc["last_synced_at"] is not None and vc["last_sync_error"] is None
    assert _retry_texts(seen)[:2] == ["attempt 1", "attempt 2"], seen
    _figures(tmp_path, {"case": "vcenter back", "attempts": {k: o["attempts"] for k, o in ops.items()},
                        "recovered_seconds": round(recovered, 2)})


# --- the DR host's sshd stopped --------------------------------------------------------------

def _restart_sshd(sshd: Sshd) -> subprocess.Popen[bytes]:
    """The same sshd again: same port, host key and authorized key (its directory is kept)."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    with open(os.path.join(sshd.directory, "sshd.log"), "ab") as log:
        proc = subprocess.Popen([binary, "-D", "-e", "-f", os.path.join(sshd.directory, "sshd_config")], stderr=log)
    for _ in range(200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", sshd.port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("sshd did not come back")


class DownTarget:
    def __init__(self, db: Database, sshd: Sshd, source: str, root: str, env: dict[str, str]) -> None:
        self.db, self.sshd, self.source, self.root, self.env = db, sshd, source, root, env
        self.restarted: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{self.root}/{self.source.rsplit('/', 1)[1]}"


@pytest.fixture
def down_target(world: Database, zfs_workdir: str, zfs_source: ZFSHost, zfs_target: ZFSHost,
                tmp_path: Path) -> Iterator[DownTarget]:
    if not zfs_source.local:
        pytest.skip("a source on the listener's machine is needed")
    tag = uuid.uuid4().hex[:8]
    source, root = f"{zfs_source.pool}/out{tag}", f"{zfs_target.pool}/outdr{tag}"
    zfs_source.run(["zfs", "create", "-o", f"mountpoint={mountpoint('out-' + tag)}", source])
    zfs_target.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    with sshd_running(zfs_workdir) as sshd:  # this test's own sshd in front of the DR pool
        secrets = tmp_path / "secrets"
        secrets.mkdir(mode=0o700)
        (secrets / "dr-key").write_text(sshd.private_key)
        (secrets / "dr-key").chmod(0o600)
        world.sql("update replication_targets set ssh_host = '127.0.0.1', ssh_port = %s, ssh_user = 'root',"
                  " ssh_key_secret = 'dr-key', ssh_host_key = %s, target_root = %s, transport = 'ssh' where id = %s",
                  (sshd.port, sshd.host_key, root, TARGET))
        world.sql("update protection_groups set source_dataset = %s, rpo_minutes = null where id = %s", (source, GROUP))
        down = DownTarget(world, sshd, source, root,
                          {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets), **RETRY})
        sshd.process.terminate()
        sshd.process.wait(10)
        try:
            yield down
        finally:
            if down.restarted is not None:
                down.restarted.terminate()
                down.restarted.wait(10)
    zfs_source.run(["zfs", "destroy", "-r", source], check=False)
    zfs_target.run(["zfs", "destroy", "-r", root], check=False)


async def test_dr_sshd_down_retries_then_fails_in_words(down_target: DownTarget, zfs_source: ZFSHost,
                                                        zfs_target: ZFSHost, tmp_path: Path) -> None:
    db = down_target.db
    job = db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    db.sql("update zerfaux.operations set max_attempts = 3")
    seen: list[Any] = []
    started = time.monotonic()
    async with running(engine_settings(db.url, **down_target.env)):
        await _watch(db, "select error from replication_jobs where id = %s", (job,),
                     lambda e: bool(e) and e.startswith("failed after"), 60, seen)
    elapsed = time.monotonic() - started
    row = db.one("select status, attempts, error from replication_jobs where id = %s", (job,))
    assert (row["status"], row["attempts"]) == ("failed", 3), row
    assert f"127.0.0.1:{down_target.sshd.port}" in row["error"] and "cannot reach" in row["error"], row["error"]
    assert _retry_texts(seen) == ["attempt 1 of 3", "attempt 2 of 3"], seen
    op = db.one("select status, attempts, last_error from zerfaux.operations where kind = 'replication.run'")
    assert (op["status"], op["attempts"], op["last_error"]) == ("failed", 3, row["error"])
    assert guids(zfs_source, down_target.source) == {}  # no snapshot made while the target was unreachable
    assert zfs_target.run(["zfs", "list", down_target.target], check=False).returncode != 0
    _figures(tmp_path, {"case": "sshd down", "attempts": 3, "seconds": round(elapsed, 2), "final": row["error"]})


async def test_dr_sshd_back_before_the_attempts_run_out_and_the_job_completes(
    down_target: DownTarget, zfs_source: ZFSHost, zfs_target: ZFSHost, tmp_path: Path
) -> None:
    db = down_target.db
    write(zfs_source, down_target.source, "disk-flat.vmdk", 4 * MiB)
    job = db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    seen: list[Any] = []
    async with running(engine_settings(db.url, **down_target.env)):
        await _watch(db, "select error from replication_jobs where id = %s", (job,),
                     lambda e: bool(e) and e.startswith("attempt 2 failed"), 60, seen)
        down_target.restarted = _restart_sshd(down_target.sshd)
        back = time.monotonic()
        await _watch(db, "select status from replication_jobs where id = %s", (job,),
                     lambda s: s in ("completed", "failed"), 120, [])
        recovered = time.monotonic() - back
    row = db.one("select * from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed" and 3 <= row["attempts"] <= 5, row["error"]
    assert _retry_texts(seen)[:2] == ["attempt 1", "attempt 2"], seen
    source_snaps, target_snaps = guids(zfs_source, down_target.source), guids(zfs_target, down_target.target)
    assert list(source_snaps) == [row["snapshot_name"]]  # one snapshot: made once, by the attempt that got through
    assert target_snaps[row["snapshot_name"]] == source_snaps[row["snapshot_name"]]
    _figures(tmp_path, {"case": "sshd back", "attempts": row["attempts"], "recovered_seconds": round(recovered, 2)})


async def test_dr_sshd_down_90_seconds_with_default_retries_and_the_job_completes(
    down_target: DownTarget, zfs_source: ZFSHost, zfs_target: ZFSHost, tmp_path: Path
) -> None:
    """Issue 11 §3: an outage of minutes does not fail work. Default retry settings (backoff
    from 2 s up to 300 s, an hour's window, no count cap): five attempts, the old cap, pass
    inside the outage, and the job still completes once sshd is back."""
    db = down_target.db
    write(zfs_source, down_target.source, "disk-flat.vmdk", 4 * MiB)
    job = db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (GROUP,))
    # The defaults, over the fast ones the other tests use.
    env = {**down_target.env, "ZERFAUX_RETRY_BASE_SECONDS": "2", "ZERFAUX_RETRY_MAX_SECONDS": "300"}
    settings = engine_settings(db.url, **env)
    assert (settings.retry_base_seconds, settings.retry_max_seconds, settings.retry_window_seconds) == (2, 300, 3600)
    seen: list[Any] = []
    async with running(settings):
        started = time.monotonic()
        while time.monotonic() - started < 90:
            value = db.value("select error from replication_jobs where id = %s", (job,))
            if not seen or seen[-1] != value:
                seen.append(value)
            await asyncio.sleep(0.1)
        down_target.restarted = _restart_sshd(down_target.sshd)
        await _watch(db, "select status from replication_jobs where id = %s", (job,),
                     lambda s: s in ("completed", "failed"), 240, [])
    row = db.one("select * from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed" and row["next_attempt_at"] is None, row["error"]
    assert row["attempts"] >= 6, row  # past the old cap of 5
    texts = _retry_texts(seen)
    assert texts[:5] == [f"attempt {n}" for n in range(1, 6)], seen
    source_snaps, target_snaps = guids(zfs_source, down_target.source), guids(zfs_target, down_target.target)
    assert target_snaps[row["snapshot_name"]] == source_snaps[row["snapshot_name"]]
    _figures(tmp_path, {"case": "sshd down 90 s, default retries", "attempts": row["attempts"]})
