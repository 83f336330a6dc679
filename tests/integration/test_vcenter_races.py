"""Two creators of one DR shell, stopped attempts and twins, against vcsim (issue 11, parts 1 and 2).

Counted through vcsim's own API (a separate pyVmomi session): VMs by name, VMs by the Zerfaux
mark, the tasks in its task manager. The race is forced, not hoped for: each creator waits at a
barrier after it found no marked VM and before it calls ``CreateVM_Task``, so both have passed
the check-before-create when the first creates.
"""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from handlers.backends.vcenter import query
from handlers.backends.vcenter import shell as shell_module
from handlers.backends.vcenter.real import DRShellBuilderReal, StorageMoverReal, VCenterSessions
from handlers.backends.vcenter.shell import MARK_KEY, annotation
from handlers.context import StopSignal
from handlers.dr_shell import ShellDisk, ShellResult, ShellSpec
from handlers.errors import OperationStopped, PermanentError
from handlers.secrets import SecretResolver, env_key
from handlers.types import VCenterEndpoint
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, SOURCE_DS, Simulator

pytestmark = pytest.mark.vcsim


def _spec(sim: Simulator) -> ShellSpec:
    pv = f"pv-{uuid.uuid4().hex[:8]}"
    disks = sim.add_replica(pv)
    return ShellSpec(
        protected_vm_id=pv, name=f"{pv}-dr", datastore=DR_DS, num_cpu=1, memory_mb=256,
        guest_id="otherGuest64", firmware="bios", controller="pvscsi",
        disks=tuple(ShellDisk(file=d, capacity=0) for d in disks), placeholder_datastore=PLACEHOLDER_DS,
    )


def _marked(sim: Simulator, protected_vm_id: str) -> list[str]:
    """Morefs of the VMs whose extraConfig carries this mark, read with plain pyVmomi."""
    found = []
    for vm in sim.find(vim.VirtualMachine):
        options = {o.key: o.value for o in vm.config.extraConfig or ()}
        if options.get(MARK_KEY) == protected_vm_id:
            found.append(vm._moId)
    return sorted(found)


def _task_ids(sim: Simulator) -> set[str]:
    return {t._moId for t in sim.si().content.taskManager.recentTask}


def _new_tasks(sim: Simulator, before: set[str]) -> list[str]:
    return sorted(t.info.name for t in sim.si().content.taskManager.recentTask if t._moId not in before)


@pytest.fixture
def sessions_for(vcsim_dr: Simulator) -> Iterator[Callable[[], VCenterSessions]]:
    """A new, separate session per call: each creator logs in on its own, as two listeners do."""
    opened: list[VCenterSessions] = []

    def make() -> VCenterSessions:
        opened.append(VCenterSessions(vcsim_dr.secrets(), ca_bundle=vcsim_dr.cert_file))
        return opened[-1]

    yield make
    for sessions in opened:
        sessions.close()


def _hold_before_create(monkeypatch: pytest.MonkeyPatch, arrive: Callable[[], Any]) -> None:
    """``arrive()`` runs after the mark was looked for and before CreateVM_Task is called."""
    real_build = shell_module.build_config

    def build(spec: ShellSpec, place: Any, slot: int = 1) -> Any:
        arrive()
        return real_build(spec, place, slot)

    monkeypatch.setattr(shell_module, "build_config", build)


def test_two_creators_racing_in_threads_make_one_shell_and_agree(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(vcsim_dr)
    barrier = threading.Barrier(2, timeout=30)
    _hold_before_create(monkeypatch, barrier.wait)
    results: list[ShellResult | BaseException] = []

    def create() -> None:
        try:
            results.append(DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec))
        except BaseException as exc:  # reported below, with the other thread's outcome
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert all(isinstance(r, ShellResult) for r in results), results
    shells = [r for r in results if isinstance(r, ShellResult)]
    assert len(shells) == 2 and shells[0].moref == shells[1].moref
    assert sorted(r.adopted for r in shells) == [False, True]  # one created, the other adopted it
    assert _marked(vcsim_dr, spec.protected_vm_id) == [shells[0].moref]
    assert vcsim_dr.count_vms_named(spec.name) == 1


def _create_in_process(endpoint: VCenterEndpoint, password: str, ca: str, spec: ShellSpec,
                       barrier: Any, out: Any) -> None:
    """One listener's attempt in a process of its own (spawned: nothing shared with the test)."""
    real_build = shell_module.build_config

    def build(s: ShellSpec, place: Any, slot: int = 1) -> Any:
        barrier.wait()
        return real_build(s, place, slot)

    shell_module.build_config = build  # type: ignore[assignment]  # this process only
    sessions = VCenterSessions(SecretResolver({env_key(endpoint.password_secret or ""): password}), ca_bundle=ca)
    try:
        result = DRShellBuilderReal(sessions).ensure_shell(endpoint, spec)
        out.put((result.moref, result.adopted))
    except BaseException as exc:
        out.put(("error", repr(exc)))
    finally:
        sessions.close()


def test_two_creators_racing_in_processes_make_one_shell_and_agree(vcsim_dr: Simulator) -> None:
    spec = _spec(vcsim_dr)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2, timeout=60), ctx.Queue()
    args = (vcsim_dr.endpoint(), vcsim_dr.password, vcsim_dr.cert_file, spec, barrier, out)
    procs = [ctx.Process(target=_create_in_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    answers = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)

    assert all(a[0] != "error" for a in answers), answers
    assert answers[0][0] == answers[1][0]
    assert sorted(a[1] for a in answers) == [False, True]
    assert _marked(vcsim_dr, spec.protected_vm_id) == [answers[0][0]]
    assert vcsim_dr.count_vms_named(spec.name) == 1


def test_a_zombie_stopped_mid_create_leaves_its_vm_and_the_successor_adopts_it(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(vcsim_dr)
    stop = StopSignal()
    real_wait = query.wait_for_task

    def lose_the_lease_then_wait(si: Any, task: Any, signal: Any = None) -> Any:
        stop.stop("lease lost")  # CreateVM_Task has been sent: the zombie is fenced while it runs
        return real_wait(si, task, signal)

    monkeypatch.setattr(shell_module, "wait_for_task", lose_the_lease_then_wait)
    with pytest.raises(OperationStopped, match="lease lost"):
        DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec, stop)
    monkeypatch.setattr(shell_module, "wait_for_task", real_wait)
    left = _marked(vcsim_dr, spec.protected_vm_id)
    assert len(left) == 1  # the task was left alone, not cancelled: the VM it made is there

    successor = DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec, StopSignal())
    assert (successor.moref, successor.adopted) == (left[0], True)
    assert _marked(vcsim_dr, spec.protected_vm_id) == left
    assert vcsim_dr.count_vms_named(spec.name) == 1


def test_a_zombie_and_its_successor_creating_at_once_leave_one_shell(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zombie passed its check and is about to create when its successor checks too."""
    spec = _spec(vcsim_dr)
    barrier = threading.Barrier(2, timeout=30)
    _hold_before_create(monkeypatch, barrier.wait)
    zombie_stop = StopSignal()
    outcome: dict[str, Any] = {}

    def zombie() -> None:
        try:
            outcome["zombie"] = DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec, zombie_stop)
        except BaseException as exc:
            outcome["zombie"] = exc

    t = threading.Thread(target=zombie)
    t.start()
    successor = DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec, StopSignal())
    t.join(60)
    zombie_stop.stop("lease lost")  # too late to matter: whichever created, there is one VM

    assert _marked(vcsim_dr, spec.protected_vm_id) == [successor.moref]
    assert vcsim_dr.count_vms_named(spec.name) == 1
    assert isinstance(outcome["zombie"], ShellResult) and outcome["zombie"].moref == successor.moref


def test_stop_before_create_starts_no_task(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(vcsim_dr)
    stop = StopSignal()
    _hold_before_create(monkeypatch, lambda: stop.stop("shutting down"))
    before = _task_ids(vcsim_dr)
    with pytest.raises(OperationStopped, match="shutting down before the DR shell was created"):
        DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec, stop)
    assert _new_tasks(vcsim_dr, before) == []
    assert _marked(vcsim_dr, spec.protected_vm_id) == []


def test_stop_before_relocate_starts_no_task(vcsim_source: Simulator) -> None:
    vm = next(v for v in vcsim_source.find(vim.VirtualMachine)
              if v.name.startswith("DC0_H0_") and SOURCE_DS not in vcsim_source.vm_datastores(v._moId))
    before_ds = vcsim_source.vm_datastores(vm._moId)
    stop = StopSignal()
    stop.stop("lease lost")
    before = _task_ids(vcsim_source)
    sessions = VCenterSessions(vcsim_source.secrets(), ca_bundle=vcsim_source.cert_file)
    try:
        with pytest.raises(OperationStopped, match="lease lost before the relocation started"):
            StorageMoverReal(sessions).relocate(vcsim_source.endpoint(), vm._moId, SOURCE_DS, stop)
    finally:
        sessions.close()
    assert _new_tasks(vcsim_source, before) == []
    assert vcsim_source.vm_datastores(vm._moId) == before_ds


def _twin(sim: Simulator, spec: ShellSpec, power_on: bool = False) -> str:
    """A second VM marked for ``spec``'s protected VM, as an older version could have left."""
    content = sim.si().content
    dc = content.rootFolder.childEntity[0]
    pool = next(c for c in dc.hostFolder.childEntity if isinstance(c, vim.ClusterComputeResource)).resourcePool
    ds = next(d for d in dc.datastore if d.name == DR_DS)
    disks = [
        vim.vm.device.VirtualDeviceSpec(
            operation="add",
            device=vim.vm.device.VirtualDisk(
                key=-101 - i, controllerKey=-100, unitNumber=i,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=d.file, diskMode="persistent", datastore=ds),
            ),
        )
        for i, d in enumerate(spec.disks)
    ]
    controller = vim.vm.device.VirtualDeviceSpec(
        operation="add", device=vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing")
    )
    config = vim.vm.ConfigSpec(
        name=f"{spec.name}-twin", guestId="otherGuest64", numCPUs=1, memoryMB=256,
        annotation=annotation(spec.protected_vm_id), files=vim.vm.FileInfo(vmPathName=f"[{DR_DS}]"),
        extraConfig=[vim.option.OptionValue(key=MARK_KEY, value=spec.protected_vm_id)],
        deviceChange=[controller, *disks],
    )
    task = dc.vmFolder.CreateVM_Task(config=config, pool=pool)
    WaitForTask(task)
    vm = task.info.result
    if power_on:
        WaitForTask(vm.PowerOnVM_Task())
    return str(vm._moId)


def test_a_twin_is_unregistered_not_destroyed_and_the_oldest_kept(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions]
) -> None:
    spec = _spec(vcsim_dr)
    first = DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec)
    twin = _twin(vcsim_dr, spec)
    twin_dir = vcsim_dr.datastore_dirs[DR_DS] / f"{spec.name}-twin"
    assert _marked(vcsim_dr, spec.protected_vm_id) == sorted([first.moref, twin])

    again = DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec)

    assert (again.moref, again.adopted) == (first.moref, True)
    assert _marked(vcsim_dr, spec.protected_vm_id) == [first.moref]
    assert (twin_dir / f"{spec.name}-twin.vmx").exists()  # removed from the inventory, files kept
    replica = vcsim_dr.datastore_dirs[DR_DS] / spec.protected_vm_id
    assert sorted(p.name for p in replica.iterdir()) == ["disk-flat.vmdk", "disk.vmdk"]  # the replica untouched


def test_a_twin_that_is_powered_on_is_left_alone_in_words(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions]
) -> None:
    spec = _spec(vcsim_dr)
    first = DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec)
    twin = _twin(vcsim_dr, spec, power_on=True)
    with pytest.raises(PermanentError, match=rf"2 VMs .* keeps {first.moref} .* not {twin} \(power state poweredOn\)"):
        DRShellBuilderReal(sessions_for()).ensure_shell(vcsim_dr.endpoint(), spec)
    assert _marked(vcsim_dr, spec.protected_vm_id) == sorted([first.moref, twin])


def _leave_vmx(sim: Simulator, spec: ShellSpec, directory: str) -> None:
    """A .vmx with no VM, as a shell removed from the inventory (or a failed create) leaves it."""
    leftover = sim.datastore_dirs[PLACEHOLDER_DS] / directory
    leftover.mkdir()
    (leftover / f"{spec.name}.vmx").write_text("")


def test_a_leftover_vmx_without_a_vm_is_stepped_over(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions]
) -> None:
    spec = _spec(vcsim_dr)
    _leave_vmx(vcsim_dr, spec, f"zerfaux-{spec.protected_vm_id}")
    made = DRShellBuilderReal(sessions_for(), await_seconds=0.5).ensure_shell(vcsim_dr.endpoint(), spec)
    assert made.adopted is False
    assert _marked(vcsim_dr, spec.protected_vm_id) == [made.moref]
    path = vcsim_dr.vm(made.moref).config.files.vmPathName
    assert path == f"[{PLACEHOLDER_DS}] zerfaux-{spec.protected_vm_id}-2/{spec.name}.vmx"


def test_leftovers_in_every_directory_are_named(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions]
) -> None:
    spec = _spec(vcsim_dr)
    for directory in [f"zerfaux-{spec.protected_vm_id}"] + [f"zerfaux-{spec.protected_vm_id}-{n}" for n in range(2, 6)]:
        _leave_vmx(vcsim_dr, spec, directory)
    builder = DRShellBuilderReal(sessions_for(), await_seconds=0.2)
    with pytest.raises(PermanentError, match=rf"zerfaux-{spec.protected_vm_id}-5/{spec.name}.vmx'? exist .* delete the folders"):
        builder.ensure_shell(vcsim_dr.endpoint(), spec)
    assert _marked(vcsim_dr, spec.protected_vm_id) == []


def test_a_shell_asked_before_its_replica_exists_is_made_once_it_does(
    vcsim_dr: Simulator, sessions_for: Callable[[], VCenterSessions]
) -> None:
    """vcsim keeps the .vmx of a create that failed on a missing disk: the retry steps over it."""
    pv = f"pv-{uuid.uuid4().hex[:8]}"
    spec = ShellSpec(
        protected_vm_id=pv, name=f"{pv}-dr", datastore=DR_DS, num_cpu=1, memory_mb=256,
        guest_id="otherGuest64", firmware="bios", controller="pvscsi",
        disks=(ShellDisk(file=f"[{DR_DS}] {pv}/disk.vmdk", capacity=0),), placeholder_datastore=PLACEHOLDER_DS,
    )
    builder = DRShellBuilderReal(sessions_for(), await_seconds=0.5)
    with pytest.raises(PermanentError, match="replicate the VM's disks to the DR datastore first"):
        builder.ensure_shell(vcsim_dr.endpoint(), spec)
    vcsim_dr.add_replica(pv)
    made = builder.ensure_shell(vcsim_dr.endpoint(), spec)
    assert _marked(vcsim_dr, pv) == [made.moref]
    assert vcsim_dr.vm_disk_files(made.moref) == [f"[{DR_DS}] {pv}/disk.vmdk"]
