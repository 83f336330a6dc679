"""The vCenter backends' pure parts: fault translation, device parsing, the relocation rule, the shell spec.

pyVmomi's data objects are built offline here; everything that talks to a server is in
tests/integration/test_vcenter_backend.py against vcsim.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import replace
from typing import Any

import pytest
from pyVmomi import vim, vmodl

from handlers.backends.vcenter.inventory import controller_type, disks_of
from handlers.backends.vcenter.session import name_list, translate
from handlers.backends.vcenter.shell import MARK_KEY, Placement, build_config
from handlers.backends.vcenter.vmotion import already_there
from handlers.datastore_paths import datastore_of_path
from handlers.dr_shell import ShellDisk, ShellSpec
from handlers.errors import PermanentError, TransientError
from handlers.types import VCenterEndpoint

ENDPOINT = VCenterEndpoint("id-1", "dr", "vc.example", 443, "svc-zerfaux", "vc-pass", True)
dev = vim.vm.device


def _raise_through(exc: BaseException) -> BaseException:
    with pytest.raises((PermanentError, TransientError)) as info:
        with translate(ENDPOINT):
            raise exc
    return info.value


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (vim.fault.InvalidLogin(msg="Login failure"), PermanentError, "authentication failed for svc-zerfaux@vc.example"),
        (ConnectionRefusedError(111, "Connection refused"), TransientError, "cannot be reached"),
        (socket.timeout("timed out"), TransientError, "cannot be reached"),
        (http.client.RemoteDisconnected("closed"), TransientError, "cannot be reached"),
        (vmodl.fault.ManagedObjectNotFound(obj=vim.VirtualMachine("vm-9")), PermanentError, "vm-9 no longer exists"),
        (vim.fault.FileNotFound(file="[ds] a/disk.vmdk"), PermanentError, "[ds] a/disk.vmdk not found"),
        (vim.fault.NotAuthenticated(), TransientError, "busy or unavailable"),
        (vmodl.fault.SystemError(reason="x"), TransientError, "busy or unavailable"),
        (vim.fault.InvalidState(msg="the VM is busy"), PermanentError, "InvalidState: the VM is busy"),
        (vim.fault.HostConnectFault(msg="The read operation timed out"), TransientError, "cannot be reached"),
    ],
)
def test_faults_become_words(exc: BaseException, kind: type, words: str) -> None:
    error = _raise_through(exc)
    assert isinstance(error, kind)
    assert words in str(error)
    assert "vc-pass" not in str(error) or "password_secret" in str(error)


def test_tls_verification_failure_names_both_ways_out() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"
    error = _raise_through(exc)
    assert isinstance(error, PermanentError)
    assert "self-signed certificate" in str(error)
    assert "vcenters.verify_tls" in str(error) and "ZERFAUX_VCENTER_CA_BUNDLE" in str(error)


def test_host_connect_fault_is_judged_by_its_cause() -> None:
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except ssl.SSLError as inner:
            raise vim.fault.HostConnectFault(msg=str(inner)) from inner
    except vim.fault.HostConnectFault as wrapped:
        error = _raise_through(wrapped)
    assert isinstance(error, PermanentError) and "verify_tls" in str(error)


def test_name_list_truncates() -> None:
    assert name_list([]) == "none"
    assert name_list(["a", "b"]) == "'a', 'b'"
    assert name_list([f"ds{i}" for i in range(30)], limit=3) == "'ds0', 'ds1', 'ds2' and 27 more"


def test_datastore_of_path() -> None:
    assert datastore_of_path("[zfs-protect-01] vm1/vm1.vmx") == "zfs-protect-01"
    assert datastore_of_path("vm1.vmx") is None
    assert datastore_of_path(None) is None


@pytest.mark.parametrize(
    ("device", "name"),
    [
        (dev.ParaVirtualSCSIController(), "pvscsi"),
        (dev.VirtualLsiLogicController(), "lsilogic"),
        (dev.VirtualLsiLogicSASController(), "lsilogic-sas"),
        (dev.VirtualBusLogicController(), "buslogic"),
        (dev.VirtualNVMEController(), "nvme"),
        (dev.VirtualAHCIController(), "sata"),
        (dev.VirtualIDEController(), "ide"),
        (dev.VirtualPCIController(), None),
    ],
)
def test_controller_types(device: Any, name: str | None) -> None:
    assert controller_type(device) == name


def _disk(key: int, controller: int, unit: int, file: str, ds: Any = None) -> Any:
    backing = dev.VirtualDisk.FlatVer2BackingInfo(fileName=file, datastore=ds)
    return dev.VirtualDisk(key=key, controllerKey=controller, unitNumber=unit, capacityInKB=1024, backing=backing)


def test_disks_carry_controller_bus_unit_and_datastore_name() -> None:
    devices = [
        dev.VirtualLsiLogicSASController(key=1000, busNumber=0),
        dev.VirtualNVMEController(key=31000, busNumber=1),
        _disk(2000, 1000, 0, "[nfs-01] a/a.vmdk", vim.Datastore("datastore-11")),
        _disk(2001, 31000, 3, "[nfs-02] a/a_1.vmdk"),
    ]
    disks = disks_of(devices, {"datastore-11": "nfs-01"})
    assert [(d.file, d.capacity, d.datastore, d.controller, d.bus, d.unit) for d in disks] == [
        ("[nfs-01] a/a.vmdk", 1 << 20, "nfs-01", "lsilogic-sas", 0, 0),
        ("[nfs-02] a/a_1.vmdk", 1 << 20, "nfs-02", "nvme", 1, 3),
    ]


def _vm_props(listed: list[str], vmx: str, disks: list[str]) -> dict[str, Any]:
    return {
        "datastore": [vim.Datastore(ref) for ref in listed],
        "config.files.vmPathName": vmx,
        "config.hardware.device": [_disk(2000 + i, 1000, i, f) for i, f in enumerate(disks)],
    }


NAMES = {"ds-old": "old", "ds-new": "new", "ds-iso": "iso"}


@pytest.mark.parametrize(
    ("listed", "vmx", "disks", "there"),
    [
        (["ds-old"], "[old] v/v.vmx", ["[old] v/v.vmx"], False),  # not moved yet
        (["ds-new"], "[new] v/v.vmx", ["[new] v/v.vmdk"], True),  # all moved
        (["ds-new", "ds-old"], "[new] v/v.vmx", ["[old] v/v.vmdk"], False),  # a disk left behind
        (["ds-new", "ds-iso"], "[new] v/v.vmx", ["[new] v/v.vmdk"], True),  # an ISO elsewhere is fine
        (["ds-new"], "[old] v/v.vmx", ["[old] v/v.vmdk"], True),  # vcsim: only `datastore` moves
    ],
)
def test_already_there(listed: list[str], vmx: str, disks: list[str], there: bool) -> None:
    assert already_there(_vm_props(listed, vmx, disks), "ds-new", NAMES, "new") is there


def _spec(controller: str, disks: int) -> ShellSpec:
    return ShellSpec(
        protected_vm_id="pv-7",
        name="web-dr",
        datastore="zfs-dr-01",
        num_cpu=2,
        memory_mb=4096,
        guest_id="rhel9_64Guest",
        firmware="efi",
        controller=controller,
        disks=tuple(ShellDisk(f"[zfs-dr-01] web/disk_{i}.vmdk", 8 << 30) for i in range(disks)),
        placeholder_datastore="placeholder-01",
    )


PLACE = Placement(datastore=vim.Datastore("ds-1"), pool=None, folder=None, network=None)


def test_shell_config_attaches_existing_disks_to_one_new_controller() -> None:
    config = build_config(_spec("pvscsi", 9), PLACE)
    assert (config.name, config.numCPUs, config.memoryMB, config.guestId, config.firmware) == (
        "web-dr", 2, 4096, "rhel9_64Guest", "efi",
    )
    assert [(o.key, o.value) for o in config.extraConfig] == [(MARK_KEY, "pv-7")]
    # Its own path (the creation lock), on the placeholder datastore: nothing of it lands in the replica.
    assert config.files.vmPathName == "[placeholder-01] zerfaux-pv-7/web-dr.vmx"
    controller, *disks = config.deviceChange
    assert isinstance(controller.device, dev.ParaVirtualSCSIController) and controller.device.key < 0
    assert all(change.operation == "add" and not change.fileOperation for change in config.deviceChange)
    assert [c.device.unitNumber for c in disks] == [0, 1, 2, 3, 4, 5, 6, 8, 9]  # 7 is the controller's
    assert {c.device.controllerKey for c in disks} == {controller.device.key}
    assert [c.device.backing.fileName for c in disks][:2] == ["[zfs-dr-01] web/disk_0.vmdk", "[zfs-dr-01] web/disk_1.vmdk"]
    assert all(c.device.backing.diskMode == "persistent" for c in disks)


def test_a_shell_with_no_placeholder_datastore_is_refused_naming_the_column() -> None:
    with pytest.raises(PermanentError, match=r"replication_targets.placeholder_datastore is not set .* \(not 'zfs-dr-01'"):
        build_config(replace(_spec("pvscsi", 1), placeholder_datastore=None), PLACE)


def test_ide_disks_use_the_controller_every_vm_has() -> None:
    config = build_config(_spec("ide", 2), PLACE)
    assert not any(isinstance(c.device, dev.VirtualIDEController) for c in config.deviceChange)
    assert [(c.device.controllerKey, c.device.unitNumber) for c in config.deviceChange] == [(200, 0), (200, 1)]


def test_shell_config_refuses_what_cannot_fit() -> None:
    with pytest.raises(PermanentError, match="3 disks do not fit on one ide controller"):
        build_config(_spec("ide", 3), PLACE)
    with pytest.raises(PermanentError, match="'floppy' is not one of"):
        build_config(_spec("floppy", 1), PLACE)


class _PagingCollector:
    """vcsim ignores maxObjects, so the paging loop is shown here with the server's page shapes."""

    def __init__(self, pages: list[list[str]]) -> None:
        self.pages = pages
        self.calls: list[str] = []

    def _page(self, index: int) -> Any:
        PC = vmodl.query.PropertyCollector
        objects = [
            PC.ObjectContent(obj=vim.VirtualMachine(ref), propSet=[vmodl.DynamicProperty(name="name", val=ref.upper())])
            for ref in self.pages[index]
        ]
        token = str(index + 1) if index + 1 < len(self.pages) else None
        return PC.RetrieveResult(objects=objects, token=token)

    def RetrievePropertiesEx(self, specs: Any, options: Any) -> Any:  # noqa: N802 - the API's name
        self.calls.append(f"retrieve max={options.maxObjects}")
        return self._page(0)

    def ContinueRetrievePropertiesEx(self, token: str) -> Any:  # noqa: N802
        self.calls.append(f"continue {token}")
        return self._page(int(token))


def test_retrieval_follows_the_servers_pages() -> None:
    from types import SimpleNamespace

    from handlers.backends.vcenter.query import _retrieve

    collector = _PagingCollector([["vm-1", "vm-2"], ["vm-3"], ["vm-4"]])
    si = SimpleNamespace(content=SimpleNamespace(propertyCollector=collector))
    rows = _retrieve(si, spec=None, page_size=2)
    assert [(obj._moId, props["name"]) for obj, props in rows] == [
        ("vm-1", "VM-1"), ("vm-2", "VM-2"), ("vm-3", "VM-3"), ("vm-4", "VM-4"),
    ]
    assert collector.calls == ["retrieve max=2", "continue 1", "continue 2"]
