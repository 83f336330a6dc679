"""``Inventory.as_result`` is built by hand for speed: it must encode exactly as ``asdict`` does."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from handlers.backends.stub.backends import VCenterInventoryStub
from handlers.types import VCenterEndpoint
from handlers.vcenter_sync import DatastoreRecord, Disk, Inventory, VMRecord

VC = VCenterEndpoint("vc-1", "primary", "vc.example", 443, "u", "p", True)


def test_as_result_equals_asdict() -> None:
    inventory = VCenterInventoryStub(40).fetch(VC)
    assert inventory.vms and any(vm.disks for vm in inventory.vms)
    expected = {"vms": [asdict(v) for v in inventory.vms], "datastores": [asdict(d) for d in inventory.datastores]}
    # The same JSON (asdict keeps a tuple of disks a tuple; a list encodes the same).
    assert json.dumps(inventory.as_result(), sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_as_result_carries_every_field() -> None:
    disk = Disk(file="[ds] a/a.vmdk", capacity=1, datastore="ds", controller="pvscsi", bus=1, unit=2)
    vm = VMRecord("vm-1", "a", "uuid", "c", "h", "poweredOn", "ds", ("ds",), "g", "gid", "efi", 2, 512, (disk,), ("n",))
    ds = DatastoreRecord("ds-1", "ds", "NFS", 10, 5)
    result = Inventory(vms=[vm], datastores=[ds]).as_result()
    assert set(result["vms"][0]) == {f.name for f in fields(VMRecord)}
    assert set(result["vms"][0]["disks"][0]) == {f.name for f in fields(Disk)}
    assert set(result["datastores"][0]) == {f.name for f in fields(DatastoreRecord)}
