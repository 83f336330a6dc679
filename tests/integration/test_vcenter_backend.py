"""The real vCenter backends against VMware's simulator (vcsim): results checked against vcsim's own state."""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from pyVmomi import vim

from handlers.backends.vcenter.real import (
    DRShellBuilderReal,
    StorageMoverReal,
    VCenterInventoryReal,
    VCenterSessions,
)
from handlers.backends.vcenter.shell import MARK_KEY
from handlers.dr_shell import ShellDisk, ShellSpec
from handlers.errors import OperationCancelled, PermanentError, TransientError
from handlers.secrets import SecretResolver
from handlers.types import VCenterEndpoint
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator

pytestmark = pytest.mark.vcsim


@pytest.fixture
def source_sessions(vcsim_source: Simulator) -> Iterator[VCenterSessions]:
    sessions = VCenterSessions(vcsim_source.secrets(), ca_bundle=vcsim_source.cert_file)
    yield sessions
    sessions.close()


@pytest.fixture
def dr_sessions(vcsim_dr: Simulator) -> Iterator[VCenterSessions]:
    sessions = VCenterSessions(vcsim_dr.secrets(), ca_bundle=vcsim_dr.cert_file)
    yield sessions
    sessions.close()


def shell_spec(protected_vm_id: str, disks: list[str], **changes: object) -> ShellSpec:
    spec = ShellSpec(
        protected_vm_id=protected_vm_id,
        name=f"shell-{protected_vm_id}",
        datastore=DR_DS,
        num_cpu=4,
        memory_mb=3072,
        guest_id="ubuntu64Guest",
        firmware="efi",
        controller="pvscsi",
        disks=tuple(ShellDisk(file=d, capacity=16 << 30) for d in disks),
        placeholder_datastore=PLACEHOLDER_DS,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


# -- inventory --------------------------------------------------------------------------------


def test_inventory_matches_what_vcsim_holds(vcsim_source: Simulator, source_sessions: VCenterSessions) -> None:
    inventory = VCenterInventoryReal(source_sessions).fetch(vcsim_source.endpoint())

    oracle = {vm._moId: vm for vm in vcsim_source.find(vim.VirtualMachine)}
    assert {vm.moref for vm in inventory.vms} == set(oracle)
    for record in inventory.vms:
        vm = oracle[record.moref]
        assert record.name == vm.name
        assert record.instance_uuid == vm.config.instanceUuid
        assert record.power_state == vm.runtime.powerState
        assert record.esx_host == vm.runtime.host.name
        parent = vm.runtime.host.parent
        assert record.cluster == (parent.name if isinstance(parent, vim.ClusterComputeResource) else None)
        assert record.datastore == vm.config.files.vmPathName.split("]")[0].lstrip("[")
        assert set(record.datastores) == {ds.name for ds in vm.datastore}
        assert record.guest_os == vm.config.guestFullName
        assert record.guest_id == vm.config.guestId
        assert record.firmware == vm.config.firmware
        assert record.num_cpu == vm.config.hardware.numCPU
        assert record.memory_mb == vm.config.hardware.memoryMB
        assert set(record.networks) == {n.name for n in vm.network}
        disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        assert [d.file for d in record.disks] == [getattr(d.backing, "fileName", None) for d in disks]
        # vcsim fills only capacityInKB; vCenter fills both.
        assert [d.capacity for d in record.disks] == [d.capacityInBytes or d.capacityInKB * 1024 for d in disks]
        assert all(d.controller == "pvscsi" and d.datastore for d in record.disks)
    clusters = {vm.cluster for vm in inventory.vms}
    assert None in clusters and len(clusters) == 3  # two clusters and a standalone host

    oracle_ds = {ds._moId: ds for ds in vcsim_source.find(vim.Datastore)}
    assert {ds.moref for ds in inventory.datastores} == set(oracle_ds)
    for ds_record in inventory.datastores:
        ds = oracle_ds[ds_record.moref]
        assert (ds_record.name, ds_record.type) == (ds.name, ds.summary.type)
        assert (ds_record.capacity_bytes, ds_record.free_bytes) == (ds.summary.capacity, ds.summary.freeSpace)


@pytest.mark.parametrize("controller", ["pvscsi", "lsilogic", "lsilogic-sas", "buslogic", "nvme", "sata", "ide"])
def test_controller_types_round_trip(
    controller: str, vcsim_dr: Simulator, dr_sessions: VCenterSessions
) -> None:
    disks = vcsim_dr.add_replica(f"ctl-{controller}", disks=2)
    spec = shell_spec(f"ctl-{controller}", disks, controller=controller)
    shell = DRShellBuilderReal(dr_sessions).ensure_shell(vcsim_dr.endpoint(), spec)

    inventory = VCenterInventoryReal(dr_sessions).fetch(vcsim_dr.endpoint())
    record = next(vm for vm in inventory.vms if vm.moref == shell.moref)
    assert [(d.file, d.controller, d.unit, d.datastore) for d in record.disks] == [
        (disks[0], controller, 0, DR_DS),
        (disks[1], controller, 1, DR_DS),
    ]


# -- storage vMotion ----------------------------------------------------------------------------


def test_storage_vmotion_moves_the_vm_then_has_nothing_to_do(
    vcsim_source: Simulator, source_sessions: VCenterSessions
) -> None:
    vm = next(v for v in vcsim_source.find(vim.VirtualMachine) if v.name.startswith("DC0_C0_"))
    assert vcsim_source.vm_datastores(vm._moId) != [SOURCE_DS]
    mover = StorageMoverReal(source_sessions)

    assert mover.relocate(vcsim_source.endpoint(), vm._moId, SOURCE_DS, threading.Event()) is True
    assert vcsim_source.vm_datastores(vm._moId) == [SOURCE_DS]
    assert mover.relocate(vcsim_source.endpoint(), vm._moId, SOURCE_DS, threading.Event()) is False


def test_cancel_before_the_move_starts_leaves_the_vm(
    vcsim_source: Simulator, source_sessions: VCenterSessions
) -> None:
    vm = next(v for v in vcsim_source.find(vim.VirtualMachine) if v.name.startswith("DC0_H0_"))
    before = vcsim_source.vm_datastores(vm._moId)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelled):
        StorageMoverReal(source_sessions).relocate(vcsim_source.endpoint(), vm._moId, SOURCE_DS, cancel)
    assert vcsim_source.vm_datastores(vm._moId) == before != [SOURCE_DS]


def test_unknown_moref_is_permanent(vcsim_source: Simulator, source_sessions: VCenterSessions) -> None:
    with pytest.raises(PermanentError, match=r"VM vm-424242 does not exist .* VMs there: 'DC0_"):
        StorageMoverReal(source_sessions).relocate(
            vcsim_source.endpoint(), "vm-424242", SOURCE_DS, threading.Event()
        )


def test_unknown_datastore_lists_those_that_exist(
    vcsim_source: Simulator, source_sessions: VCenterSessions
) -> None:
    vm = vcsim_source.find(vim.VirtualMachine)[0]
    with pytest.raises(PermanentError) as info:
        StorageMoverReal(source_sessions).relocate(
            vcsim_source.endpoint(), vm._moId, "no-such-ds", threading.Event()
        )
    assert "datastore 'no-such-ds' does not exist" in str(info.value)
    assert "'LocalDS_0'" in str(info.value) and f"'{SOURCE_DS}'" in str(info.value)


# -- DR shell -----------------------------------------------------------------------------------


def test_dr_shell_is_created_once_then_adopted(vcsim_dr: Simulator, dr_sessions: VCenterSessions) -> None:
    spec = shell_spec("pv-0001", [f"[{DR_DS}] dir/disk.vmdk"], network="VM Network")
    builder = DRShellBuilderReal(dr_sessions)

    first = builder.ensure_shell(vcsim_dr.endpoint(), spec)
    assert first.adopted is False
    vm = vcsim_dr.vm(first.moref)
    assert vcsim_dr.vm_disk_files(first.moref) == [f"[{DR_DS}] dir/disk.vmdk"]
    assert (vm.name, vm.config.hardware.numCPU, vm.config.hardware.memoryMB) == (spec.name, 4, 3072)
    assert (vm.config.guestId, vm.config.firmware) == ("ubuntu64Guest", "efi")
    assert vm.runtime.powerState == "poweredOff"
    assert {o.key: o.value for o in vm.config.extraConfig}[MARK_KEY] == "pv-0001"
    assert [n.name for n in vm.network] == ["VM Network"]
    assert sorted(d.name for d in vm.datastore) == sorted([DR_DS, PLACEHOLDER_DS])  # disks, and the .vmx
    controllers = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualSCSIController)]
    assert [type(c) for c in controllers] == [vim.vm.device.ParaVirtualSCSIController]

    second = builder.ensure_shell(vcsim_dr.endpoint(), spec)
    assert (second.moref, second.adopted) == (first.moref, True)
    assert vcsim_dr.count_vms_named(spec.name) == 1


def test_dr_shell_missing_disk_or_network_is_permanent(
    vcsim_dr: Simulator, dr_sessions: VCenterSessions
) -> None:
    builder = DRShellBuilderReal(dr_sessions)
    with pytest.raises(PermanentError, match=r"network 'nope' does not exist .* 'VM Network'"):
        builder.ensure_shell(vcsim_dr.endpoint(), shell_spec("pv-net", [f"[{DR_DS}] dir/disk.vmdk"], network="nope"))
    with pytest.raises(PermanentError, match=r"not found .* replicate"):
        builder.ensure_shell(vcsim_dr.endpoint(), shell_spec("pv-miss", [f"[{DR_DS}] gone/disk.vmdk"]))
    with pytest.raises(PermanentError, match=r"datastore 'nowhere' does not exist .* 'zfs-dr-01'"):
        builder.ensure_shell(vcsim_dr.endpoint(), shell_spec("pv-ds", [], datastore="nowhere"))
    assert vcsim_dr.count_vms_named("shell-pv-net") == 0
    assert vcsim_dr.count_vms_named("shell-pv-ds") == 0


# -- faults, provoked for real --------------------------------------------------------------------


def test_wrong_password_is_permanent_and_never_shown(
    vcsim_source: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng-" + vcsim_source.password
    sessions = VCenterSessions(vcsim_source.secrets(password=wrong), ca_bundle=vcsim_source.cert_file)
    with pytest.raises(PermanentError) as info:
        VCenterInventoryReal(sessions).fetch(vcsim_source.endpoint())
    message = str(info.value)
    assert message.startswith(f"authentication failed for zerfaux@{vcsim_source.host}")
    for text in (message, caplog.text):
        assert wrong not in text and vcsim_source.password not in text


def test_stopped_vcenter_is_transient(vcsim_factory: Callable[..., Simulator], tmp_path: Path) -> None:
    sim = vcsim_factory("doomed", args=("-cluster", "1", "-host", "1", "-vm", "1"))
    ca = tmp_path / "ca.pem"  # the simulator removes its certificate file when it stops
    shutil.copy(sim.cert_file, ca)
    sessions = VCenterSessions(sim.secrets(), ca_bundle=str(ca))
    inventory = VCenterInventoryReal(sessions)
    assert len(inventory.fetch(sim.endpoint()).vms) == 1  # a session is open and cached
    sim.stop()
    with pytest.raises(TransientError, match="cannot be reached"):
        inventory.fetch(sim.endpoint())
    fresh = VCenterSessions(sim.secrets(), ca_bundle=str(ca))  # refused before any login
    with pytest.raises(TransientError, match="cannot be reached"):
        VCenterInventoryReal(fresh).fetch(sim.endpoint())
    sessions.close()


def test_slow_vcenter_times_out_as_transient(vcsim_factory: Callable[..., Simulator]) -> None:
    sim = vcsim_factory("slow", args=("-cluster", "1", "-host", "1", "-vm", "1"))
    sim.set_delay(3000)
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file, timeout=0.5)
    with pytest.raises(TransientError, match="cannot be reached"):
        VCenterInventoryReal(sessions).fetch(sim.endpoint())
    sessions.close()


def test_hung_vcenter_is_transient_and_does_not_hold_the_worker(vcsim_factory: Callable[..., Simulator]) -> None:
    """A vCenter that accepts connections and answers nothing (here: its process stopped)."""
    sim = vcsim_factory("hung", args=("-cluster", "1", "-host", "1", "-vm", "1"))
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file, timeout=1.0)
    os.kill(sim.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TransientError, match="did not answer within 1 s"):
            VCenterInventoryReal(sessions).fetch(sim.endpoint())
        assert time.monotonic() - started < 10
    finally:
        os.kill(sim.process.pid, signal.SIGCONT)
    assert len(VCenterInventoryReal(sessions).fetch(sim.endpoint()).vms) == 1  # back: the next attempt works
    sessions.close()


def test_self_signed_certificate_fails_verification(vcsim_source: Simulator) -> None:
    sessions = VCenterSessions(vcsim_source.secrets(), environ={})
    with pytest.raises(PermanentError) as info:
        VCenterInventoryReal(sessions).fetch(vcsim_source.endpoint())
    assert "TLS verification" in str(info.value)
    assert "verify_tls" in str(info.value) and "ZERFAUX_VCENTER_CA_BUNDLE" in str(info.value)


def test_ca_bundle_from_environment_verifies(vcsim_source: Simulator) -> None:
    sessions = VCenterSessions(vcsim_source.secrets(), environ={"ZERFAUX_VCENTER_CA_BUNDLE": vcsim_source.cert_file})
    assert VCenterInventoryReal(sessions).fetch(vcsim_source.endpoint()).vms
    sessions.close()


def test_verify_tls_false_opts_out(vcsim_source: Simulator) -> None:
    sessions = VCenterSessions(vcsim_source.secrets(), environ={})
    assert VCenterInventoryReal(sessions).fetch(vcsim_source.endpoint(verify_tls=False)).vms
    sessions.close()


def test_unreadable_ca_bundle_is_permanent(vcsim_source: Simulator) -> None:
    sessions = VCenterSessions(vcsim_source.secrets(), ca_bundle="/nonexistent/ca.pem")
    with pytest.raises(PermanentError, match="ZERFAUX_VCENTER_CA_BUNDLE"):
        VCenterInventoryReal(sessions).fetch(vcsim_source.endpoint())


# -- sessions -------------------------------------------------------------------------------------


def _sessions_of(sim: Simulator) -> set[str]:
    manager = sim.si().content.sessionManager
    own = manager.currentSession.key
    return {s.key for s in manager.sessionList if s.userName == sim.username and s.key != own}


def test_one_session_shared_by_threads_and_closed(vcsim_factory: Callable[..., Simulator]) -> None:
    sim = vcsim_factory("shared", args=("-cluster", "1", "-host", "2", "-vm", "5"))
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file)
    inventory = VCenterInventoryReal(sessions)
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(lambda _: len(inventory.fetch(sim.endpoint()).vms), range(16)))
    assert counts == [sim.vm_count] * 16
    assert len(_sessions_of(sim)) == 1
    sessions.close()
    assert _sessions_of(sim) == set()


def test_expired_session_logs_in_again(vcsim_source: Simulator, source_sessions: VCenterSessions) -> None:
    endpoint = vcsim_source.endpoint()
    si = source_sessions.run(endpoint, lambda si: si)
    si.content.sessionManager.Logout()  # what an expiry or a vCenter restart looks like to us
    assert VCenterInventoryReal(source_sessions).fetch(endpoint).vms
    assert source_sessions.run(endpoint, lambda si: si) is not si


def test_a_server_that_is_not_a_vcenter_is_named(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to all
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    worker = threading.Thread(target=server.serve_forever, daemon=True)
    worker.start()
    try:
        endpoint = VCenterEndpoint("web", "web", "127.0.0.1", server.server_address[1], "u", "s", False)
        sessions = VCenterSessions(SecretResolver({"ZERFAUX_SECRET_S": "pw"}), environ={})
        with pytest.raises(TransientError, match="did not answer as a vSphere API endpoint"):
            VCenterInventoryReal(sessions).fetch(endpoint)
    finally:
        server.shutdown()
        server.server_close()
