from __future__ import annotations

import threading

import pytest

from handlers.backends.stub.backends import DRShellBuilderStub, VCenterInventoryStub, ZFSReplicationStub
from handlers.dr_shell import build_spec, map_disk_path
from handlers.errors import OperationCancelled, PermanentError
from handlers.replication import ReplicationRequest, snapshot_name
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint, VCenterEndpoint

VC = VCenterEndpoint("id-1", "vc-primary", "vc", 443, "admin", "pw", True)


def test_stub_inventory_is_deterministic_and_realistic() -> None:
    first, second = VCenterInventoryStub(50).fetch(VC), VCenterInventoryStub(50).fetch(VC)
    assert first == second
    assert len(first.vms) == 50 and len({vm.moref for vm in first.vms}) == 50
    assert len({vm.cluster for vm in first.vms}) == 3
    assert all(vm.disks and vm.disks[0].file.startswith(f"[{vm.datastore}] ") for vm in first.vms)


def test_stub_dr_shell_adopts_on_the_second_call() -> None:
    stub = DRShellBuilderStub()
    payload = {
        "protected_vm": {"id": "p1"}, "group": {"name": "gold", "protection_datastore": "zfs-protect-01"},
        "target": {"dr_datastore": "zfs-dr-01"}, "dr_vcenter": {"id": "dr"},
        "vm": {"name": "app", "disks": [{"file": "[zfs-protect-01] app/app.vmdk", "capacity": 1}]},
    }
    spec = build_spec(payload)
    assert spec.disks[0].file == "[zfs-dr-01] app/app.vmdk" and spec.name == "app-dr"
    made, again = stub.ensure_shell(VC, spec), stub.ensure_shell(VC, spec)
    assert made.moref == again.moref == "vm-1001" and not made.adopted and again.adopted


def test_disk_paths_map_only_from_the_protection_datastore() -> None:
    assert map_disk_path("[prot] a b/c.vmdk", "prot", "dr") == "[dr] a b/c.vmdk"
    with pytest.raises(PermanentError, match="needs_storage_vmotion"):
        map_disk_path("[vsan-01] app/app.vmdk", "prot", "dr")
    with pytest.raises(PermanentError, match="not a datastore path"):
        map_disk_path("app.vmdk", "prot", "dr")


def test_stub_replication_reports_progress_and_stops_when_cancelled() -> None:
    request = ReplicationRequest("0f" * 16, "tank/vm", "dr/vm", "ssh", SSHEndpoint("h", 22, "u", None, None), None, 5, None)
    seen: list[int] = []
    outcome = ZFSReplicationStub(seconds=0).replicate(request, lambda p: seen.append(p.bytes_transferred), threading.Event())
    assert seen == sorted(seen) and seen[-1] == outcome.bytes_transferred == outcome.bytes_estimated
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(OperationCancelled):
        ZFSReplicationStub(seconds=5).replicate(request, lambda p: None, cancel)


def test_snapshot_names_carry_the_job_and_utc_time() -> None:
    name = snapshot_name("12345678-9abc-def0-1234-56789abcdef0")
    assert name.startswith("zerfaux_123456789abc_") and name.endswith("Z")


def test_secrets_resolve_from_env_then_file_then_vault(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "dr-key").write_text("KEY FROM FILE")
    resolver = SecretResolver({"ZERFAUX_SECRET_VC_PW": "from-env"}, str(tmp_path), lambda n: "vaulted" if n == "v" else None)
    assert resolver.resolve("vc-pw", "vcenters.password_secret") == "from-env"
    assert resolver.resolve("dr-key", "replication_targets.ssh_key_secret") == "KEY FROM FILE"
    assert resolver.resolve("v", "x") == "vaulted"
    with pytest.raises(PermanentError, match="ZERFAUX_SECRET_NOPE") as caught:
        resolver.resolve("nope", "vcenters.password_secret")
    assert "vcenters.password_secret" in str(caught.value)
    with pytest.raises(PermanentError, match="not a valid secret name"):
        resolver.resolve("../../etc/shadow", "x")
