from __future__ import annotations

import pytest

from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryNic, run_tag
from handlers.recovery.plan import build_plan, cleanup_steps, vm_name
from tests.unit.handlers.recovery_fakes import RUN_ID, payload, vm_entry

TAG = run_tag(RUN_ID)  # zerfaux-test-1234abcd


def _names(plan_steps: object) -> list[tuple[str, str | None]]:
    return [(s.name, s.protected_vm_id) for s in plan_steps]  # type: ignore[attr-defined]


def test_steps_follow_the_contract_and_the_boot_order() -> None:
    vms = [vm_entry("p3", "web", priority=2), vm_entry("p1", "db", priority=1), vm_entry("p2", "app", priority=2),
           vm_entry("p0", "app", priority=2)]
    plan = build_plan(payload(vms))
    assert [v.protected_vm_id for v in plan.vms] == ["p1", "p0", "p2", "p3"]  # priority, name, id
    assert _names(plan.steps) == [
        ("validate", None), ("hold_snapshot", None), ("clone_snapshot", None), ("export_clone", None),
        ("present_datastore", None), ("create_port_group", None),
        ("create_vm", "p1"), ("create_vm", "p0"), ("create_vm", "p2"), ("create_vm", "p3"),
        ("power_on", "p1"), ("wait_ready", "p1"),
        ("power_on", "p0"), ("power_on", "p2"), ("power_on", "p3"),
        ("wait_ready", "p0"), ("wait_ready", "p2"), ("wait_ready", "p3"),
        ("activate", None)]
    assert [s.seq for s in plan.steps] == list(range(1, 20))
    assert plan.problems == ()


def test_spec_maps_disks_to_the_clone_datastore_and_nics_to_test_networks() -> None:
    vm = vm_entry("p1", "db", networks=["VM Network", "Backend"])
    mappings = [{"source_network": "VM Network", "recovery_network": "prod", "test_network": None},
                {"source_network": "Backend", "recovery_network": "prod-b", "test_network": "lab-net"}]
    plan = build_plan(payload([vm], mappings=mappings))
    spec = plan.vms[0].spec
    assert spec is not None
    assert spec.name == "db-test-1234abcd" and spec.datastore == TAG and spec.run_id == RUN_ID
    assert [d.file for d in spec.disks] == [f"[{TAG}] db/db.vmdk"] and spec.disks[0].controller == "pvscsi"
    assert spec.nics == (RecoveryNic(TAG, "VM Network"), RecoveryNic("lab-net", "Backend"))
    assert plan.networks == ("lab-net",) and plan.needs_port_group
    assert plan.clone_dataset == f"tank/replicas/{TAG}" and plan.snapshot == "tank/replicas/gold@zerfaux-20261201"
    assert plan.nfs_host == "10.0.1.9" and plan.min_free_bytes == 1024**3


def test_no_port_group_when_every_mapping_has_a_test_network() -> None:
    mappings = [{"source_network": "VM Network", "recovery_network": "prod", "test_network": "lab-net"}]
    assert not build_plan(payload([vm_entry("p1", "db")], mappings=mappings)).needs_port_group


@pytest.mark.parametrize("change, words", [
    (lambda e: e["vm"].update(networks=["Storage"]), "network 'Storage', which has no network_mappings row"),
    (lambda e: e["vm"].update(num_cpu=None), "vcenter_vms.num_cpu"),
    (lambda e: e["vm"].update(memory_mb=0), "vcenter_vms.memory_mb"),
    (lambda e: e["vm"].update(disks=[]), "lists no disks"),
    (lambda e: e["vm"]["disks"][0].update(file="[other-ds] db/db.vmdk"), "set needs_storage_vmotion"),
    (lambda e: e["vm"]["disks"][0].update(file="[protect-ds] ../x.vmdk"), "climbs out"),
    (lambda e: e["vm"].update(name="x" * 70), "over vSphere's 80"),
    (lambda e: e["vm"].update(name="db\r"), "control character U+000D"),
    (lambda e: e.update(vm=None), "has no inventory"),
])
def test_a_vm_problem_is_collected_for_validate_naming_the_field(change: object, words: str) -> None:
    entry = vm_entry("p1", "db")
    change(entry)  # type: ignore[operator]
    plan = build_plan(payload([entry, vm_entry("p2", "ok")]))
    assert len(plan.problems) == 1 and words in plan.problems[0], plan.problems
    assert plan.vm("p1").spec is None and plan.vm("p2").spec is not None  # type: ignore[union-attr]


@pytest.mark.parametrize("change, words", [
    (lambda p: p.update(recovery_point=None), "replicate the group first"),
    (lambda p: p.update(dr_vcenter=None), "protection_groups.dr_vcenter_id"),
    (lambda p: p.update(target=None), "protection_groups.replication_target_id"),
    (lambda p: p["run"].update(kind="restore"), "not one this listener runs"),
    (lambda p: p["target"].update(target_root=None), "target_root"),
])
def test_structural_faults_fail_at_once(change: object, words: str) -> None:
    p = payload([vm_entry("p1", "db")])
    change(p)  # type: ignore[operator]
    with pytest.raises(PermanentError, match=words):
        build_plan(p)


def test_an_empty_group_is_a_problem() -> None:
    assert "no protected VMs" in build_plan(payload([])).problems[0]


def test_vm_name_limits() -> None:
    assert vm_name("a" * 66, TAG) == "a" * 66 + "-test-1234abcd"  # 80 exactly
    with pytest.raises(PermanentError, match="81 characters"):
        vm_name("a" * 67, TAG)


def test_cleanup_plan_covers_the_tests_vms_even_ones_that_left_the_group() -> None:
    test_steps = [{"seq": 7, "name": "create_vm", "protected_vm_id": "gone", "status": "done",
                   "detail": {"moref": "vm-9"}}]
    p = payload([vm_entry("p1", "db")], kind="cleanup", run_id="99990000-0000-4000-8000-000000000000",
                test_run_id=RUN_ID, test_steps=test_steps)
    plan = build_plan(p)
    assert plan.tag == TAG and plan.resource_run_id == RUN_ID  # the test's resources, not the cleanup's
    assert _names(plan.steps) == [("destroy_vm", "p1"), ("destroy_vm", "gone"), ("remove_datastore", None),
                                  ("remove_port_group", None), ("unexport_clone", None), ("destroy_clone", None),
                                  ("release_hold", None), ("mark_tested", None)]
    appended = cleanup_steps(plan.vms, 20, mark_tested=False)
    assert appended[0].seq == 20 and appended[-1].name == "release_hold"


def test_cleanup_needs_the_test_run() -> None:
    with pytest.raises(PermanentError, match="test_run_id"):
        build_plan(payload([vm_entry("p1", "db")], kind="cleanup"))
