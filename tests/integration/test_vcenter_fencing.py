"""A listener cut off from the database while it creates a DR shell, and a second listener that
takes the operation over (issue 11, part 1, "the same with a DR shell on vcsim").

The victim reaches Postgres through a relay the test cuts (tests/support/tcp_proxy.py: sockets
stay open, nothing comes back) the moment it logs that it is creating the shell; the DR vcsim
answers every call after a delay, so its ``CreateVM_Task`` is on its way while the rescuer, on a
direct connection, waits for the lease to expire, claims the operation and runs it again. Both
talk to the same vCenter. Whatever the interleaving, there is exactly one VM: counted by name and
by the Zerfaux mark through vcsim's own API, and it is the one the row names.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from pyVmomi import vim

from handlers.backends.vcenter.shell import MARK_KEY
from tests.integration.conftest import add_vm, protect
from tests.integration.test_real_crash import DELAY_MS, LEASE, SWEEP, Setup, _until, setup, slow_pair  # noqa: F401
from tests.support.tcp_proxy import tcp_proxy
from tests.support.vcsim import Simulator
from tests.support.workload import Proc


def _marked(sim: Simulator, protected_vm_id: str) -> list[str]:
    found = []
    for vm in sim.find(vim.VirtualMachine):
        if {o.key: o.value for o in vm.config.extraConfig or ()}.get(MARK_KEY) == protected_vm_id:
            found.append(vm._moId)
    return sorted(found)


def _cut_off_and_take_over(setup: Setup, dr: Simulator, cut_on: str, delay_ms: int) -> tuple[str, str]:
    """The victim asks for the shell through the relay, is cut off at ``cut_on`` in its output,
    and the rescuer finishes the operation. Returns (protected VM id, the shell's name)."""
    name = f"fence-{uuid.uuid4().hex[:6]}"
    dr.add_replica(name, stem=name)
    vm_id = add_vm(setup.db, name=name, moref=f"vm-{name}", datastore="zfs-protect-01")
    protected = str(protect(setup.db, vm_id))
    db = urlsplit(setup.db.url)
    with tcp_proxy(db.hostname or "127.0.0.1", db.port or 5432) as relay:
        victim = Proc(relay.url_for(setup.db.url), "run", env={**setup.env, "ZERFAUX_WORKER_ID": "victim"})
        rescuer: Proc | None = None
        procs = [victim]
        try:
            victim.wait_for_line("listening as")
            dr.set_delay(delay_ms)
            setup.db.sql("update protected_vms set needs_dr_shell = true where id = %s", (protected,))
            _until(lambda: any(cut_on in line for line in victim.lines), 60, f"the victim logs {cut_on!r}", procs)
            relay.cut()  # from now on the victim hears nothing from Postgres
            rescuer = Proc(setup.db.url, "run", env={**setup.env, "ZERFAUX_WORKER_ID": "rescuer"})
            procs.append(rescuer)
            rescuer.wait_for_line("listening as")
            _until(lambda: setup.db.value("select status from zerfaux.operations where kind = 'vm.dr_shell'")
                   in ("succeeded", "failed"), LEASE + SWEEP + 180, "the rescuer finishes", procs, interval=0.05)
        finally:
            dr.set_delay(0)
            victim.kill()  # cut off, it may wait long for the database: no need to watch it go
            code = rescuer.stop() if rescuer is not None else 0
    assert code == 0, rescuer.output[-3000:] if rescuer else ""
    return protected, f"{name}-dr"


def _one_shell(setup: Setup, dr: Simulator, protected: str, shell_name: str, vms_before: int) -> None:
    op = setup.db.one("select * from zerfaux.operations where kind = 'vm.dr_shell'")
    assert (op["status"], op["worker_id"]) == ("succeeded", "rescuer"), op["last_error"]
    row = setup.db.one("select * from protected_vms where id = %s", (protected,))
    assert (row["needs_dr_shell"], row["dr_shell_vm_created"], row["last_error"]) == (False, True, None)
    assert _marked(dr, protected) == [row["dr_shell_vm_id"]]
    assert dr.count_vms_named(shell_name) == 1
    assert len(dr.find(vim.VirtualMachine)) == vms_before + 1


def test_a_listener_cut_off_from_the_database_mid_create_leaves_one_dr_shell(
    setup: Setup, slow_pair: tuple[Simulator, Simulator]  # noqa: F811
) -> None:
    """Cut as its CreateVM_Task leaves: the rescuer finds the victim's VM by its mark."""
    _, dr = slow_pair
    vms_before = len(dr.find(vim.VirtualMachine))
    protected, shell_name = _cut_off_and_take_over(setup, dr, "creating DR shell", DELAY_MS)
    _one_shell(setup, dr, protected, shell_name, vms_before)


def test_a_cut_off_listener_and_its_successor_both_past_the_check_leave_one_dr_shell(
    setup: Setup, slow_pair: tuple[Simulator, Simulator]  # noqa: F811
) -> None:
    """Cut as soon as it claims, with every vCenter call slow: the victim has looked for the mark
    and is still placing the shell when the rescuer looks too, so both go on to CreateVM_Task
    (unless the victim fences itself first). Check-then-create made two VMs here; the shell's
    own path lets one creation through and the other adopts it."""
    _, dr = slow_pair
    vms_before = len(dr.find(vim.VirtualMachine))
    protected, shell_name = _cut_off_and_take_over(setup, dr, "kind=vm.dr_shell", 1500)
    _one_shell(setup, dr, protected, shell_name, vms_before)
