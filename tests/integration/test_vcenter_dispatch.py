"""vCenter operations through the real dispatcher with ZERFAUX_USE_STUBS=false: rows in, vcsim changed.

The seed's two vCenter rows are pointed at the session's simulators (source and DR); each test
asserts the rows the engine wrote AND the simulator's own state.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pyVmomi import vim

from tests.integration.conftest import DR, GROUP, PRIMARY, add_vm, operations, protect
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator

pytestmark = pytest.mark.vcsim


@dataclass
class Real:
    db: Database
    env: dict[str, str]
    secrets_dir: Path

    async def drain(self) -> None:
        await drain(engine_settings(self.db.url, **self.env), timeout=120)


@pytest.fixture
def real(world: Database, vcsim_source: Simulator, vcsim_dr: Simulator, tmp_path: Path) -> Iterator[Real]:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    bundle = tmp_path / "vcenter-ca.pem"  # both simulators' certificates, as a site's CA bundle would hold
    bundle.write_text(Path(vcsim_source.cert_file).read_text() + Path(vcsim_dr.cert_file).read_text())
    for vc_id, sim in ((PRIMARY, vcsim_source), (DR, vcsim_dr)):
        secret = f"vcsim-{sim.name}-password"
        (secrets / secret).write_text(sim.password)
        world.sql(
            "update vcenters set host = %s, port = %s, username = %s, password_secret = %s, verify_tls = true"
            " where id = %s",
            (sim.host, sim.port, sim.username, secret, vc_id),
        )
    world.sql("update replication_targets set placeholder_datastore = %s", (PLACEHOLDER_DS,))
    env = {
        "ZERFAUX_USE_STUBS": "false",
        "ZERFAUX_SECRETS_DIR": str(secrets),
        "ZERFAUX_VCENTER_CA_BUNDLE": str(bundle),
    }
    yield Real(world, env, secrets)


def _oracle_vms(sim: Simulator) -> dict[str, Any]:
    return {vm._moId: vm for vm in sim.find(vim.VirtualMachine)}


async def test_sync_writes_what_the_vcenter_holds(real: Real, vcsim_source: Simulator) -> None:
    real.db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    await real.drain()

    vc = real.db.one("select last_synced_at, last_sync_error from vcenters where id = %s", (PRIMARY,))
    assert vc["last_synced_at"] is not None and vc["last_sync_error"] is None
    rows = {r["moref"]: r for r in real.db.sql("select * from vcenter_vms where vcenter_id = %s", (PRIMARY,))}
    oracle = _oracle_vms(vcsim_source)
    assert set(rows) == set(oracle)
    for moref, vm in oracle.items():
        row = rows[moref]
        assert (row["name"], row["esx_host"]) == (vm.name, vm.runtime.host.name)
        assert row["power_state"] == vm.runtime.powerState
        assert row["num_cpu"] == vm.config.hardware.numCPU and row["memory_mb"] == vm.config.hardware.memoryMB
        assert [d["controller"] for d in row["disks"]] == ["pvscsi"]
    datastores = {r["name"] for r in real.db.sql("select name from vcenter_datastores where vcenter_id = %s",
                                                 (PRIMARY,))}
    assert datastores == {ds.name for ds in vcsim_source.find(vim.Datastore)}


async def test_storage_vmotion_moves_the_vm_and_the_row(real: Real, vcsim_source: Simulator) -> None:
    real.db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    await real.drain()
    target = next(
        vm for vm in vcsim_source.find(vim.VirtualMachine)
        if vm.name.startswith("DC0_C1_") and [ds.name for ds in vm.datastore] != [SOURCE_DS]
    )
    vm_id = real.db.value("select id from vcenter_vms where moref = %s and vcenter_id = %s", (target._moId, PRIMARY))
    protected = protect(real.db, vm_id, needs_storage_vmotion=True)
    await real.drain()

    op = operations(real.db, "vm.storage_vmotion")[-1]
    assert op["status"] == "succeeded", op["last_error"]
    assert op["result"]["relocated"] is True
    assert real.db.value("select needs_storage_vmotion from protected_vms where id = %s", (protected,)) is False
    assert real.db.value("select datastore from vcenter_vms where id = %s", (vm_id,)) == SOURCE_DS
    assert vcsim_source.vm_datastores(target._moId) == [SOURCE_DS]

    real.db.sql("update protected_vms set needs_storage_vmotion = true where id = %s", (protected,))
    await real.drain()
    again = operations(real.db, "vm.storage_vmotion")[-1]
    assert again["status"] == "succeeded" and again["result"]["relocated"] is False


async def test_dr_shell_twice_leaves_one_dr_vm(real: Real, vcsim_dr: Simulator) -> None:
    name = f"app-{uuid.uuid4().hex[:6]}"
    vcsim_dr.add_replica(name, stem=name)  # what replication left at the DR site
    vm_id = add_vm(real.db, name=name, moref=f"vm-{name}", datastore=SOURCE_DS)
    protected = protect(real.db, vm_id, needs_dr_shell=True)
    await real.drain()

    row = real.db.one("select * from protected_vms where id = %s", (protected,))
    assert row["dr_shell_vm_created"] is True and row["needs_dr_shell"] is False, row["last_error"]
    shell = vcsim_dr.vm(row["dr_shell_vm_id"])
    assert shell.name == f"{name}-dr"
    assert vcsim_dr.vm_disk_files(shell._moId) == [f"[{DR_DS}] {name}/{name}.vmdk"]
    assert shell.config.files.vmPathName == f"[{PLACEHOLDER_DS}] zerfaux-{protected}/{name}-dr.vmx"
    assert operations(real.db, "vm.dr_shell")[-1]["result"]["config_path"] == shell.config.files.vmPathName
    assert (shell.config.hardware.numCPU, shell.config.hardware.memoryMB) == (2, 4096)
    assert shell.runtime.powerState == "poweredOff"

    real.db.sql("update protected_vms set needs_dr_shell = true where id = %s", (protected,))
    await real.drain()
    again = real.db.one("select * from protected_vms where id = %s", (protected,))
    assert (again["needs_dr_shell"], again["dr_shell_vm_id"]) == (False, row["dr_shell_vm_id"])
    assert operations(real.db, "vm.dr_shell")[-1]["result"]["adopted"] is True
    assert vcsim_dr.count_vms_named(f"{name}-dr") == 1


async def test_dr_shell_without_replica_fails_in_words(real: Real, vcsim_dr: Simulator) -> None:
    name = f"norepl-{uuid.uuid4().hex[:6]}"
    vm_id = add_vm(real.db, name=name, moref=f"vm-{name}", datastore=SOURCE_DS)
    protected = protect(real.db, vm_id, needs_dr_shell=True)
    await real.drain()

    op = operations(real.db, "vm.dr_shell")[-1]
    assert op["status"] == "failed" and op["attempts"] == 1  # permanent: not retried
    assert "not found" in op["last_error"] and "replicate" in op["last_error"]
    assert real.db.value("select dr_shell_vm_created from protected_vms where id = %s", (protected,)) is False
    assert vcsim_dr.count_vms_named(f"{name}-dr") == 0


async def test_dr_shell_of_a_target_without_placeholder_fails_naming_the_column(real: Real, vcsim_dr: Simulator) -> None:
    """An install from before the column: no new shell, a permanent failure that says what to set."""
    real.db.sql("update replication_targets set placeholder_datastore = null")
    name = f"noph-{uuid.uuid4().hex[:6]}"
    vcsim_dr.add_replica(name, stem=name)
    vm_id = add_vm(real.db, name=name, moref=f"vm-{name}", datastore=SOURCE_DS)
    protected = protect(real.db, vm_id, needs_dr_shell=True)
    await real.drain()

    op = operations(real.db, "vm.dr_shell")[-1]
    assert op["status"] == "failed" and op["attempts"] == 1  # permanent: not retried
    row = real.db.one("select * from protected_vms where id = %s", (protected,))
    assert row["dr_shell_vm_created"] is False
    assert "replication_targets.placeholder_datastore is not set for target 'dr-zfs-01'" in row["last_error"]
    assert f"(not '{DR_DS}', the replica's)" in row["last_error"]
    assert vcsim_dr.count_vms_named(f"{name}-dr") == 0


def test_a_placeholder_equal_to_the_dr_datastore_is_refused(real: Real) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="replication_targets_placeholder_is_not_the_dr_datastore"):
        real.db.sql("update replication_targets set placeholder_datastore = dr_datastore")


async def test_wrong_password_fails_the_sync_in_words(real: Real, vcsim_source: Simulator) -> None:
    (real.secrets_dir / "vcsim-source-password").write_text("not-" + vcsim_source.password)
    real.db.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    await real.drain()

    op = operations(real.db, "vcenter.sync")[-1]
    assert op["status"] == "failed" and op["attempts"] == 1
    error = real.db.value("select last_sync_error from vcenters where id = %s", (PRIMARY,))
    assert error.startswith(f"authentication failed for {vcsim_source.username}@{vcsim_source.host}")
    assert vcsim_source.password not in error and vcsim_source.password not in op["last_error"]


def test_the_group_points_at_the_simulators(real: Real) -> None:
    group = real.db.one("select protection_datastore from protection_groups where id = %s", (GROUP,))
    assert group["protection_datastore"] == SOURCE_DS
    assert real.db.value("select dr_datastore from replication_targets") == DR_DS
