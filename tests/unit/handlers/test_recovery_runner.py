from __future__ import annotations

import asyncio
from typing import Any

import pytest

from handlers.errors import OperationCancelled, OperationStopped, PermanentError
from handlers.recovery.backends import run_tag
from handlers.recovery_run import RecoveryRunHandler
from tests.unit.handlers.recovery_fakes import (
    RUN_ID, FakeCompute, FakeCtx, FakeDB, FakeStorage, Killed, payload, vm_entry,
)

TAG = run_tag(RUN_ID)
CLEANUP_ID = "99990000-0000-4000-8000-000000000000"


def _vms() -> list[dict[str, Any]]:
    return [vm_entry("p1", "db", priority=1, delay=0), vm_entry("p2", "app", priority=2),
            vm_entry("p3", "web", priority=2)]


async def _run(storage: FakeStorage, compute: FakeCompute, ctx: FakeCtx, p: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.wait_for(RecoveryRunHandler(storage, compute)(ctx, {**p, "steps": ctx.db.rows()}), 30)


def _statuses(db: FakeDB) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in db.rows():
        out.setdefault(r["name"], []).append(r["status"])
    return out


async def test_a_test_run_brings_every_vm_up_and_records_every_step() -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    result = await _run(storage, compute, FakeCtx(db), payload(_vms()))
    assert result["status"] == "active"
    assert db.writes[0] == {"plan": [{"seq": s["seq"], "name": s["name"], "protected_vm_id": s["protected_vm_id"]}
                                     for s in db.rows()]}  # the whole plan first
    assert {r["status"] for r in db.rows()} == {"done"}
    assert storage.clones == {f"tank/replicas/{TAG}": ("tank/replicas/gold@zerfaux-20261201", RUN_ID)}
    assert storage.holds == {("tank/replicas/gold@zerfaux-20261201", TAG)} and storage.exports
    assert compute.datastores == {TAG} and compute.port_groups == {TAG}
    assert sorted(v["spec"].name for v in compute.vms.values()) == [
        "app-test-1234abcd", "db-test-1234abcd", "web-test-1234abcd"]
    assert all(v["on"] for v in compute.vms.values())
    (validate,) = db.by_name("validate")
    assert validate["detail"]["placement"]["hosts"] == ["esx-1", "esx-2"]
    assert db.by_name("present_datastore")[0]["detail"]["remote_host"] == "10.0.1.9"
    report = result["report"]
    assert [v["name"] for v in report["vms"]] == ["db-test-1234abcd", "app-test-1234abcd", "web-test-1234abcd"]
    assert all(v["ready_at"] and v["boot_time"] for v in report["vms"]) and report["warnings"] == []


async def test_priority_two_starts_only_after_priority_one_is_ready_and_its_delay() -> None:
    compute = FakeCompute()
    compute.ready_delay = 0.2
    vms = [vm_entry("p1", "db", priority=1, delay=1), vm_entry("p4", "cache", priority=1),
           vm_entry("p2", "app", priority=2), vm_entry("p3", "web", priority=3)]
    await _run(FakeStorage(), compute, FakeCtx(FakeDB()), payload(vms))
    at = {(what, name.split("-test-")[0]): t for what, name, t in compute.events}
    first_ready = max(at[("ready", "db")], at[("ready", "cache")])
    assert at[("power_on", "app")] >= first_ready + 0.9  # db's boot_delay_seconds = 1
    assert at[("power_on", "web")] >= at[("ready", "app")]
    # the two VMs of priority 1 start together: both are on before either is ready
    assert max(at[("power_on", "db")], at[("power_on", "cache")]) < min(at[("ready", "db")], at[("ready", "cache")])


async def test_a_vm_whose_tools_never_answer_is_a_warning_and_the_run_goes_on() -> None:
    compute, db = FakeCompute(not_ready=["db"]), FakeDB()
    vms = [vm_entry("p1", "db", priority=1, timeout=1), vm_entry("p2", "app", priority=2, timeout=0)]
    result = await _run(FakeStorage(), compute, FakeCtx(db), payload(vms))
    assert result["status"] == "active"
    waits = {r["protected_vm_id"]: r for r in db.by_name("wait_ready")}
    assert waits["p1"]["status"] == "warning" and "tools_timeout_seconds" in waits["p1"]["error"]
    assert waits["p1"]["detail"]["how"] is None and waits["p1"]["detail"]["boot_time"]
    assert waits["p2"]["status"] == "done"  # 0: not waited for, not a warning
    assert result["report"]["warnings"] and db.by_name("activate")[0]["detail"]["warnings"] == 1


@pytest.mark.parametrize("after", [False, True])
async def test_a_kill_at_any_record_is_resumed_without_a_second_clone_or_vm(after: bool) -> None:
    probe = FakeCtx(FakeDB())
    await _run(FakeStorage(), FakeCompute(), probe, payload(_vms()))
    for kill_at in range(1, probe.calls + 1):
        storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
        victim = FakeCtx(db, kill_at=kill_at, after=after)
        try:
            await _run(storage, compute, victim, payload(_vms()))
        except Killed:
            pass
        else:  # writes that landed together this time: fewer calls than the probe made
            assert victim.calls < kill_at
            continue
        result = await _run(storage, compute, FakeCtx(db), payload(_vms()))
        assert result["status"] == "active", kill_at
        assert storage.effects["clone"] == 1 and storage.effects["hold"] == 1, kill_at
        assert compute.effects["vm"] == 3 and compute.effects["power_on"] == 3, kill_at
        assert compute.effects["datastore"] == 1 and compute.effects["port_group"] == 1, kill_at
        assert {r["status"] for r in db.rows()} == {"done"}, (kill_at, db.rows())


@pytest.mark.parametrize("where", ["hold", "clone", "export", "present_datastore", "create_vm", "power_on"])
async def test_a_kill_inside_an_effect_is_resumed_by_adopting_it(where: str) -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    (storage if where in ("hold", "clone", "export") else compute).kill_in = where
    with pytest.raises(Killed):
        await _run(storage, compute, FakeCtx(db), payload(_vms()))
    assert "running" in {r["status"] for r in db.rows()}
    await _run(storage, compute, FakeCtx(db), payload(_vms()))
    assert storage.effects["clone"] == 1 and compute.effects["vm"] == 3 and compute.effects["power_on"] == 3


async def test_a_cleanup_run_removes_everything_including_a_vm_never_recorded() -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    compute.kill_in = "create_vm"  # the test's attempt dies after CreateVM, before recording its moref
    with pytest.raises(Killed):
        await _run(storage, compute, FakeCtx(db), payload(_vms()))
    unrecorded = [r for r in db.by_name("create_vm") if not r["detail"].get("moref")]
    made = {v["protected_vm_id"] for v in compute.vms.values()}
    assert unrecorded and {r["protected_vm_id"] for r in unrecorded} & made
    cleanup_db = FakeDB()
    p = payload(_vms(), kind="cleanup", run_id=CLEANUP_ID, test_run_id=RUN_ID, test_steps=db.rows())
    result = await _run(storage, compute, FakeCtx(cleanup_db), p)
    assert result["status"] == "completed" and result["report"]["test_run_id"] == RUN_ID
    assert compute.vms == {} and compute.datastores == set() and compute.port_groups == set()
    assert storage.clones == {} and storage.holds == set() and storage.exports == set()
    statuses = _statuses(cleanup_db)
    assert statuses["mark_tested"] == ["done"] and statuses["remove_datastore"] == ["done"]


async def test_a_cleanup_of_a_test_that_failed_at_validate_touches_nothing() -> None:
    storage, compute, db = FakeStorage(guid=None), FakeCompute(), FakeDB()
    with pytest.raises(PermanentError, match="not on the target"):
        await _run(storage, compute, FakeCtx(db), payload(_vms()))
    p = payload(_vms(), kind="cleanup", run_id=CLEANUP_ID, test_run_id=RUN_ID, test_steps=db.rows())
    cleanup_db = FakeDB()
    await _run(storage, compute, FakeCtx(cleanup_db), p)
    statuses = _statuses(cleanup_db)
    assert statuses["destroy_vm"] == ["skipped"] * 3 and statuses["destroy_clone"] == ["skipped"]
    assert statuses["mark_tested"] == ["done"]


@pytest.mark.parametrize("cancel_at", [2, 5, 9, 14])
async def test_a_cancelled_test_runs_its_cleanup_steps_in_the_same_run(cancel_at: int) -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    with pytest.raises(OperationCancelled):
        await _run(storage, compute, FakeCtx(db, cancel_at=cancel_at), payload(_vms()))
    names = [r["name"] for r in db.rows()]
    assert names[16:] == ["destroy_vm"] * 3 + ["remove_datastore", "remove_port_group", "unexport_clone",
                                               "destroy_clone", "release_hold"]  # after the test's 16
    assert compute.vms == {} and compute.datastores == set() and compute.port_groups == set()
    assert storage.clones == {} and storage.holds == set() and storage.exports == set()
    assert "pending" not in {r["status"] for r in db.rows()}
    assert "skipped" in {r["status"] for r in db.rows() if r["name"] == "activate"}


async def test_a_cancel_asked_before_the_first_attempt_records_nothing() -> None:
    db = FakeDB()
    ctx = FakeCtx(db)
    ctx.stop.cancel()
    with pytest.raises(OperationCancelled):
        await _run(FakeStorage(), FakeCompute(), ctx, payload(_vms()))
    assert db.writes == []


async def test_a_cancelled_test_killed_mid_cleanup_finishes_its_cleanup_on_the_next_attempt() -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    probe = FakeDB()
    with pytest.raises(OperationCancelled):
        await _run(FakeStorage(), FakeCompute(), FakeCtx(probe, cancel_at=12), payload(_vms()))
    total = len(probe.writes)
    with pytest.raises(Killed):
        await _run(storage, compute, FakeCtx(db, cancel_at=12, kill_at=total - 2), payload(_vms()))
    ctx = FakeCtx(db)
    ctx.stop.cancel("cancel requested before this attempt")  # the engine's signal for a resumed cancel
    with pytest.raises(OperationCancelled):
        await _run(storage, compute, ctx, payload(_vms()))
    assert compute.vms == {} and storage.clones == {} and storage.holds == set()
    assert [r["name"] for r in db.rows()].count("destroy_vm") == 3  # appended once
    assert {r["status"] for r in db.rows()} <= {"done", "skipped", "failed"}  # nothing left running


async def test_a_cancel_after_a_kill_marks_the_dead_attempts_step_and_cleans_up() -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    compute.kill_in = "present_datastore"
    with pytest.raises(Killed):
        await _run(storage, compute, FakeCtx(db), payload(_vms()))
    ctx = FakeCtx(db)
    ctx.stop.cancel("cancel requested before this attempt")
    with pytest.raises(OperationCancelled):
        await _run(storage, compute, ctx, payload(_vms()))
    (present,) = db.by_name("present_datastore")
    assert present["status"] == "failed" and "interrupted" in present["error"]
    assert compute.datastores == set() and storage.clones == {} and storage.exports == set()
    assert _statuses(db)["destroy_vm"] == ["skipped"] * 3 and _statuses(db)["remove_datastore"] == ["done"]


async def test_an_engine_stop_leaves_everything_for_the_next_attempt() -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    compute.ready_delay = 5.0
    ctx = FakeCtx(db)
    task = asyncio.create_task(_run(storage, compute, ctx, payload(_vms())))
    while not any(r["name"] == "wait_ready" and r["status"] == "running" for r in db.rows()):
        await asyncio.sleep(0.01)
    ctx.stop.stop("lease lost")
    with pytest.raises(OperationStopped):
        await task
    assert compute.vms and storage.clones  # nothing cleaned up
    assert db.by_name("wait_ready")[0]["status"] == "running"
    compute.ready_delay = 0.01
    result = await _run(storage, compute, FakeCtx(db), payload(_vms()))
    assert result["status"] == "active" and compute.effects["vm"] == 3


@pytest.mark.parametrize("storage, compute, words", [
    (FakeStorage(guid=None), FakeCompute(), "is not on the target any more"),
    (FakeStorage(guid="17"), FakeCompute(), "recovery_points.guid records"),
    (FakeStorage(available=10), FakeCompute(), "free space in the DR pool"),
    (FakeStorage(), FakeCompute(networks=["VM Network"]), "no network 'lab-net'"),
])
async def test_validation_refuses_before_any_effect(storage: FakeStorage, compute: FakeCompute, words: str) -> None:
    db = FakeDB()
    mappings = [{"source_network": "VM Network", "recovery_network": "prod", "test_network": "lab-net"}]
    with pytest.raises(PermanentError, match=words):
        await _run(storage, compute, FakeCtx(db), payload(_vms(), mappings=mappings))
    assert db.by_name("validate")[0]["status"] == "failed" and words in db.by_name("validate")[0]["error"]
    assert {r["status"] for r in db.rows() if r["name"] != "validate"} == {"pending"}
    assert not storage.holds and not storage.clones and not compute.vms


async def test_input_problems_fail_validate_with_every_problem_named() -> None:
    bad = vm_entry("p1", "db", networks=["Storage"])
    bad["vm"]["num_cpu"] = None
    other = vm_entry("p2", "app", networks=["Storage"])
    db = FakeDB()
    with pytest.raises(PermanentError) as caught:
        await _run(FakeStorage(), FakeCompute(), FakeCtx(db), payload([bad, other]))
    assert "vcenter_vms.num_cpu" in str(caught.value) and "network 'Storage'" in str(caught.value)


async def test_a_changed_group_refuses_to_resume() -> None:
    storage, compute, db = FakeStorage(), FakeCompute(), FakeDB()
    with pytest.raises(Killed):
        await _run(storage, compute, FakeCtx(db, kill_at=4), payload(_vms()))
    changed = _vms()
    changed[0]["protected_vm"]["boot_priority"] = 5
    with pytest.raises(PermanentError, match="cannot resume safely"):
        await _run(storage, compute, FakeCtx(db), payload(changed))
