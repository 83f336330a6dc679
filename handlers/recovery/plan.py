"""A recovery run's plan: its steps in order, its test VMs' specs, and what validation will check.

Built from the kind's input alone (no effect, no peer asked), so the same input gives the same
plan on every attempt: a resumed attempt compares it with the steps the first one recorded.
Structural faults of the input (no group, no target, no DR vCenter) raise ``PermanentError`` at
once; faults of a VM or a network are collected in ``problems`` and reported by the ``validate``
step, all of them in one message, before any effect.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from handlers.dr_shell import _CONTROL, MAX_VM_NAME, map_disk_path
from handlers.errors import PermanentError
from handlers.recovery.backends import RecoveryDisk, RecoveryNic, RecoveryVMSpec, run_tag
from handlers.types import Row, SSHEndpoint, VCenterEndpoint

log = logging.getLogger(__name__)

GIB = 1024**3
# Room a test needs in the DR pool: a clone starts empty and grows with what the guests write.
MIN_FREE_BYTES = 1 * GIB
MIN_FREE_SHARE = 0.05  # of the VMs' provisioned disk capacity

TEST_GROUP_STEPS = ("validate", "hold_snapshot", "clone_snapshot", "export_clone", "present_datastore",
                    "create_port_group")
CLEANUP_GROUP_STEPS = ("remove_datastore", "remove_port_group", "unexport_clone", "destroy_clone", "release_hold")
KINDS = ("test", "cleanup")


@dataclass(frozen=True)
class Step:
    seq: int
    name: str
    protected_vm_id: str | None = None
    priority: int | None = None  # power_on / wait_ready: the boot priority they belong to

    def as_plan(self) -> dict[str, Any]:
        return {"seq": self.seq, "name": self.name, "protected_vm_id": self.protected_vm_id}


@dataclass(frozen=True)
class VMPlan:
    protected_vm_id: str
    source_name: str
    priority: int
    boot_delay_seconds: int
    tools_timeout_seconds: int
    spec: RecoveryVMSpec | None  # None: its inventory has a problem (listed in RunPlan.problems)


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    kind: str  # 'test' | 'cleanup'
    resource_run_id: str  # whose resources: the run itself (test) or the test it cleans up
    tag: str  # zerfaux-test-<8 hex of resource_run_id>: clone, datastore, port group
    group_name: str
    target: SSHEndpoint
    target_root: str
    nfs_host: str
    nfs_clients: tuple[str, ...] | None
    vcenter: VCenterEndpoint
    cluster: str | None
    snapshot: str  # <replica_dataset>@<snapshot_name>
    expected_guid: str | None
    clone_dataset: str
    networks: tuple[str, ...]  # DR networks the test VMs join that must exist already
    needs_port_group: bool
    provisioned_bytes: int
    vms: tuple[VMPlan, ...]
    steps: tuple[Step, ...]
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def min_free_bytes(self) -> int:
        return max(MIN_FREE_BYTES, int(self.provisioned_bytes * MIN_FREE_SHARE))

    def vm(self, protected_vm_id: str | None) -> VMPlan | None:
        return next((v for v in self.vms if v.protected_vm_id == protected_vm_id), None)


def build_plan(payload: Mapping[str, Any]) -> RunPlan:
    run = _need(payload, "run", "the recovery run's row is missing from the input: upgrade the database "
                                "(zerfaux migrate)")
    kind = str(run.get("kind") or "")
    if kind not in KINDS:
        raise PermanentError(f"recovery_runs.kind {kind!r} is not one this listener runs: 'test', 'cleanup', "
                             "'planned_migration', 'failover', 'commit', 'rollback', 'reprotect'")
    group = _need(payload, "group", "the run's protection group is gone: recovery_runs.protection_group_id")
    target = _need(payload, "target", f"protection group {group.get('name')!r} has no replication target: set "
                                      "protection_groups.replication_target_id")
    dr_vcenter = _need(payload, "dr_vcenter", f"protection group {group.get('name')!r} has no DR vCenter: set "
                                              "protection_groups.dr_vcenter_id")
    point = _need(payload, "recovery_point", "the run has no recovery point on the target: replicate the group "
                                             "first (a replication_jobs row), then insert the run again")
    replica = payload.get("replica_dataset")
    if not replica or not point.get("snapshot_name"):
        raise PermanentError(f"protection group {group.get('name')!r} has no replica dataset on target "
                             f"{target.get('name')!r}: set protection_groups.replica_name and replicate")
    if not target.get("target_root"):
        raise PermanentError(f"replication_targets.target_root is not set for target {target.get('name')!r}")
    run_id = str(run["id"])
    if kind == "cleanup":
        test_run = payload.get("test_run") or {}
        if not test_run.get("id"):
            raise PermanentError("a cleanup run needs recovery_runs.test_run_id naming the test it cleans up")
        resource_run_id = str(test_run["id"])
    else:
        resource_run_id = run_id
    tag = run_tag(resource_run_id)
    mappings = _mappings(payload.get("network_mappings"))
    vms, problems, networks, provisioned = _vms(payload, group, mappings, tag, resource_run_id, kind)
    needs_port_group = any(test is None for test in mappings.values())
    common: dict[str, Any] = dict(
        run_id=run_id, kind=kind, resource_run_id=resource_run_id, tag=tag,
        group_name=str(group.get("name") or group.get("id")), target=SSHEndpoint.target_from_row(target),
        target_root=str(target["target_root"]).rstrip("/"),
        nfs_host=str(target.get("nfs_host_effective") or target.get("nfs_host") or target["ssh_host"]),
        nfs_clients=tuple(str(c) for c in target["nfs_clients"]) if target.get("nfs_clients") else None,
        vcenter=VCenterEndpoint.from_row(dr_vcenter), cluster=group.get("dr_cluster") or None,
        snapshot=f"{replica}@{point['snapshot_name']}",
        expected_guid=None if point.get("guid") is None else str(point["guid"]),
        networks=networks, needs_port_group=needs_port_group, provisioned_bytes=provisioned,
        vms=vms, problems=tuple(problems),
    )
    common["clone_dataset"] = f"{common['target_root']}/{tag}"
    steps = test_steps(vms) if kind == "test" else cleanup_steps(vms, 1, mark_tested=True)
    return RunPlan(steps=steps, **common)


def test_steps(vms: Sequence[VMPlan]) -> tuple[Step, ...]:
    names: list[tuple[str, str | None, int | None]] = [(n, None, None) for n in TEST_GROUP_STEPS]
    names += [("create_vm", v.protected_vm_id, None) for v in vms]
    for priority in sorted({v.priority for v in vms}):
        names += [("power_on", v.protected_vm_id, priority) for v in vms if v.priority == priority]
        names += [("wait_ready", v.protected_vm_id, priority) for v in vms if v.priority == priority]
    names.append(("activate", None, None))
    return tuple(Step(i, n, p, prio) for i, (n, p, prio) in enumerate(names, start=1))


def cleanup_steps(vms: Sequence[VMPlan], first_seq: int, mark_tested: bool) -> tuple[Step, ...]:
    """The cleanup's steps from ``first_seq``: a cleanup run's own plan, or those a cancelled test
    appends after its own steps (without ``mark_tested``: a cancelled test tested nothing)."""
    names: list[tuple[str, str | None]] = [("destroy_vm", v.protected_vm_id) for v in vms]
    names += [(n, None) for n in CLEANUP_GROUP_STEPS]
    if mark_tested:
        names.append(("mark_tested", None))
    return tuple(Step(i, n, p) for i, (n, p) in enumerate(names, start=first_seq))


def vm_name(source_name: str, tag: str) -> str:
    """``<vm name>-test-<8 hex>``, or a PermanentError saying why vSphere would refuse it."""
    name = f"{source_name}-test-{tag.rsplit('-', 1)[-1]}"
    bad = _CONTROL.search(name)
    if bad:
        raise PermanentError(
            f"the test VM name {name[:100]!r} (vcenter_vms.name + '-test-<hex>') contains the control "
            f"character U+{ord(bad.group()):04X}: rename the VM at its vCenter and sync")
    if len(name) > MAX_VM_NAME:
        raise PermanentError(
            f"the test VM name (vcenter_vms.name + '-test-<hex>') is {len(name)} characters, over vSphere's "
            f"{MAX_VM_NAME}: {name[:60]!r}...; shorten the VM's name at its vCenter and sync")
    return name


def _need(payload: Mapping[str, Any], key: str, why: str) -> Row:
    value = payload.get(key)
    if not isinstance(value, Mapping) or not value:
        raise PermanentError(why)
    return value


def _mappings(raw: object) -> dict[str, str | None]:
    """source_network -> test_network (None: the run's isolated port group)."""
    out: dict[str, str | None] = {}
    for row in raw if isinstance(raw, list) else []:
        if isinstance(row, Mapping) and row.get("source_network"):
            out[str(row["source_network"])] = row.get("test_network") or None
    return out


def _vms(payload: Mapping[str, Any], group: Row, mappings: Mapping[str, str | None], tag: str,
         resource_run_id: str, kind: str) -> tuple[tuple[VMPlan, ...], list[str], tuple[str, ...], int]:
    problems: list[str] = []
    networks: set[str] = set()
    provisioned = 0
    plans: list[VMPlan] = []
    entries = [e for e in payload.get("vms") or [] if isinstance(e, Mapping) and e.get("protected_vm")]
    for entry in entries:
        protected, vm = entry["protected_vm"], entry.get("vm") or None
        pid = str(protected["id"])
        source_name = str((vm or {}).get("name") or pid)
        spec = None
        if kind == "test":
            try:
                spec, nets, size = _spec(protected, vm, group, mappings, tag, resource_run_id)
                networks.update(nets)
                provisioned += size
            except PermanentError as exc:
                problems.append(str(exc))
        plans.append(VMPlan(pid, source_name, int(protected.get("boot_priority") or 3),
                            int(protected.get("boot_delay_seconds") or 0),
                            int(300 if protected.get("tools_timeout_seconds") is None
                                else protected["tools_timeout_seconds"]), spec))
    if kind == "cleanup":
        known = {p.protected_vm_id for p in plans}
        for step in payload.get("test_steps") or []:
            pid = step.get("protected_vm_id")
            if step.get("name") == "create_vm" and pid and str(pid) not in known:
                known.add(str(pid))  # left the group since the test: its test VM still goes
                plans.append(VMPlan(str(pid), str(pid), 6, 0, 0, None))
    plans.sort(key=lambda p: (p.priority, p.source_name, p.protected_vm_id))
    if kind == "test" and not plans:
        problems.append(f"protection group {group.get('name')!r} has no protected VMs: add protected_vms rows")
    return tuple(plans), problems, tuple(sorted(networks)), provisioned


def _spec(protected: Row, vm: Row | None, group: Row, mappings: Mapping[str, str | None], tag: str,
          resource_run_id: str) -> tuple[RecoveryVMSpec, set[str], int]:
    pid = str(protected["id"])
    if not vm:
        raise PermanentError(f"protected VM {pid} has no inventory (protected_vms.vm_id names no vcenter_vms "
                             "row): sync the source vCenter and fix vm_id")
    name = str(vm.get("name") or "")
    for column in ("num_cpu", "memory_mb"):
        if not isinstance(vm.get(column), int) or vm[column] <= 0:
            raise PermanentError(f"VM {name!r}: vcenter_vms.{column} is {vm.get(column)!r}, not a positive "
                                 "number: sync the source vCenter")
    raw_disks = vm.get("disks")
    if not isinstance(raw_disks, list) or not raw_disks:
        raise PermanentError(f"VM {name!r}: vcenter_vms.disks lists no disks, so there is nothing to boot "
                             "from: sync the source vCenter")
    protection_ds = str(group.get("protection_datastore") or "")
    disks = []
    for i, d in enumerate(raw_disks):
        field_name = f"vcenter_vms.disks[{i}] of VM {name!r}"
        if not isinstance(d, Mapping) or not isinstance(d.get("file"), str):
            raise PermanentError(f"{field_name} has no 'file' string: sync the source vCenter")
        try:
            capacity = int(d.get("capacity") or 0)
        except (TypeError, ValueError):
            raise PermanentError(f"{field_name}.capacity {str(d.get('capacity'))[:60]!r} is not a number of "
                                 "bytes: sync the source vCenter") from None
        disks.append(RecoveryDisk(map_disk_path(d["file"], protection_ds, tag, f"{field_name}.file"),
                                  capacity, str(d.get("controller") or "lsilogic")))
    nics, needed = [], set()
    raw_nets = vm.get("networks")
    for net in raw_nets if isinstance(raw_nets, list) else []:
        net = str(net)
        if net not in mappings:
            raise PermanentError(
                f"VM {name!r} has a NIC on network {net!r}, which has no network_mappings row in group "
                f"{group.get('name')!r}: insert one (source_network {net!r}, recovery_network, test_network; "
                "test_network null = an isolated port group for the test)")
        test_net = mappings[net]
        nics.append(RecoveryNic(test_net or tag, net))
        if test_net:
            needed.add(test_net)
    spec = RecoveryVMSpec(
        run_id=resource_run_id, protected_vm_id=pid, name=vm_name(name, tag), datastore=tag,
        num_cpu=int(vm["num_cpu"]), memory_mb=int(vm["memory_mb"]),
        guest_id=str(vm.get("guest_id") or "otherGuest64"), firmware=str(vm.get("firmware") or "bios"),
        disks=tuple(disks), nics=tuple(nics))
    return spec, needed, sum(d.capacity for d in disks)
