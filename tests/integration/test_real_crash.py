"""SIGKILL a `zerfaux run` listener with real backends (ZERFAUX_USE_STUBS=false) in the middle of a
vm.dr_shell and of a vm.storage_vmotion against vcsim (issue 7, scenario 1, real backends).

The simulators answer every SOAP call after a delay, so an operation takes several seconds and
the kill lands where it hurts most: after vCenter has made the change (the DR VM exists, the VM
is on the new datastore) and before the listener has written it back. Another listener, already
running, takes the operation over once the lease expires and finishes it: the DR shell is
adopted, never created twice (VMs counted through vcsim's API), the relocation is found done,
no row is left 'running'. The replication counterpart (SIGKILL mid-send on zfs-fuse) is
tests/integration/test_zfs_dispatch.py::test_sigkill_mid_send_then_the_retry_completes_with_identical_data.
Figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from tests.integration.conftest import DR, PRIMARY, add_vm, protect
from tests.support.pg import Database
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator, start_simulator
from tests.support.workload import Proc

pytestmark = pytest.mark.vcsim

LEASE, SWEEP = 2.0, 0.5
DELAY_MS = 300  # per SOAP call while the victim works: each operation spans a dozen calls


@pytest.fixture(scope="module")
def slow_pair(vcsim_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Simulator, Simulator]]:
    """A source and a DR simulator of this module's own: their delay changes disturb nobody."""
    workdir = tmp_path_factory.mktemp("vcsim-crash")
    source = start_simulator(vcsim_binary, "crash-src", workdir, datastores={SOURCE_DS: workdir / "protect"})
    dr = start_simulator(vcsim_binary, "crash-dr", workdir, datastores={DR_DS: workdir / "replica",
                                                                    PLACEHOLDER_DS: workdir / "placeholder"})
    try:
        yield source, dr
    finally:
        source.stop()
        dr.stop()


@dataclass
class Setup:
    db: Database
    env: dict[str, str]


@pytest.fixture
def setup(world: Database, slow_pair: tuple[Simulator, Simulator], tmp_path: Path) -> Iterator[Setup]:
    source, dr = slow_pair
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    bundle = tmp_path / "ca.pem"
    bundle.write_text(Path(source.cert_file).read_text() + Path(dr.cert_file).read_text())
    for vc_id, sim in ((PRIMARY, source), (DR, dr)):
        (secrets / f"{sim.name}-password").write_text(sim.password)
        world.sql("update vcenters set host = %s, port = %s, username = %s, password_secret = %s,"
                  " verify_tls = true where id = %s", (sim.host, sim.port, sim.username, f"{sim.name}-password", vc_id))
    world.sql("update replication_targets set placeholder_datastore = %s", (PLACEHOLDER_DS,))
    env = {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets), "ZERFAUX_VCENTER_CA_BUNDLE": str(bundle),
           "ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": str(SWEEP)}
    try:
        yield Setup(world, env)
    finally:
        source.set_delay(0)
        dr.set_delay(0)


def _until(check: Callable[[], Any], timeout: float, what: str, procs: list[Proc], interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    tails = "\n---\n".join(p.output[-3000:] for p in procs)
    raise AssertionError(f"{what}: not within {timeout}s\n{tails}")


def _crash_and_rescue(s: Setup, sim: Simulator, flip: str, subject: str, kind: str,
                      effect_done: Callable[[], bool]) -> dict[str, Any]:
    """Start the victim, ask for the work, SIGKILL the victim once ``effect_done``, let a rescuer finish."""
    victim = Proc(s.db.url, "run", env={**s.env, "ZERFAUX_WORKER_ID": "victim"})
    rescuer: Proc | None = None
    procs = [victim]
    try:
        victim.wait_for_line("listening as")
        sim.set_delay(DELAY_MS)
        s.db.sql(flip, (subject,))
        _until(lambda: any(f"kind={kind}" in line and "claimed" in line for line in victim.lines), 60,
               "the victim claims the operation", procs)
        rescuer = Proc(s.db.url, "run", env={**s.env, "ZERFAUX_WORKER_ID": "rescuer"})
        procs.append(rescuer)
        rescuer.wait_for_line("listening as")
        _until(effect_done, 90, "vCenter made the change", procs)
        victim.kill()
        killed_at = time.monotonic()
        sim.set_delay(0)
        op = s.db.one("select status, worker_id, attempts from zerfaux.operations where kind = %s", (kind,))
        # The kill landed mid-operation: vCenter changed, nothing written back.
        assert (op["status"], op["worker_id"], op["attempts"]) == ("running", "victim", 1), op
        _until(lambda: s.db.value("select status from zerfaux.operations where kind = %s", (kind,))
               in ("succeeded", "failed"), LEASE + SWEEP + 90, "the rescuer finishes", procs, interval=0.05)
        recovered = time.monotonic() - killed_at
    finally:
        victim.stop()
        code = rescuer.stop() if rescuer is not None else 0
    assert code == 0, rescuer.output[-3000:] if rescuer else ""
    op = s.db.one("select * from zerfaux.operations where kind = %s", (kind,))
    assert (op["status"], op["attempts"], op["worker_id"]) == ("succeeded", 2, "rescuer"), op["last_error"]
    assert s.db.value("select count(*) from zerfaux.operations where status in ('queued', 'running')") == 0
    return {"kind": kind, "recovered_seconds": round(recovered, 2), "result": op["result"]}


def _figures(tmp_path: Path, figures: dict[str, Any]) -> None:
    out = Path(os.environ.get("ZERFAUX_FIGURES_DIR", tmp_path)) / "crash_real.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps(figures, default=str) + "\n")


def test_a_listener_killed_after_create_vm_leaves_one_dr_shell(
    setup: Setup, slow_pair: tuple[Simulator, Simulator], tmp_path: Path
) -> None:
    _, dr = slow_pair
    name = f"crash-{uuid.uuid4().hex[:6]}"
    dr.add_replica(name, stem=name)
    vm_id = add_vm(setup.db, name=name, moref=f"vm-{name}", datastore=SOURCE_DS)
    protected = protect(setup.db, vm_id)
    vms_before = len(dr.find(vim.VirtualMachine))
    # vcsim writes the new VM's .vmx into the placeholder datastore's directory as CreateVM_Task runs: the
    # moment it is there the VM exists, and the victim still has five delayed calls to go.
    vmx = dr.datastore_dirs[PLACEHOLDER_DS] / f"zerfaux-{protected}" / f"{name}-dr.vmx"

    figures = _crash_and_rescue(setup, dr, "update protected_vms set needs_dr_shell = true where id = %s",
                                str(protected), "vm.dr_shell", vmx.exists)

    row = setup.db.one("select * from protected_vms where id = %s", (protected,))
    assert (row["needs_dr_shell"], row["dr_shell_vm_created"], row["last_error"]) == (False, True, None)
    assert figures["result"]["adopted"] is True  # the rescuer found the victim's VM by its mark
    assert dr.count_vms_named(f"{name}-dr") == 1
    assert len(dr.find(vim.VirtualMachine)) == vms_before + 1
    assert dr.vm(row["dr_shell_vm_id"]).name == f"{name}-dr"
    _figures(tmp_path, figures)


def test_a_listener_killed_after_relocate_vm_leaves_the_vm_moved_once(
    setup: Setup, slow_pair: tuple[Simulator, Simulator], tmp_path: Path
) -> None:
    source, _ = slow_pair
    target = next(ds for ds in source.find(vim.Datastore) if ds.name == SOURCE_DS)
    vm = next(v for v in source.find(vim.VirtualMachine)
              if v.name.startswith("DC0_C0_") and target._moId not in {d._moId for d in v.datastore})
    vm_id = add_vm(setup.db, name=vm.name, moref=vm._moId, datastore="LocalDS_0")
    protected = protect(setup.db, vm_id)

    def moved() -> bool:  # one delayed property read per poll: the relocation window is five calls
        return target._moId in {d._moId for d in source.vm(vm._moId).datastore}

    figures = _crash_and_rescue(setup, source,
                                "update protected_vms set needs_storage_vmotion = true where id = %s",
                                str(protected), "vm.storage_vmotion", moved)

    row = setup.db.one("select p.needs_storage_vmotion, p.last_error, v.datastore from protected_vms p"
                       " join vcenter_vms v on v.id = p.vm_id where p.id = %s", (protected,))
    assert (row["needs_storage_vmotion"], row["last_error"], row["datastore"]) == (False, None, SOURCE_DS)
    assert figures["result"]["relocated"] is False  # found already there: not moved a second time
    assert source.vm_datastores(vm._moId) == [SOURCE_DS]
    _figures(tmp_path, figures)
