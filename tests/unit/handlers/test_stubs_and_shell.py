from __future__ import annotations

import threading

import pytest

from handlers.backends.stub.backends import (
    DRShellBuilderStub,
    StorageMoverStub,
    VCenterInventoryStub,
    ZFSReplicationStub,
)
from handlers.backends.stub.world import StubWorld
from handlers.context import StopSignal
from handlers.dr_shell import ShellResult, build_spec, config_datastore, map_disk_path, shell_warning
from handlers.errors import OperationCancelled, OperationStopped, PermanentError
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


def test_the_spec_carries_the_placeholder_datastore_and_a_misplaced_shell_is_named() -> None:
    payload = {
        "protected_vm": {"id": "p1"}, "group": {"name": "gold", "protection_datastore": "zfs-protect-01"},
        "target": {"name": "dr-zfs", "dr_datastore": "zfs-dr-01", "placeholder_datastore": "ph-01"},
        "dr_vcenter": {"id": "dr"}, "vm": {"name": "app", "disks": []},
    }
    spec = build_spec(payload)
    assert (spec.placeholder_datastore, spec.target_name) == ("ph-01", "dr-zfs")
    assert shell_warning(spec, ShellResult("vm-1", True, "[ph-01] zerfaux-p1/app-dr.vmx")) is None
    on_replica = shell_warning(spec, ShellResult("vm-1", True, "[zfs-dr-01] zerfaux-p1/app-dr.vmx"))
    assert on_replica and "'[zfs-dr-01] zerfaux-p1/app-dr.vmx'" in on_replica and "writes into the replica" in on_replica
    assert "leaves it there" in str(shell_warning(spec, ShellResult("vm-1", True, "[other] x/app-dr.vmx")))
    bare = build_spec({**payload, "target": {"name": "dr-zfs", "dr_datastore": "zfs-dr-01"}})
    with pytest.raises(PermanentError, match="replication_targets.placeholder_datastore is not set for target 'dr-zfs'"):
        config_datastore(bare)


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


def _stop_after(signal: StopSignal, seconds: float, reason: str) -> threading.Timer:
    timer = threading.Timer(seconds, signal.stop if reason == "stop" else signal.cancel,
                            args=("lease lost: not renewed for 4.8s",) if reason == "stop" else ())
    timer.start()
    return timer


def test_a_stopped_stub_replication_keeps_its_partial_receive_and_the_next_attempt_resumes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    world = StubWorld(tmp_path)
    request = ReplicationRequest("0e" * 16, "tank/vm", "dr/vm", "ssh", SSHEndpoint("h", 22, "u", None, None), None, 5, None)
    stop = StopSignal()
    _stop_after(stop, 0.35, "stop")
    with pytest.raises(OperationStopped, match="lease lost"):
        ZFSReplicationStub(seconds=1.0, steps=10, world=world).replicate(request, lambda p: None, stop)
    [stopped] = [e for e in world.journal() if e["effect"] == "stopped"]
    assert 0 < stopped["bytes"] and "lease lost" in stopped["why"]

    seen: list[int] = []
    outcome = ZFSReplicationStub(seconds=1.0, steps=10, world=world).replicate(
        request, lambda p: seen.append(p.bytes_transferred), StopSignal())
    effects = [e["effect"] for e in world.journal()]
    assert effects == ["stopped", "resumed", "sent"]
    resumed = world.journal()[1]
    assert resumed["bytes"] == stopped["bytes"] and seen[0] > stopped["bytes"]
    assert len(seen) < 10 and outcome.bytes_transferred == outcome.bytes_estimated


def test_a_cancelled_stub_replication_discards_the_partial_receive(tmp_path) -> None:  # type: ignore[no-untyped-def]
    world = StubWorld(tmp_path)
    request = ReplicationRequest("0d" * 16, "tank/vm", "dr/vm", "ssh", SSHEndpoint("h", 22, "u", None, None), None, 5, None)
    stop = StopSignal()
    _stop_after(stop, 0.25, "stop")
    with pytest.raises(OperationStopped):
        ZFSReplicationStub(seconds=1.0, steps=10, world=world).replicate(request, lambda p: None, stop)
    cancel = StopSignal()
    _stop_after(cancel, 0.05, "cancel")
    with pytest.raises(OperationCancelled):
        ZFSReplicationStub(seconds=1.0, steps=10, world=world).replicate(request, lambda p: None, cancel)
    seen: list[int] = []
    outcome = ZFSReplicationStub(seconds=0, steps=10, world=world).replicate(
        request, lambda p: seen.append(p.bytes_transferred), StopSignal())
    # the cancelled attempt resumed, then aborted the receive: the third sends from the start
    assert [e["effect"] for e in world.journal()] == ["stopped", "resumed", "sent"]
    assert len(seen) == 10 and seen[0] == outcome.bytes_transferred // 10


def test_a_stopped_stub_relocation_leaves_the_task_running_and_a_cancelled_one_moves_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    world = StubWorld(tmp_path)
    stop = StopSignal()
    _stop_after(stop, 0.1, "stop")
    with pytest.raises(OperationStopped):
        StorageMoverStub(seconds=1.0, world=world).relocate(VC, "vm-7", "zfs-protect-01", stop)
    assert world.read("placement", VC.id, "vm-7") == "zfs-protect-01"  # the vCenter task ended by itself
    assert StorageMoverStub(world=world).relocate(VC, "vm-7", "zfs-protect-01", StopSignal()) is False

    cancel = StopSignal()
    _stop_after(cancel, 0.1, "cancel")
    with pytest.raises(OperationCancelled):
        StorageMoverStub(seconds=1.0, world=world).relocate(VC, "vm-8", "zfs-protect-01", cancel)
    assert world.read("placement", VC.id, "vm-8") is None
    assert [e["effect"] for e in world.journal()] == ["stopped", "already-there"]
