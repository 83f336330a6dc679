"""Stub mode without a shared world (the embedded default, ``zerfaux demo``): the DR shells the stub
makes, a planned migration onto them and a reprotect, through the handlers ``build_handlers`` gives."""

from __future__ import annotations

from typing import Any

from handlers import BackendSettings, build_handlers
from handlers.secrets import SecretResolver
from tests.unit.handlers.failover_fakes import RUN_ID, payload, three_vms
from tests.unit.handlers.recovery_fakes import FakeCtx, FakeDB

SECOND = "5678abcd-0000-4000-8000-0000000000f2"


async def test_a_planned_migration_and_a_reprotect_in_memory_stub_mode() -> None:
    hs = build_handlers(BackendSettings(), SecretResolver({}))
    base = payload("planned_migration")
    vms = three_vms()
    for entry in vms:  # the DR shells, as vm.dr_shell makes them
        made = await hs.by_kind["vm.dr_shell"](FakeCtx(FakeDB()), {
            "protected_vm": entry["protected_vm"], "vm": entry["vm"], "group": base["group"],
            "target": {**base["target"], "placeholder_datastore": "dr-placeholder"}, "dr_vcenter": base["dr_vcenter"]})
        entry["protected_vm"]["dr_shell_vm_id"] = made["dr_shell_vm_id"]
    db = FakeDB()
    migrate = payload("planned_migration", vms=vms)
    migrate["network_mappings"][0]["recovery_network"] = "dr-network"  # one the stub DR site has
    run: Any = await hs.by_kind["recovery.run"](FakeCtx(db), {**migrate, "steps": []})
    assert (run["status"], run["mode"]) == ("completed", "stub")
    assert {r["status"] for r in db.rows()} <= {"done", "skipped"}
    final = run["report"]["final_point"]
    assert run["report"]["group"]["final_snapshot"]["guid_a"] == final["guid"] == \
        run["report"]["group"]["final_snapshot"]["guid_b"]
    again = FakeDB()
    p = payload("reprotect", run_id=SECOND, acts_on_run={"id": RUN_ID, "kind": "planned_migration"},
                acts_on_steps=db.rows(), vms=vms)
    done: Any = await hs.by_kind["recovery.run"](FakeCtx(again), {**p, "steps": []})
    assert done["status"] == "completed" and done["report"]["common_snapshot"]["name"] == final["snapshot_name"]
    assert done["report"]["new_direction"] == "reverse"
