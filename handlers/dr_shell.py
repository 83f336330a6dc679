"""``vm.dr_shell``: a powered-off VM at the DR vCenter whose disks are the replicated VMDKs."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from handlers.context import OperationContext
from handlers.datastore_paths import datastore_of_path, split_datastore_path
from handlers.errors import PermanentError
from handlers.types import Row, VCenterEndpoint

# vSphere refuses entity names over 80 characters; a longer one must fail here, in words,
# not as a SOAP fault or a dropped connection that looks transient.
MAX_VM_NAME = 80
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class ShellDisk:
    file: str  # "[dr_datastore] dir/disk.vmdk", an existing descriptor
    capacity: int


@dataclass(frozen=True)
class ShellSpec:
    protected_vm_id: str  # written into the VM's extraConfig so a second run adopts it
    name: str
    datastore: str
    num_cpu: int
    memory_mb: int
    guest_id: str
    firmware: str
    controller: str
    disks: tuple[ShellDisk, ...]
    cluster: str | None = None  # where the resource pool is looked up
    resource_pool: str | None = None
    folder: str | None = None
    network: str | None = None
    # Where the shell's own files (.vmx, nvram, logs) go: replication_targets.placeholder_datastore,
    # a datastore no replica backs. None: an existing shell is adopted, a new one is refused.
    placeholder_datastore: str | None = None
    target_name: str = ""


@dataclass(frozen=True)
class ShellResult:
    moref: str
    adopted: bool
    config_path: str | None = None  # the shell's .vmx as vSphere reports it, "[ds] dir/name.vmx"


def config_datastore(spec: ShellSpec) -> str:
    """The datastore a new shell's configuration goes to, or a PermanentError saying what to set.

    Called only once no existing shell was found to adopt: an install from before the column
    keeps its shells, and is stopped only where a new file would have to be written.
    """
    if not spec.placeholder_datastore:
        raise PermanentError(
            f"replication_targets.placeholder_datastore is not set for target {spec.target_name!r}, so the DR "
            f"shell {spec.name!r} has nowhere to keep its configuration files: set it to a datastore at the DR "
            f"vCenter that no replica backs (not {spec.datastore!r}, the replica's), then set needs_dr_shell again"
        )
    return spec.placeholder_datastore


def shell_warning(spec: ShellSpec, result: ShellResult) -> str | None:
    """A note for the job's result when an adopted shell keeps its .vmx off the placeholder datastore."""
    where_ds = datastore_of_path(result.config_path)
    if where_ds is None or where_ds == spec.placeholder_datastore:
        return None
    fix = (
        "it writes into the replica whenever vSphere updates the shell: "
        "see docs/recovery.md, 'Migrating an existing install'"
        if where_ds == spec.datastore else "Zerfaux leaves it there"
    )
    return (
        f"the adopted DR shell keeps its configuration at {result.config_path!r}, "
        f"not on the placeholder datastore; {fix}"
    )


class DRShellBuilder(Protocol):
    def ensure_shell(
        self, vcenter: VCenterEndpoint, spec: ShellSpec, stop: threading.Event | None = None
    ) -> ShellResult:
        """Make sure exactly one VM marked with ``spec.protected_vm_id`` exists. Blocking.

        Adopts (``adopted=True``) a VM that already carries the mark instead of creating a
        twin, also when another process creates it at the same moment. Never creates or
        deletes disk files: the disks must already exist. Once ``stop`` is set no vCenter task
        is started; a creation already running is left to finish on 'stop'
        (``OperationStopped``, the next attempt adopts it by its mark) and cancelled on
        'cancel' (``OperationCancelled``). Raises
        ``PermanentError`` for a missing datastore, pool, folder, network or disk file
        (naming what exists) and ``TransientError`` when the vCenter cannot be reached.
        A new shell's own files go to ``spec.placeholder_datastore`` only (``config_datastore``:
        a ``PermanentError`` when it is unset); its disks are attached from ``spec.datastore``
        as they are, so nothing is written there. ``config_path`` is the shell's .vmx.
        """
        ...


def map_disk_path(
    path: str, protection_datastore: str, dr_datastore: str, field: str = "vcenter_vms.disks"
) -> str:
    """``[protection_datastore] dir/disk.vmdk`` becomes ``[dr_datastore] dir/disk.vmdk``."""
    parts = split_datastore_path(path) if not _CONTROL.search(path) else None
    if not parts or not parts[1]:
        raise PermanentError(
            f"{field}: disk file {path[:300]!r} is not a datastore path like '[ds] dir/disk.vmdk' "
            "(one line, no control characters): sync the vCenter or fix the row"
        )
    # A relative component would let a row attach a file outside the replica's directory tree.
    ds, rest = parts
    if ".." in re.split(r"[/\\]", rest):
        raise PermanentError(f"{field}: disk file {path[:300]!r} climbs out of its directory with '..'")
    if ds != protection_datastore:
        raise PermanentError(
            f"disk {path!r} is on datastore {ds!r}, not on the protection datastore "
            f"{protection_datastore!r}, so it is not replicated: set needs_storage_vmotion first"
        )
    return f"[{dr_datastore}] {rest}"


def build_spec(payload: Mapping[str, Row]) -> ShellSpec:
    protected, vm, group = payload["protected_vm"], payload.get("vm"), payload["group"]
    target = payload.get("target")
    if not vm:
        raise PermanentError("protected_vms.vm_id does not name a VM in vcenter_vms: sync and fix vm_id")
    if not target or not target.get("dr_datastore"):
        raise PermanentError(
            f"protection group {group['name']!r} has no replication target with a dr_datastore: "
            "set protection_groups.replication_target_id and replication_targets.dr_datastore"
        )
    if not payload.get("dr_vcenter"):
        raise PermanentError(
            f"protection group {group['name']!r} has no DR vCenter: set protection_groups.dr_vcenter_id"
        )
    disks_raw = _disk_rows(vm.get("disks"))
    controllers = {str(d.get("controller") or "lsilogic") for d in disks_raw}
    protection_ds = group.get("protection_datastore") or ""
    disks = tuple(
        ShellDisk(
            file=map_disk_path(d["file"], protection_ds, target["dr_datastore"], f"vcenter_vms.disks[{i}].file"),
            capacity=d["capacity"],
        )
        for i, d in enumerate(disks_raw)
    )
    return ShellSpec(
        protected_vm_id=str(protected["id"]),
        name=shell_name(str(vm.get("name") or ""), group.get("dr_vm_suffix") or "-dr"),
        datastore=target["dr_datastore"],
        num_cpu=int(vm.get("num_cpu") or 1),
        memory_mb=int(vm.get("memory_mb") or 1024),
        guest_id=vm.get("guest_id") or "otherGuest64",
        firmware=vm.get("firmware") or "bios",
        controller=sorted(controllers)[0] if controllers else "lsilogic",
        disks=disks,
        cluster=group.get("dr_cluster"),
        resource_pool=group.get("dr_resource_pool"),
        folder=group.get("dr_folder"),
        network=group.get("dr_network"),
        placeholder_datastore=target.get("placeholder_datastore") or None,
        target_name=str(target.get("name") or target.get("id") or ""),
    )


def shell_name(vm_name: str, suffix: str) -> str:
    """The DR VM's name: the source VM's name and the group's suffix, checked for vSphere.

    Quotes, '<', '&' and non-ASCII travel fine (SOAP escapes them); control characters do
    not survive XML (a CR comes back as LF, a NUL is refused), so they are refused here.
    """
    name = f"{vm_name}{suffix}"
    bad = _CONTROL.search(name)
    if bad:
        raise PermanentError(
            f"the DR shell name {name[:100]!r} (vcenter_vms.name + protection_groups.dr_vm_suffix) "
            f"contains the control character U+{ord(bad.group()):04X}: rename the VM at its vCenter "
            "and sync, or fix the suffix"
        )
    if len(name) > MAX_VM_NAME:
        raise PermanentError(
            f"the DR shell name (vcenter_vms.name + protection_groups.dr_vm_suffix) is {len(name)} "
            f"characters, over vSphere's {MAX_VM_NAME}: {name[:60]!r}...; shorten the VM's name or the suffix"
        )
    return name


def _disk_rows(raw: object) -> list[dict[str, Any]]:
    """``vcenter_vms.disks`` as a list of {file, capacity, controller}, or a PermanentError naming it."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PermanentError(
            f"vcenter_vms.disks must be a JSON array of disks, not {type(raw).__name__}: sync the vCenter"
        )
    disks = []
    for i, d in enumerate(raw):
        if not isinstance(d, dict) or not isinstance(d.get("file"), str):
            raise PermanentError(
                f"vcenter_vms.disks[{i}] has no 'file' string (got {str(d)[:200]!r}): sync the vCenter"
            )
        try:
            capacity = int(d.get("capacity") or 0)
        except (TypeError, ValueError):
            raise PermanentError(
                f"vcenter_vms.disks[{i}].capacity {str(d.get('capacity'))[:100]!r} is not a number of bytes"
            ) from None
        disks.append({**d, "capacity": capacity})
    return disks


class DRShellHandler:
    kind = "vm.dr_shell"

    def __init__(self, backend: DRShellBuilder) -> None:
        self._backend = backend

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        spec = build_spec(payload)
        vcenter = VCenterEndpoint.from_row(payload["dr_vcenter"])
        result = await asyncio.to_thread(self._backend.ensure_shell, vcenter, spec, ctx.stop)
        out: dict[str, Any] = {"dr_shell_vm_id": result.moref, "adopted": result.adopted, "name": spec.name,
                               "config_path": result.config_path}
        warning = shell_warning(spec, result)
        if warning:
            out["warning"] = warning
        return out
