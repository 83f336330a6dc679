"""``RecoveryComputeReal``: what a recovery run does at the DR vCenter (``handlers.recovery.backends``).

The site check and placement, the run's NFS datastore on every host of the placement, the
run's isolated port group; the VMs themselves are in ``recovery_vm``. Every call is idempotent
(it reads first and makes only what is missing) and checks ``stop`` right before each change.

Two things vcsim 0.24.2 does differently from vSphere, and what this module does about them
(docs/recovery.md, "DR vCenter: placement, datastores, port groups"):

- ``RemoveDatastore`` does not exist there (``MethodNotFound``): ``remove_datastore`` returns a
  warning in words naming the hosts where the datastore stays mounted.
- A standard port group is one ``Network`` per datacenter in vCenter, shared by every host that
  has a port group of that name. vcsim makes the ``Network`` on the first host's ``AddPortGroup``
  and answers ``DuplicateName`` on the next host's. That answer is taken as "present" only when
  another host of the placement already holds the port group on the run's own vSwitch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from pyVmomi import vim, vmodl

from handlers.backends.vcenter import recovery_vm
from handlers.backends.vcenter.placement import Compute, Host, computes, datacenters, named_compute
from handlers.backends.vcenter.query import Props, check_stop, collect, properties
from handlers.backends.vcenter.session import VCenterSessions, name_list, where
from handlers.errors import PermanentError
from handlers.recovery.backends import Placement, Readiness, RecoveryVMSpec, SiteCheck, VMRef
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

VSWITCH_PORTS = 128


class RecoveryComputeReal:
    def __init__(self, sessions: VCenterSessions, await_seconds: float = recovery_vm.AWAIT_SECONDS) -> None:
        self._sessions = sessions
        self._await_seconds = await_seconds
        self._lookups = recovery_vm.Lookups()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, vcenter: VCenterEndpoint, what: str) -> threading.Lock:
        # Spares threads of one process the round trips of racing for one object; across
        # processes each creation is safe by itself (module recovery_vm, and the reads here).
        with self._guard:
            return self._locks.setdefault((vcenter.id, what), threading.Lock())

    # ---- the site --------------------------------------------------------------------------

    def check_site(self, vcenter: VCenterEndpoint, networks: Sequence[str], cluster: str | None,
                   stop: threading.Event) -> SiteCheck:
        return self._sessions.run(vcenter, lambda si: _check_site(si, vcenter, networks, cluster))

    # ---- the run's datastore ---------------------------------------------------------------

    def present_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          remote_host: str, remote_path: str, stop: threading.Event) -> bool:
        with self._lock(vcenter, "ds:" + name):
            return self._sessions.run(
                vcenter, lambda si: _present(si, vcenter, placement, name, remote_host, remote_path, stop)
            )

    def remove_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                         stop: threading.Event) -> str | None:
        with self._lock(vcenter, "ds:" + name):
            return self._sessions.run(vcenter, lambda si: _remove_datastore(si, vcenter, placement, name, stop))

    # ---- the run's isolated port group -----------------------------------------------------

    def create_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        with self._lock(vcenter, "pg:" + name):
            return self._sessions.run(vcenter, lambda si: _create_port_group(si, vcenter, placement, name, stop))

    def remove_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        with self._lock(vcenter, "pg:" + name):
            return self._sessions.run(vcenter, lambda si: _remove_port_group(si, vcenter, placement, name, stop))

    # ---- VMs (recovery_vm) -----------------------------------------------------------------

    def create_vm(self, vcenter: VCenterEndpoint, placement: Placement, spec: RecoveryVMSpec,
                  stop: threading.Event) -> VMRef:
        with self._lock(vcenter, f"vm:{spec.run_id}:{spec.protected_vm_id}"):
            return self._sessions.run(
                vcenter, lambda si: recovery_vm.create_vm(
                    si, vcenter, placement, spec, stop, self._await_seconds, self._lookups)
            )

    def power_on(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
        return self._sessions.run(vcenter, lambda si: recovery_vm.power_on(si, vcenter, moref, stop))

    def wait_ready(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float,
                   stop: threading.Event) -> Readiness:
        return self._sessions.run(vcenter, lambda si: recovery_vm.wait_ready(si, moref, timeout_seconds, stop))

    def destroy_vm(self, vcenter: VCenterEndpoint, moref: str, run_id: str, stop: threading.Event) -> bool:
        return self._sessions.run(vcenter, lambda si: recovery_vm.destroy_vm(si, vcenter, moref, run_id, stop))

    def find_run_vms(self, vcenter: VCenterEndpoint, run_id: str, stop: threading.Event) -> dict[str, str]:
        return self._sessions.run(vcenter, lambda si: recovery_vm.find_run_vms(si, vcenter, run_id))


# ---- the site check ------------------------------------------------------------------------------


def _check_site(si: Any, vcenter: VCenterEndpoint, networks: Sequence[str], cluster: str | None) -> SiteCheck:
    dcs = datacenters(si)
    chosen: tuple[Props, Compute] | None = None
    for dc in dcs:
        found = computes(si, dc)
        if cluster:
            if any(c.name == cluster for c in found):
                chosen = (dc, named_compute(vcenter, dc, found, cluster))
                break
            continue
        usable = [c for c in found if c.connected()]
        if usable:  # clusters come first (placement.computes)
            chosen = (dc, usable[0])
            break
    if chosen is None:
        if cluster:
            raise PermanentError(
                f"cluster or host {cluster!r} does not exist at {where(vcenter)} in datacenter "
                f"{name_list([str(d.get('name')) for d in dcs])}: fix protection_groups.dr_cluster"
            )
        raise PermanentError(f"{where(vcenter)} has no cluster or host with a connected host to run VMs on")
    dc, compute = chosen
    hosts = compute.connected()
    if not hosts:
        raise PermanentError(
            f"{compute.name!r} at {where(vcenter)} has no connected host "
            f"({name_list([h.name for h in compute.hosts])}): reconnect one, or change protection_groups.dr_cluster"
        )
    have = {str(p.get("name")) for _, p in collect(si, vim.Network, ["name"], root=dc["self"])}
    missing = tuple(dict.fromkeys(n for n in networks if n not in have))
    placement = Placement(datacenter=str(dc.get("name")), compute_resource=compute.name,
                          hosts=tuple(h.name for h in hosts))
    return SiteCheck(networks_missing=missing, placement=placement)


def _hosts(si: Any, vcenter: VCenterEndpoint, placement: Placement) -> list[Host]:
    """The placement's hosts, in its order; one that is gone or disconnected is refused by name."""
    dc = next((d for d in datacenters(si) if d.get("name") == placement.datacenter), None)
    if dc is None:
        raise PermanentError(f"datacenter {placement.datacenter!r} no longer exists at {where(vcenter)}")
    by_name = {h.name: h for c in computes(si, dc) for h in c.hosts}
    absent = [n for n in placement.hosts if n not in by_name or not by_name[n].connected]
    if absent:
        raise PermanentError(
            f"host {name_list(absent)} of {placement.compute_resource!r} is gone or not connected at "
            f"{where(vcenter)}: reconnect it, or clean up and start a new run"
        )
    return [by_name[n] for n in placement.hosts]


def _config_manager(si: Any, host: Host, what: str) -> Any:
    return properties(si, host.obj, [f"configManager.{what}"]).get(f"configManager.{what}")


# ---- datastores ----------------------------------------------------------------------------------


def _mounted(si: Any, host: Host, name: str) -> tuple[Any, Any] | None:
    """(datastore, its info) when ``host`` mounts a datastore named ``name``."""
    refs = [vim.Datastore(d, si._stub) for d in sorted(host.datastores)]
    for ds in refs:
        props = properties(si, ds, ["name", "info"])
        if props.get("name") == name:
            return ds, props.get("info")
    return None


def _present(si: Any, vcenter: VCenterEndpoint, placement: Placement, name: str, remote_host: str,
             remote_path: str, stop: threading.Event) -> bool:
    hosts = _hosts(si, vcenter, placement)
    todo = []
    for host in hosts:  # every refusal before the first mount
        hit = _mounted(si, host, name)
        if hit is None:
            todo.append(host)
            continue
        nas = getattr(hit[1], "nas", None)
        there = (getattr(nas, "remoteHost", None), getattr(nas, "remotePath", None))
        if there != (remote_host, remote_path):
            raise PermanentError(
                f"host {host.name!r} at {where(vcenter)} already mounts a datastore {name!r} backed by "
                f"{there[0]}:{there[1]}, not {remote_host}:{remote_path}: it is not this run's; rename or "
                "unmount it"
            )
    for host in todo:
        check_stop(stop, f"before datastore {name} was mounted on {host.name}")
        spec = vim.host.NasVolume.Specification(
            remoteHost=remote_host, remotePath=remote_path, localPath=name, accessMode="readWrite", type="NFS"
        )
        log.info("%s: mounting %s:%s as datastore %s on %s", where(vcenter), remote_host, remote_path, name, host.name)
        try:
            _config_manager(si, host, "datastoreSystem").CreateNasDatastore(spec)
        except vim.fault.DuplicateName:
            log.info("%s: %s mounted datastore %s meanwhile", where(vcenter), host.name, name)
    return bool(todo)


def _remove_datastore(si: Any, vcenter: VCenterEndpoint, placement: Placement, name: str,
                      stop: threading.Event) -> str | None:
    left: list[str] = []
    why = ""
    for host in _hosts(si, vcenter, placement):
        hit = _mounted(si, host, name)
        if hit is None:
            continue
        check_stop(stop, f"before datastore {name} was unmounted from {host.name}")
        try:
            _config_manager(si, host, "datastoreSystem").RemoveDatastore(hit[0])
            log.info("%s: unmounted datastore %s from %s", where(vcenter), name, host.name)
        except vmodl.fault.MethodNotFound:
            left.append(host.name)
            why = "it has no RemoveDatastore (MethodNotFound)"
        except vmodl.fault.ManagedObjectNotFound:
            continue  # unmounted meanwhile
    if not left:
        return None
    return (
        f"{where(vcenter)} cannot unmount datastores ({why}): datastore {name!r} stays mounted on "
        f"{name_list(left)}, inaccessible once its clone is destroyed; unmount it there by hand"
    )


# ---- port groups ---------------------------------------------------------------------------------


def _network_info(si: Any, host: Host) -> tuple[Any, set[str], set[str]]:
    """(network system, vSwitch names, port group names) of a host."""
    system = _config_manager(si, host, "networkSystem")
    info = properties(si, system, ["networkInfo"]).get("networkInfo")
    switches = {str(v.name) for v in getattr(info, "vswitch", None) or ()}
    groups = {str(p.spec.name) for p in getattr(info, "portgroup", None) or () if p.spec is not None}
    return system, switches, groups


def _create_port_group(si: Any, vcenter: VCenterEndpoint, placement: Placement, name: str,
                       stop: threading.Event) -> bool:
    hosts = _hosts(si, vcenter, placement)
    state = [(h, *_network_info(si, h)) for h in hosts]
    dc = next(d for d in datacenters(si) if d.get("name") == placement.datacenter)
    exists = any(p.get("name") == name for _, p in collect(si, vim.Network, ["name"], root=dc["self"]))
    ours = any(name in switches and name in groups for _, _, switches, groups in state)
    if exists and not ours:
        raise PermanentError(
            f"a network named {name!r} exists at {where(vcenter)} in datacenter {placement.datacenter!r} but no "
            f"host of {placement.compute_resource!r} has it on a vSwitch {name!r}: it is not this run's; rename it"
        )
    made = False
    for host, system, switches, groups in state:
        if name not in switches:
            check_stop(stop, f"before vSwitch {name} was added on {host.name}")
            # No bridge: a vSwitch without uplinks, so the test's VMs reach nothing outside the host.
            system.AddVirtualSwitch(vswitchName=name, spec=vim.host.VirtualSwitch.Specification(numPorts=VSWITCH_PORTS))
            made = True
        if name in groups:
            continue
        check_stop(stop, f"before port group {name} was added on {host.name}")
        spec = vim.host.PortGroup.Specification(name=name, vlanId=0, vswitchName=name, policy=vim.host.NetworkPolicy())
        try:
            system.AddPortGroup(portgrp=spec)
            made = True
        except vim.fault.DuplicateName:
            # vcsim: one Network per datacenter, made by the first host (module docstring).
            if not any(name in g for h, _, _, g in state if h is not host):
                raise
            log.debug("%s: port group %s exists in the datacenter; %s shares it", where(vcenter), name, host.name)
        except vim.fault.AlreadyExists:
            pass  # added meanwhile
        groups.add(name)
    return made


def _remove_port_group(si: Any, vcenter: VCenterEndpoint, placement: Placement, name: str,
                       stop: threading.Event) -> bool:
    removed = False
    for host in _hosts(si, vcenter, placement):
        system, switches, groups = _network_info(si, host)
        if name in groups:
            check_stop(stop, f"before port group {name} was removed from {host.name}")
            try:
                system.RemovePortGroup(pgName=name)
                removed = True
            except vim.fault.NotFound:
                pass
        if name in switches:
            check_stop(stop, f"before vSwitch {name} was removed from {host.name}")
            try:
                system.RemoveVirtualSwitch(vswitchName=name)
                removed = True
            except vim.fault.NotFound:
                pass
    return removed
