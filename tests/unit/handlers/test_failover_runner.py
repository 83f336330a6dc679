from __future__ import annotations

import asyncio
from typing import Any

import pytest

import handlers.replication
from handlers.errors import PermanentError
from handlers.recovery.failover_backends import pre_failover_snapshot
from handlers.recovery_run import RecoveryRunHandler
from tests.unit.handlers.failover_fakes import (
    DR_DATASTORE, DR_HOST, PRIMARY_HOST, PROTECTION_DS, REPLICA_DS, RUN_ID, SOURCE_DS, World, payload, vm_entry,
)
from tests.unit.handlers.recovery_fakes import FakeCtx, FakeDB, Killed

SECOND_ID = "5678abcd-0000-4000-8000-0000000000f2"
PRE = pre_failover_snapshot(RUN_ID)
SRC, DR = "vc-src", "vc-dr"


async def _run(world: World, p: dict[str, Any], db: FakeDB, ctx: FakeCtx | None = None) -> dict[str, Any]:
    handler = RecoveryRunHandler(world.storage, world.compute, world.replication)
    return await asyncio.wait_for(handler(ctx or FakeCtx(db), {**p, "steps": db.rows()}), 30)


def _statuses(db: FakeDB) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in db.rows():
        out.setdefault(r["name"], []).append(r["status"])
    return out


def _site_a_off(world: World) -> None:
    """Site A came back with its VMs off (they died with it)."""
    for (vc, moref), vm in world.compute.fvms.items():
        if vc == SRC:
            vm["state"] = "poweredOff"


def _acting(kind: str, done: FakeDB, acted_kind: str, run_id: str = SECOND_ID, **kw: Any) -> dict[str, Any]:
    return payload(kind, run_id=run_id, acts_on_run={"id": RUN_ID, "kind": acted_kind}, acts_on_steps=done.rows(), **kw)


# ---- planned migration ---------------------------------------------------------------------------


async def test_a_planned_migration_stops_site_a_first_and_brings_every_vm_up_at_b() -> None:
    world, db = World(), FakeDB()
    result = await _run(world, payload("planned_migration"), db)
    assert result["status"] == "completed"
    assert [(r["name"], r["protected_vm_id"]) for r in db.rows()] == [
        ("validate", None), ("replicate", None),
        ("shutdown_source", "p2"), ("shutdown_source", "p3"), ("shutdown_source", "p1"),  # highest priority first
        ("replicate_final", None), ("pre_failover_snapshot", None), ("load_key", None), ("make_writable", None),
        ("export", None), ("present_datastore", None),
        ("attach_disks", "p1"), ("attach_disks", "p2"), ("attach_disks", "p3"),
        ("set_networks", "p1"), ("set_networks", "p2"), ("set_networks", "p3"),
        ("power_on", "p1"), ("wait_ready", "p1"), ("power_on", "p2"), ("power_on", "p3"),
        ("wait_ready", "p2"), ("wait_ready", "p3"), ("finish", None)]
    assert set(_statuses(db)) and all(s in ("done", "skipped") for ss in _statuses(db).values() for s in ss)
    assert _statuses(db)["load_key"] == ["skipped"]
    for pid in ("p1", "p2", "p3"):
        assert world.state(SRC, f"vm-src-{pid}") == "poweredOff" and world.state(DR, f"vm-dr-{pid}") == "poweredOn"
    # no VM in two places: every VM at B powered on after every VM at A was off
    log = world.compute.log
    last_off = max(t for what, vc, _, t in log if what == "off" and vc == SRC)
    assert min(t for what, vc, _, t in log if what == "on" and vc == DR) > last_off
    offs = [m for what, vc, m, _ in log if what == "off"]
    assert offs.index("vm-src-p1") == 2  # priority 1 last
    # the final snapshot is on both ends with one GUID, and is what the report hands the database
    final = db.by_name("replicate_final")[0]["detail"]
    snap = final["snapshot_name"]
    assert world.storage.ds[(PRIMARY_HOST, SOURCE_DS)].snap(snap)[1] == world.storage.ds[(DR_HOST, REPLICA_DS)].snap(snap)[1]  # type: ignore[index]
    assert result["report"]["final_point"] == {"snapshot_name": snap, "guid": final["guid_b"],
                                               "created_at": final["created_at"]}
    assert len(world.replication.requests) == 2  # no pruning while the run goes on
    assert all(getattr(r, "keep_all", r.retention_snapshots is None) for r in world.replication.requests)
    replica = world.storage.ds[(DR_HOST, REPLICA_DS)]
    assert not replica.readonly and replica.names()[-1] == PRE  # writable after its pre-failover snapshot
    on = db.by_name("power_on")[0]["detail"]
    assert on["source_state"] == "poweredOff" and on["source_changed_at"]
    vms = {v["protected_vm_id"]: v for v in result["report"]["vms"]}
    assert vms["p1"]["source_shutdown"] == "guest" and vms["p1"]["moref_b"] == "vm-dr-p1" and vms["p1"]["ready_at"]
    assert world.compute.fvms[(DR, "vm-dr-p1")]["nics"] == ["prod"]
    assert world.storage.effects["export_replica"] == 1 and world.storage.exports == {REPLICA_DS}


async def test_force_power_off_false_with_a_vm_that_will_not_stop_powers_nothing_on_at_b() -> None:
    world, db = World(), FakeDB()
    world.compute.stuck.add("vm-src-p2")
    with pytest.raises(PermanentError, match="force_power_off"):
        await _run(world, payload("planned_migration", options={"force_power_off": False}), db)
    assert world.compute.effects["power_on"] == 0
    assert all(world.state(DR, f"vm-dr-{p}") == "poweredOff" for p in ("p1", "p2", "p3"))
    st = _statuses(db)
    assert "failed" in st["shutdown_source"] and st["replicate_final"] == ["pending"] and st["power_on"] == ["pending"] * 3
    assert world.state(SRC, "vm-src-p1") == "poweredOn"  # priority 1 never got its turn


async def test_a_source_vm_started_again_before_its_power_on_keeps_its_whole_priority_off() -> None:
    world, db = World(), FakeDB()
    real = world.replication.replicate

    def restart_web(request: Any, progress: Any, cancel: Any) -> Any:
        out = real(request, progress, cancel)
        if world.replication.effects["send"] == 2:  # after the final one
            world.compute.fvms[(SRC, "vm-src-p3")]["state"] = "poweredOn"
        return out

    world.replication.replicate = restart_web  # type: ignore[method-assign]
    with pytest.raises(PermanentError, match=r"'web' \(vm-src-p3\) is poweredOn at site A"):
        await _run(world, payload("planned_migration"), db)
    assert world.state(DR, "vm-dr-p1") == "poweredOn"  # priority 1 was all off at A
    assert world.state(DR, "vm-dr-p2") == "poweredOff" and world.state(DR, "vm-dr-p3") == "poweredOff"
    assert sorted(r["status"] for r in db.by_name("power_on") if r["protected_vm_id"] != "p1") == ["failed", "failed"]


async def test_a_source_vm_gone_before_its_power_on_keeps_its_priority_off_and_reads_are_bulk() -> None:
    world, db = World(), FakeDB()
    real, single, bulk = world.replication.replicate, world.compute.power_state, world.compute.power_states
    reads: list[str] = []

    def remove_web(request: Any, progress: Any, cancel: Any) -> Any:
        out = real(request, progress, cancel)
        if world.replication.effects["send"] == 2:  # after the final one
            del world.compute.fvms[(SRC, "vm-src-p3")]
        return out

    world.replication.replicate = remove_web  # type: ignore[method-assign]
    world.compute.power_state = lambda *a: (reads.append("one"), single(*a))[1]  # type: ignore[method-assign]
    world.compute.power_states = lambda *a: (reads.append("bulk"), bulk(*a))[1]  # type: ignore[method-assign]
    with pytest.raises(PermanentError, match=r"web"):
        await _run(world, payload("planned_migration"), db)
    web = next(r for r in db.by_name("power_on") if r["protected_vm_id"] == "p3")
    assert web["status"] == "failed" and "'web' (vm-src-p3) does not exist at site A" in str(web.get("error")), web
    assert world.state(DR, "vm-dr-p3") == "poweredOff"
    assert "one" not in reads and reads.count("bulk") >= 3  # validate (A, B), then one read per priority


async def test_a_failback_is_a_planned_migration_in_reverse_on_the_original_vms() -> None:
    world, db = World(), FakeDB()
    await _run(world, payload("planned_migration"), db)  # forward first, then reprotect
    await _run(world, _acting("reprotect", db, "planned_migration"), FakeDB())
    world.storage.write(DR_HOST, REPLICA_DS, 500)  # the DR VMs work for a while
    back = FakeDB()
    result = await _run(world, payload("planned_migration", run_id="9abc0000-0000-4000-8000-0000000000f3",
                                       direction="reverse"), back)
    assert result["status"] == "completed"
    st = _statuses(back)
    assert st["export"] == ["skipped"] and st["present_datastore"] == ["skipped"] and st["attach_disks"] == ["skipped"] * 3
    for pid in ("p1", "p2", "p3"):
        assert world.state(DR, f"vm-dr-{pid}") == "poweredOff" and world.state(SRC, f"vm-src-{pid}") == "poweredOn"
    final = back.by_name("replicate_final")[0]["detail"]
    assert final["source_dataset"] == REPLICA_DS and final["target_dataset"] == SOURCE_DS
    first = back.by_name("replicate")[0]["detail"]
    assert (first["bytes_transferred"], final["bytes_transferred"]) == (500, 0)  # only what the DR VMs wrote
    assert not world.storage.ds[(PRIMARY_HOST, SOURCE_DS)].readonly
    assert world.compute.fvms[(SRC, "vm-src-p1")]["nics"] == ["VM Network"]


# ---- failover ------------------------------------------------------------------------------------


def _point(name: str = "zerfaux_s1", guid: str = "111") -> dict[str, Any]:
    return {"id": "rp1", "snapshot_name": name, "guid": guid, "created_at": "2026-12-01T10:00:00+00:00"}


async def test_a_failover_to_the_newest_point_fences_snapshots_and_waits_for_commit() -> None:
    world, db = World(), FakeDB()
    result = await _run(world, payload("failover", point=_point()), db)
    assert result["status"] == "awaiting_commit"
    st = _statuses(db)
    assert st["fence_source"] == ["done"] * 3 and st["clone_point"] == ["skipped"]
    assert st["make_writable"] == ["done"] and st["pre_failover_snapshot"] == ["done"]
    assert all(world.state(SRC, f"vm-src-{p}") == "poweredOff" for p in ("p1", "p2", "p3"))
    assert all(world.state(DR, f"vm-dr-{p}") == "poweredOn" for p in ("p1", "p2", "p3"))
    assert world.storage.ds[(DR_HOST, REPLICA_DS)].names() == ["zerfaux_s1", PRE]
    assert all(r["detail"]["fenced"] is True for r in db.by_name("power_on"))
    assert world.replication.requests == []  # a failover replicates nothing
    assert result["report"]["vms"][0]["fenced"] is True


async def test_skip_source_touches_nothing_at_site_a() -> None:
    world, db = World(), FakeDB()
    world.compute.unreachable.add(SRC)
    await _run(world, payload("failover", point=_point(), options={"skip_source": True}), db)
    assert _statuses(db)["fence_source"] == ["skipped"] * 3
    assert all(world.state(SRC, f"vm-src-{p}") == "poweredOn" for p in ("p1", "p2", "p3"))


async def test_an_unreachable_source_is_a_warning_and_the_failover_goes_on() -> None:
    world, db = World(), FakeDB()
    world.compute.unreachable.add(SRC)
    result = await _run(world, payload("failover", point=_point()), db)
    assert result["status"] == "awaiting_commit"
    fences = db.by_name("fence_source")
    assert {r["status"] for r in fences} == {"warning"} and all(r["detail"]["fenced"] is False for r in fences)
    assert "does not answer" in fences[0]["error"]
    assert all(world.state(DR, f"vm-dr-{p}") == "poweredOn" for p in ("p1", "p2", "p3"))
    assert result["report"]["warnings"]


async def test_a_fence_that_hangs_is_given_up_after_fence_timeout_seconds() -> None:
    world, db = World([vm_entry("p1", "db")]), FakeDB()
    world.compute.hang.add(SRC)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _run(world, payload("failover", vms=world.vms, point=_point(),
                                  options={"fence_timeout_seconds": 0.3}), db)
        assert loop.time() - started < 5
    finally:
        world.compute.release.set()
    (fence,) = db.by_name("fence_source")
    assert fence["status"] == "warning" and fence["detail"]["fenced"] is False
    assert "fence_timeout_seconds" in fence["error"]
    assert world.state(DR, "vm-dr-p1") == "poweredOn"


async def test_an_older_point_comes_up_from_a_clone_and_newer_snapshots_stay() -> None:
    world, db = World(), FakeDB()
    replica = world.storage.ds[(DR_HOST, REPLICA_DS)]
    replica.snaps.append(("zerfaux_s2", "222", 0))
    result = await _run(world, payload("failover", point=_point()), db)
    tag = "zerfaux-failover-" + RUN_ID.replace("-", "")[:8]
    st = _statuses(db)
    assert st["pre_failover_snapshot"] == ["skipped"] and st["make_writable"] == ["skipped"]
    assert st["clone_point"] == ["done"]
    assert replica.names() == ["zerfaux_s1", "zerfaux_s2"] and replica.readonly  # untouched
    assert world.storage.clones == {f"tank/replicas/{tag}": (f"{REPLICA_DS}@zerfaux_s1", RUN_ID)}
    assert tag in world.compute.datastores
    assert world.compute.fvms[(DR, "vm-dr-p1")]["disks"] == [f"[{tag}] db/db.vmdk"]
    attach = db.by_name("attach_disks")[0]["detail"]
    assert attach["detached"] == [f"[{DR_DATASTORE}] db/db.vmdk"] and attach["datastore"] == tag
    assert result["report"]["group"]["older_point"] is True and result["report"]["group"]["clone"].endswith(tag)


async def test_load_key_runs_when_the_group_names_a_key_secret() -> None:
    world, db = World(), FakeDB()
    await _run(world, payload("failover", point=_point(), key_secret="gold-key"), db)
    assert world.storage.keys_loaded == ["gold-key"] and _statuses(db)["load_key"] == ["done"]


# ---- plan problems -------------------------------------------------------------------------------


async def test_every_problem_of_the_plan_is_reported_in_one_message_before_any_effect() -> None:
    vms = [vm_entry("p1", "db", networks=["Backend"]), vm_entry("p2", "app")]
    vms[1]["protected_vm"]["dr_shell_vm_id"] = None
    world, db = World(vms), FakeDB()
    with pytest.raises(PermanentError) as info:
        await _run(world, payload("planned_migration", vms=vms), db)
    assert "'Backend'" in str(info.value) and "needs_dr_shell" in str(info.value)
    assert _statuses(db)["validate"] == ["failed"]
    assert world.replication.requests == [] and world.compute.effects["shutdown"] == 0


async def test_a_vm_at_b_already_on_is_refused_before_anything_is_done() -> None:
    world, db = World(), FakeDB()
    world.compute.fvms[(DR, "vm-dr-p2")]["state"] = "poweredOn"
    with pytest.raises(PermanentError, match="not powered off"):
        await _run(world, payload("failover", point=_point()), db)
    assert world.compute.effects["shutdown"] == 0 and world.storage.effects["snapshot"] == 0


def test_a_reprotect_of_a_group_with_a_local_source_is_refused_naming_the_column() -> None:
    from handlers.recovery.failover_plan import build_failover_plan
    p = _acting("reprotect", FakeDB(), "planned_migration")
    p["group"]["source_ssh_host"] = None
    with pytest.raises(PermanentError, match="protection_groups.source_ssh_host"):
        build_failover_plan(p)


# ---- resume after a kill at each record ----------------------------------------------------------


async def _kill_and_resume(make_world: Any, p: dict[str, Any], prepare: Any = None) -> list[tuple[World, FakeDB]]:
    probe_world = make_world()
    if prepare:
        p = await prepare(probe_world)
    probe = FakeCtx(FakeDB())
    await _run(probe_world, p, probe.db, probe)
    out, killed = [], 0
    for kill_at in range(1, probe.calls + 1):
        world = make_world()
        q = await prepare(world) if prepare else p
        db = FakeDB()
        victim = FakeCtx(db, kill_at=kill_at, after=kill_at % 2 == 0)
        try:
            await _run(world, q, db, victim)
        except Killed:
            pass
        else:  # writes that landed together this time: fewer records than the probe made
            assert victim.calls < kill_at, f"not killed at record {kill_at}"
            continue
        killed += 1
        await _run(world, q, db)
        assert all(r["status"] in ("done", "skipped", "warning") for r in db.rows()), (kill_at, _statuses(db))
        out.append((world, db))
    assert killed >= probe.calls * 3 // 4 and probe.calls > 10  # records that merged this time are not counted
    return out


async def test_a_planned_migration_killed_at_any_record_finishes_with_each_effect_once() -> None:
    for world, db in await _kill_and_resume(World, payload("planned_migration")):
        assert world.compute.effects["power_on"] == 3 and world.compute.effects["shutdown"] == 3
        assert world.replication.effects["snapshot"] == 2 and world.replication.effects["send"] == 2
        assert world.storage.effects["snapshot"] == 1  # one pre-failover snapshot
        assert all(world.state(DR, f"vm-dr-{p}") == "poweredOn" for p in ("p1", "p2", "p3"))


async def test_a_failover_to_an_older_point_killed_at_any_record_makes_one_clone() -> None:
    def make() -> World:
        w = World()
        w.storage.ds[(DR_HOST, REPLICA_DS)].snaps.append(("zerfaux_s2", "222", 0))
        return w
    for world, db in await _kill_and_resume(make, payload("failover", point=_point())):
        assert world.compute.effects["power_on"] == 3 and len(world.storage.clones) == 1
        assert world.storage.effects["clone"] == 1 and world.storage.effects["snapshot"] == 0


async def test_a_rollback_killed_at_any_record_still_returns_the_replica() -> None:
    async def prepare(world: World) -> dict[str, Any]:
        first = FakeDB()
        await _run(world, payload("failover", point=_point()), first)
        world.storage.write(DR_HOST, REPLICA_DS, 4096)
        return _acting("rollback", first, "failover", point=_point())
    for world, db in await _kill_and_resume(World, {}, prepare):
        replica = world.storage.ds[(DR_HOST, REPLICA_DS)]
        assert replica.names() == ["zerfaux_s1"] and replica.written == 0 and replica.readonly
        assert db.by_name("finish")[0]["detail"]["discarded"]["bytes"] == 4096


async def test_a_reprotect_killed_at_any_record_keeps_the_changes_once() -> None:
    async def prepare(world: World) -> dict[str, Any]:
        first = FakeDB()
        await _run(world, payload("failover", point=_point(), options={"skip_source": True}), first)
        await _run(world, _acting("commit", first, "failover", point=_point(),
                                  run_id="aaaa0000-0000-4000-8000-0000000000f4"), FakeDB())
        world.storage.write(PRIMARY_HOST, SOURCE_DS, 777)  # site A went on writing
        _site_a_off(world)
        return _acting("reprotect", first, "failover")
    for world, db in await _kill_and_resume(World, {}, prepare):
        assert world.storage.effects["keep"] == 1
        assert world.replication.effects["send"] == 1


# ---- commit, rollback ----------------------------------------------------------------------------


async def test_commit_of_the_newest_point_replaces_nothing_and_of_an_older_one_promotes_the_clone() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("failover", point=_point()), first)
    db = FakeDB()
    result = await _run(world, _acting("commit", first, "failover", point=_point()), db)
    assert result["status"] == "completed" and _statuses(db)["replace_replica"] == ["skipped"]
    world, first = World(), FakeDB()
    world.storage.ds[(DR_HOST, REPLICA_DS)].snaps.append(("zerfaux_s2", "222", 0))
    await _run(world, payload("failover", point=_point()), first)
    db = FakeDB()
    result = await _run(world, _acting("commit", first, "failover", point=_point()), db)
    assert _statuses(db)["replace_replica"] == ["done"] and world.storage.effects["replace"] == 1
    assert result["report"]["replaced_replica"]["clone"].endswith("zerfaux-failover-1234abcd")


async def test_rollback_returns_the_replica_and_the_next_forward_replication_is_incremental() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("failover", point=_point()), first)
    world.storage.write(DR_HOST, REPLICA_DS, 8192)  # what the DR VMs wrote
    db = FakeDB()
    result = await _run(world, _acting("rollback", first, "failover", point=_point()), db)
    assert result["status"] == "completed"
    assert all(world.state(DR, f"vm-dr-{p}") == "poweredOff" for p in ("p1", "p2", "p3"))
    assert world.compute.fvms[(DR, "vm-dr-p1")]["disks"] == []
    replica = world.storage.ds[(DR_HOST, REPLICA_DS)]
    assert replica.names() == ["zerfaux_s1"] and replica.written == 0 and replica.readonly
    assert result["report"]["discarded"]["bytes"] == 8192 and result["report"]["pre_failover_destroyed"] is True
    assert world.storage.exports == set()  # the replica is no longer shared
    assert _statuses(db)["destroy_clone"] == ["skipped"] and _statuses(db)["remove_datastore"] == ["skipped"]
    world.storage.write(PRIMARY_HOST, SOURCE_DS, 100)
    request = handlers.replication.request_for(payload("failover")["group"], payload("failover")["target"],
                                               job_id="0000aaaa-0000-4000-8000-000000000009", direction="forward")
    outcome = world.replication.replicate(request, lambda _p: None, None)  # type: ignore[arg-type]
    assert outcome.base_snapshot == "zerfaux_s1" and outcome.bytes_transferred == 100


async def test_rollback_keeps_the_pre_failover_snapshot_when_the_replica_held_more_than_the_point() -> None:
    world, first = World(), FakeDB()
    world.storage.write(DR_HOST, REPLICA_DS, 10)  # written after the point, before the failover
    await _run(world, payload("failover", point=_point()), first)
    db = FakeDB()
    result = await _run(world, _acting("rollback", first, "failover", point=_point()), db)
    (step,) = db.by_name("rollback_replica")
    assert step["status"] == "warning" and "next forward replication will be refused" in step["error"]
    assert world.storage.ds[(DR_HOST, REPLICA_DS)].names() == ["zerfaux_s1", PRE]
    assert result["report"]["pre_failover_destroyed"] is False and "zfs destroy" in result["report"]["note"]


async def test_rollback_of_an_older_point_destroys_the_clone_and_its_datastore_only() -> None:
    world, first = World(), FakeDB()
    world.storage.ds[(DR_HOST, REPLICA_DS)].snaps.append(("zerfaux_s2", "222", 0))
    await _run(world, payload("failover", point=_point()), first)
    db = FakeDB()
    result = await _run(world, _acting("rollback", first, "failover", point=_point()), db)
    st = _statuses(db)
    assert st["rollback_replica"] == ["skipped"] and st["destroy_clone"] == ["done"] and st["remove_datastore"] == ["done"]
    assert world.storage.clones == {} and world.compute.datastores == {DR_DATASTORE, PROTECTION_DS}
    assert world.storage.ds[(DR_HOST, REPLICA_DS)].names() == ["zerfaux_s1", "zerfaux_s2"]
    assert "destroyed the clone" in result["report"]["discarded"]["how"]


# ---- reprotect -----------------------------------------------------------------------------------


async def test_reprotect_after_a_planned_migration_sends_only_what_the_dr_vms_wrote() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("planned_migration"), first)
    world.storage.write(DR_HOST, REPLICA_DS, 2048)
    db = FakeDB()
    result = await _run(world, _acting("reprotect", first, "planned_migration"), db)
    assert result["status"] == "completed"
    st = _statuses(db)
    assert st["keep_source_changes"] == ["skipped"]
    sent = db.by_name("replicate_reverse")[0]["detail"]
    assert sent["direction"] == "reverse" and sent["bytes_transferred"] == 2048
    assert sent["base_snapshot"] == first.by_name("replicate_final")[0]["detail"]["snapshot_name"]
    assert world.storage.ds[(PRIMARY_HOST, SOURCE_DS)].readonly
    assert result["report"]["new_direction"] == "reverse"


async def test_reprotect_after_an_unplanned_failover_keeps_site_a_changes_where_the_report_says() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("failover", point=_point(), options={"skip_source": True}), first)
    world.storage.write(PRIMARY_HOST, SOURCE_DS, 999)  # site A went on after the point
    _site_a_off(world)
    world.storage.write(DR_HOST, REPLICA_DS, 50)
    db = FakeDB()
    result = await _run(world, _acting("reprotect", first, "failover"), db)
    kept = result["report"]["kept"]
    assert kept["kept_dataset"] == SOURCE_DS + "_zerfaux_kept_5678abcd" and kept["hold_tag"] == "zerfaux-kept-5678abcd"
    assert world.storage.ds[(PRIMARY_HOST, kept["kept_dataset"])].written == 999  # still readable there
    assert world.replication.effects["send"] == 1 and world.storage.effects["discard"] == 0


async def test_reprotect_discards_only_when_asked() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("failover", point=_point(), options={"skip_source": True}), first)
    world.storage.ds[(PRIMARY_HOST, SOURCE_DS)].snaps.append(("zerfaux_s9", "999", 0))
    _site_a_off(world)
    db = FakeDB()
    result = await _run(world, _acting("reprotect", first, "failover", options={"discard_source_changes": True}), db)
    assert result["report"]["discarded"]["snapshots"] == ["zerfaux_s9"] and world.storage.effects["keep"] == 0


async def test_reprotect_with_no_common_snapshot_refuses_and_says_what_to_do() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("failover", point=_point()), first)
    world.storage.ds[(PRIMARY_HOST, SOURCE_DS)].snaps = [("other", "42", 0)]
    db = FakeDB()
    with pytest.raises(PermanentError, match="share no snapshot.*zfs rename.*zfs send"):
        await _run(world, _acting("reprotect", first, "failover"), db)
    assert world.replication.requests == [] and _statuses(db)["check_source_changes"] == ["pending"]


# ---- stop, cancel, a changed group -----------------------------------------------------------------


async def test_a_cancel_before_the_start_ends_it_and_a_cancel_later_does_not_stop_it() -> None:
    from handlers.errors import OperationCancelled
    world, db = World(), FakeDB()
    ctx = FakeCtx(db)
    ctx.stop.cancel()
    with pytest.raises(OperationCancelled):
        await _run(world, payload("planned_migration"), db, ctx)
    assert db.rows() == [] and world.compute.effects["shutdown"] == 0
    ctx = FakeCtx(db, cancel_at=3)  # the database refuses such a cancel; if one arrives, it is ignored
    result = await _run(world, payload("planned_migration"), db, ctx)
    assert result["status"] == "completed" and world.compute.effects["power_on"] == 3


async def test_the_engines_stop_leaves_the_step_running_for_the_next_attempt() -> None:
    from handlers.errors import OperationStopped
    world, db = World(), FakeDB()
    real = world.replication.replicate

    def stopped(request: Any, progress: Any, cancel: Any) -> Any:
        ctx.stop.stop("lease lost")
        cancel.wait(1)
        raise OperationStopped("stopped")

    world.replication.replicate = stopped  # type: ignore[method-assign]
    ctx = FakeCtx(db)
    with pytest.raises(OperationStopped):
        await _run(world, payload("planned_migration"), db, ctx)
    assert _statuses(db)["replicate"] == ["running"] and _statuses(db)["shutdown_source"] == ["pending"] * 3
    world.replication.replicate = real  # type: ignore[method-assign]
    assert (await _run(world, payload("planned_migration"), db))["status"] == "completed"


async def test_a_resumed_run_whose_group_changed_refuses_to_go_on() -> None:
    world, db = World(), FakeDB()
    with pytest.raises(Killed):
        await _run(world, payload("planned_migration"), db, FakeCtx(db, kill_at=4))
    changed = payload("planned_migration", vms=[*world.vms, vm_entry("p4", "cache", priority=1)])
    with pytest.raises(PermanentError, match="cannot resume safely"):
        await _run(world, changed, db)


async def test_a_failover_in_reverse_to_an_older_point_clones_at_the_primary_and_presents_it_there() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("planned_migration"), first)
    await _run(world, _acting("reprotect", first, "planned_migration"), FakeDB())
    final = first.by_name("replicate_final")[0]["detail"]
    run_id = "bbbb0000-0000-4000-8000-0000000000f5"
    db = FakeDB()
    result = await _run(world, payload("failover", run_id=run_id, direction="reverse",
                                       point=_point(final["snapshot_name"], final["guid"])), db)
    tag = "zerfaux-failover-bbbb0000"
    assert result["status"] == "awaiting_commit" and result["report"]["group"]["older_point"] is True
    assert world.storage.clones == {f"pool/vms/{tag}": (f"{SOURCE_DS}@{final['snapshot_name']}", run_id)}
    assert tag in world.compute.datastores
    assert db.by_name("present_datastore")[0]["detail"]["remote_host"] == PRIMARY_HOST
    assert world.compute.fvms[(SRC, "vm-src-p1")]["disks"] == [f"[{tag}] db/db.vmdk"]
    assert all(world.state(DR, f"vm-dr-{p}") == "poweredOff" for p in ("p1", "p2", "p3"))  # fenced at site A
    assert all(world.state(SRC, f"vm-src-{p}") == "poweredOn" for p in ("p1", "p2", "p3"))


async def test_reprotect_refuses_while_a_vm_runs_again_at_site_a_and_notes_a_silent_vcenter() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("failover", point=_point(), options={"skip_source": True}), first)
    db = FakeDB()
    with pytest.raises(PermanentError, match="running at site A"):
        await _run(world, _acting("reprotect", first, "failover"), db)
    assert world.replication.requests == [] and world.storage.effects["keep"] == 0
    for p in ("p1", "p2", "p3"):
        world.compute.fvms[(SRC, f"vm-src-{p}")]["state"] = "poweredOff"
    world.compute.unreachable.add(SRC)
    db = FakeDB()
    result = await _run(world, _acting("reprotect", first, "failover", run_id="cccc0000-0000-4000-8000-0000000000f6"), db)
    assert result["status"] == "completed"
    assert db.by_name("validate")[0]["detail"]["site_a_states"]["p1"].startswith("unknown")


async def _reversed_world() -> tuple[World, FakeDB]:
    """After a planned migration and a reprotect: the VMs run at DR, replication goes DR -> primary."""
    world, first = World(), FakeDB()
    await _run(world, payload("planned_migration"), first)
    await _run(world, _acting("reprotect", first, "planned_migration"), FakeDB())
    return world, first


async def test_a_failback_and_a_reprotect_bring_the_group_home_incrementally() -> None:
    world, _ = await _reversed_world()
    world.storage.write(DR_HOST, REPLICA_DS, 300)
    back, home = FakeDB(), FakeDB()
    back_id = "dddd0000-0000-4000-8000-0000000000f7"
    await _run(world, payload("planned_migration", run_id=back_id, direction="reverse"), back)
    world.storage.write(PRIMARY_HOST, SOURCE_DS, 40)  # the original VMs run again
    result = await _run(world, payload("reprotect", run_id="eeee0000-0000-4000-8000-0000000000f8", direction="reverse",
                                       acts_on_run={"id": back_id, "kind": "planned_migration"},
                                       acts_on_steps=back.rows()), home)
    sent = home.by_name("replicate_reverse")[0]["detail"]
    assert (sent["direction"], sent["source_dataset"], sent["target_dataset"]) == ("forward", SOURCE_DS, REPLICA_DS)
    assert sent["bytes_transferred"] == 40 and sent["base_snapshot"] == back.by_name("replicate_final")[0]["detail"]["snapshot_name"]
    assert result["report"]["new_direction"] == "forward" and world.storage.ds[(DR_HOST, REPLICA_DS)].readonly


async def test_a_failover_in_reverse_to_the_newest_point_and_its_rollback() -> None:
    world, _ = await _reversed_world()
    snaps = world.storage.ds[(PRIMARY_HOST, SOURCE_DS)].snaps
    name, guid, _ = snaps[-1]
    fo, rb = FakeDB(), FakeDB()
    fo_id = "ffff0000-0000-4000-8000-0000000000f9"
    result = await _run(world, payload("failover", run_id=fo_id, direction="reverse", point=_point(name, guid)), fo)
    assert result["status"] == "awaiting_commit" and _statuses(fo)["attach_disks"] == ["skipped"] * 3
    assert all(world.state(SRC, f"vm-src-{p}") == "poweredOn" for p in ("p1", "p2", "p3"))
    world.storage.write(PRIMARY_HOST, SOURCE_DS, 64)  # what the original VMs wrote meanwhile
    done = await _run(world, payload("rollback", run_id="abab0000-0000-4000-8000-0000000000fa", direction="reverse",
                                     acts_on_run={"id": fo_id, "kind": "failover"}, acts_on_steps=fo.rows(),
                                     point=_point(name, guid)), rb)
    assert done["report"]["discarded"]["bytes"] == 64 and done["report"]["pre_failover_destroyed"] is True
    assert _statuses(rb)["detach_disks"] == ["skipped"] * 3  # the original VMs keep their disks
    assert all(world.state(SRC, f"vm-src-{p}") == "poweredOff" for p in ("p1", "p2", "p3"))
    source = world.storage.ds[(PRIMARY_HOST, SOURCE_DS)]
    assert source.names()[-1] == name and source.readonly and world.compute.fvms[(SRC, "vm-src-p1")]["disks"]


async def test_a_commit_acts_only_on_a_failover() -> None:
    world, first = World(), FakeDB()
    await _run(world, payload("planned_migration"), first)
    db = FakeDB()
    with pytest.raises(PermanentError, match="a commit acts on a failover run"):
        await _run(world, _acting("commit", first, "planned_migration"), db)
    assert _statuses(db)["replace_replica"] == ["pending"]
