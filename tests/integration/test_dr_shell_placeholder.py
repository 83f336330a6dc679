"""DR shells keep their own files on the placeholder datastore, never in the replica (vcsim).

Checked through vcsim's API (``config.files.vmPathName``, ``layoutEx.file``) and through the
directories behind its datastores: after a shell is made, the replica's directory tree holds
exactly the files it held before, byte for byte, and the shell's .vmx is on the placeholder.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from handlers.backends.vcenter.real import DRShellBuilderReal, VCenterSessions
from handlers.backends.vcenter.shell import MARK_KEY, annotation
from handlers.datastore_paths import datastore_of_path
from handlers.dr_shell import ShellDisk, ShellSpec
from handlers.errors import PermanentError
from tests.support.vcsim import DR_DS, PLACEHOLDER_DS, Simulator

pytestmark = pytest.mark.vcsim

DISK_TYPES = {"diskDescriptor", "diskExtent"}


@pytest.fixture
def dr_sessions(vcsim_dr: Simulator) -> Iterator[VCenterSessions]:
    sessions = VCenterSessions(vcsim_dr.secrets(), ca_bundle=vcsim_dr.cert_file)
    yield sessions
    sessions.close()


def _spec(sim: Simulator, **changes: object) -> ShellSpec:
    pv = f"pv-{uuid.uuid4().hex[:8]}"
    disks = sim.add_replica(pv)
    spec = ShellSpec(
        protected_vm_id=pv, name=f"{pv}-dr", datastore=DR_DS, num_cpu=1, memory_mb=256,
        guest_id="otherGuest64", firmware="bios", controller="pvscsi",
        disks=tuple(ShellDisk(file=d, capacity=0) for d in disks),
        placeholder_datastore=PLACEHOLDER_DS, target_name="dr-zfs-01",
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root``, by relative path, with its SHA-256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def layout(sim: Simulator, moref: str) -> list[tuple[str, str]]:
    """(type, datastore path) of every file vSphere lists for the VM."""
    return [(f.type, f.name) for f in sim.vm(moref).layoutEx.file or ()]


def test_a_new_shell_keeps_its_files_on_the_placeholder_and_writes_nothing_into_the_replica(
    vcsim_dr: Simulator, dr_sessions: VCenterSessions
) -> None:
    spec = _spec(vcsim_dr)
    replica_before = tree(vcsim_dr.datastore_dirs[DR_DS])

    made = DRShellBuilderReal(dr_sessions).ensure_shell(vcsim_dr.endpoint(), spec)

    assert made.adopted is False
    vm = vcsim_dr.vm(made.moref)
    vmx = f"[{PLACEHOLDER_DS}] zerfaux-{spec.protected_vm_id}/{spec.name}.vmx"
    assert vm.config.files.vmPathName == made.config_path == vmx
    assert datastore_of_path(vm.config.files.logDirectory) == PLACEHOLDER_DS
    files = layout(vcsim_dr, made.moref)
    assert files, "vcsim lists no file for the shell"
    own = [name for kind, name in files if kind not in DISK_TYPES]
    assert own and {datastore_of_path(name) for name in own} == {PLACEHOLDER_DS}, files
    # The only files on the DR datastore are the replica's disks, attached as they were.
    assert {name for _, name in files if datastore_of_path(name) == DR_DS} <= {
        *(d.file for d in spec.disks), *(d.file.replace(".vmdk", "-flat.vmdk") for d in spec.disks)}
    assert vcsim_dr.vm_disk_files(made.moref) == [d.file for d in spec.disks]
    assert tree(vcsim_dr.datastore_dirs[DR_DS]) == replica_before
    assert (vcsim_dr.datastore_dirs[PLACEHOLDER_DS] / f"zerfaux-{spec.protected_vm_id}" / f"{spec.name}.vmx").is_file()


def _old_shell(sim: Simulator, spec: ShellSpec) -> str:
    """A shell as Zerfaux made it before the placeholder: its .vmx in the DR datastore."""
    dc = sim.si().content.rootFolder.childEntity[0]
    pool = next(c for c in dc.hostFolder.childEntity if isinstance(c, vim.ClusterComputeResource)).resourcePool
    config = vim.vm.ConfigSpec(
        name=spec.name, guestId="otherGuest64", numCPUs=1, memoryMB=256,
        annotation=annotation(spec.protected_vm_id),
        files=vim.vm.FileInfo(vmPathName=f"[{DR_DS}] zerfaux-{spec.protected_vm_id}/{spec.name}.vmx"),
        extraConfig=[vim.option.OptionValue(key=MARK_KEY, value=spec.protected_vm_id)],
    )
    task = dc.vmFolder.CreateVM_Task(config=config, pool=pool)
    WaitForTask(task)
    return str(task.info.result._moId)


@pytest.mark.parametrize("placeholder", [PLACEHOLDER_DS, None])
def test_a_shell_made_before_the_placeholder_is_adopted_where_it_is(
    vcsim_dr: Simulator, dr_sessions: VCenterSessions, placeholder: str | None
) -> None:
    spec = _spec(vcsim_dr, placeholder_datastore=placeholder)
    old = _old_shell(vcsim_dr, spec)
    old_vmx = vcsim_dr.datastore_dirs[DR_DS] / f"zerfaux-{spec.protected_vm_id}" / f"{spec.name}.vmx"
    assert old_vmx.is_file()
    placeholder_before = tree(vcsim_dr.datastore_dirs[PLACEHOLDER_DS])

    got = DRShellBuilderReal(dr_sessions).ensure_shell(vcsim_dr.endpoint(), spec)

    assert (got.moref, got.adopted) == (old, True)
    assert got.config_path == f"[{DR_DS}] zerfaux-{spec.protected_vm_id}/{spec.name}.vmx"
    assert vcsim_dr.vm(old).config.files.vmPathName == got.config_path  # not moved, not destroyed
    assert old_vmx.is_file()
    assert vcsim_dr.count_vms_named(spec.name) == 1
    assert tree(vcsim_dr.datastore_dirs[PLACEHOLDER_DS]) == placeholder_before  # no second shell begun


def test_no_placeholder_and_no_shell_is_refused_before_any_effect(
    vcsim_dr: Simulator, dr_sessions: VCenterSessions
) -> None:
    spec = _spec(vcsim_dr, placeholder_datastore=None)
    replica_before = tree(vcsim_dr.datastore_dirs[DR_DS])
    placeholder_before = tree(vcsim_dr.datastore_dirs[PLACEHOLDER_DS])
    tasks_before = {t._moId for t in vcsim_dr.si().content.taskManager.recentTask}
    refusal = r"replication_targets.placeholder_datastore is not set for target 'dr-zfs-01'"
    with pytest.raises(PermanentError, match=refusal):
        DRShellBuilderReal(dr_sessions).ensure_shell(vcsim_dr.endpoint(), spec)
    assert vcsim_dr.count_vms_named(spec.name) == 0
    assert {t._moId for t in vcsim_dr.si().content.taskManager.recentTask} == tasks_before
    assert tree(vcsim_dr.datastore_dirs[DR_DS]) == replica_before
    assert tree(vcsim_dr.datastore_dirs[PLACEHOLDER_DS]) == placeholder_before


def test_a_placeholder_the_vcenter_does_not_have_is_named(vcsim_dr: Simulator, dr_sessions: VCenterSessions) -> None:
    spec = _spec(vcsim_dr, placeholder_datastore="no-such-placeholder")
    refusal = (r"datastore 'no-such-placeholder' does not exist .* "
               r"replication_targets.placeholder_datastore; datastores there: .*'zerfaux-placeholder'")
    with pytest.raises(PermanentError, match=refusal):
        DRShellBuilderReal(dr_sessions).ensure_shell(vcsim_dr.endpoint(), spec)
    assert vcsim_dr.count_vms_named(spec.name) == 0
