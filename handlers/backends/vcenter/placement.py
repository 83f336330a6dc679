"""Where a VM Zerfaux creates may go: compute resources, the hosts that see a datastore, folders, networks.

Shared by DR shells (``shell``) and recovery runs (``recovery``). A VM must go to a compute
resource with a host that mounts its datastores: vcsim drops the connection otherwise (its
``createVM`` picks a random host among those that mount the ``.vmx``'s datastore, of which there
are none) and a real vCenter refuses. Visibility is read from each host's ``datastore`` list, not
from ``datastore.host``: vcsim lists no hosts for NAS datastores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from handlers.backends.vcenter.query import Props, collect, properties
from handlers.backends.vcenter.session import name_list, where
from handlers.errors import PermanentError
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)
_dev = vim.vm.device
CONNECTED = "connected"


@dataclass(frozen=True)
class Host:
    obj: Any
    name: str
    connected: bool
    datastores: frozenset[str]  # morefs of the datastores this host mounts


@dataclass(frozen=True)
class Compute:
    obj: Any
    name: str
    is_cluster: bool
    pool: Any  # the root resource pool
    hosts: tuple[Host, ...]

    def connected(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.connected)

    def seeing(self, datastore_ids: Sequence[str]) -> tuple[Host, ...]:
        """Connected hosts that mount every one of ``datastore_ids``."""
        return tuple(h for h in self.connected() if all(d in h.datastores for d in datastore_ids))


def datacenters(si: Any) -> list[Props]:
    """Every datacenter as ``{name, datastore, network, vmFolder, hostFolder, self}``, by name."""
    rows = collect(si, vim.Datacenter, ["name", "datastore", "network", "vmFolder", "hostFolder"])
    return sorted(({**p, "self": o} for o, p in rows), key=lambda p: str(p.get("name")))


def computes(si: Any, dc: Props) -> list[Compute]:
    """The datacenter's clusters (first) and standalone hosts, each by name: "the first" is stable."""
    hosts = {
        o._moId: Host(
            obj=o,
            name=str(p.get("name")),
            connected=str(p.get("runtime.connectionState")) == CONNECTED,
            datastores=frozenset(d._moId for d in p.get("datastore") or ()),
        )
        for o, p in collect(si, vim.HostSystem, ["name", "datastore", "runtime.connectionState"], root=dc["hostFolder"])
    }
    found = [
        Compute(
            obj=o,
            name=str(p.get("name")),
            is_cluster=isinstance(o, vim.ClusterComputeResource),
            pool=p.get("resourcePool"),
            hosts=tuple(hosts[h._moId] for h in p.get("host") or () if h._moId in hosts),
        )
        for o, p in collect(si, vim.ComputeResource, ["name", "resourcePool", "host"], root=dc["hostFolder"])
    ]
    return sorted(found, key=lambda c: (not c.is_cluster, c.name))


def named_compute(vcenter: VCenterEndpoint, dc: Props, found: list[Compute], cluster: str) -> Compute:
    hit = next((c for c in found if c.name == cluster), None)
    if hit is None:
        raise PermanentError(
            f"cluster {cluster!r} does not exist at {where(vcenter)} in datacenter {dc.get('name')!r}: "
            f"fix protection_groups.dr_cluster; clusters and hosts there: {name_list([c.name for c in found])}"
        )
    return hit


def by_visibility(
    vcenter: VCenterEndpoint, dc: Props, found: list[Compute], datastores: dict[str, Any], cluster: str | None
) -> list[Compute]:
    """Compute resources (``cluster`` alone when set) with a connected host mounting every datastore.

    ``datastores`` maps names to datastore objects. None at all: ``PermanentError`` at once,
    naming each datastore and the hosts that lack it, rather than a creation vSphere cannot do.
    """
    ids = [d._moId for d in datastores.values()]
    pool = [named_compute(vcenter, dc, found, cluster)] if cluster else found
    fit = [c for c in pool if c.seeing(ids)]
    if fit:
        return fit
    hosts = [h for c in pool for h in c.connected()]
    lacking = []
    for name, ds in datastores.items():
        without = [h.name for h in hosts if ds._moId not in h.datastores]
        if without:
            lacking.append(f"datastore {name!r} is not mounted on {name_list(without)}")
    scope = f"cluster {cluster!r}" if cluster else f"datacenter {dc.get('name')!r}"
    names = " and ".join(repr(n) for n in datastores)
    raise PermanentError(
        f"no connected host in {scope} at {where(vcenter)} mounts {names}: "
        f"{'; '.join(lacking) or 'it has no connected host'}. Mount the datastores on the hosts of "
        "protection_groups.dr_cluster (or set dr_cluster to a cluster or host that mounts them)"
    )


def resource_pool(
    si: Any, vcenter: VCenterEndpoint, dc: Props, eligible: list[Compute], pool_name: str | None
) -> Any:
    """``pool_name`` among the eligible compute resources' pools, else the first one's root pool."""
    if not pool_name:
        return eligible[0].pool
    owners = {c.obj._moId: c.name for c in eligible}
    pools = collect(si, vim.ResourcePool, ["name", "owner"], root=dc["hostFolder"])
    hits = [o for o, p in pools if p.get("name") == pool_name and p["owner"]._moId in owners]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise PermanentError(
            f"{len(hits)} resource pools are named {pool_name!r} at {where(vcenter)}: "
            "set protection_groups.dr_cluster to say which cluster's pool to use"
        )
    names = sorted({f"{p.get('name')} ({owners.get(p['owner']._moId, 'elsewhere')})" for _, p in pools})
    raise PermanentError(
        f"resource pool {pool_name!r} does not exist at {where(vcenter)} in datacenter {dc.get('name')!r} "
        f"on {name_list(sorted(owners.values()))} (where the datastores are mounted): fix "
        f"protection_groups.dr_resource_pool; pools there: {name_list(names)}"
    )


def vm_folder(si: Any, vcenter: VCenterEndpoint, folder: str | None, dc: Props) -> Any:
    if not folder or folder.strip("/") in ("vm", f"{dc.get('name')}/vm"):
        return dc["vmFolder"]
    folders = collect(si, vim.Folder, ["name"], root=dc["vmFolder"])
    wanted = folder.strip("/").split("/")[-1]
    hit = next((o for o, p in folders if p.get("name") == wanted), None)
    if hit is None:
        names = sorted(str(p.get("name")) for _, p in folders)
        raise PermanentError(
            f"VM folder {folder!r} does not exist at {where(vcenter)} in datacenter {dc.get('name')!r}: "
            f"fix protection_groups.dr_folder; folders below its root 'vm' folder: {name_list(names)}"
        )
    return hit


def network_backing(
    si: Any, vcenter: VCenterEndpoint, network: str, dc: Props, field: str = "protection_groups.dr_network"
) -> Any:
    """The NIC backing for ``network`` in the datacenter (standard or distributed port group)."""
    nets = collect(si, vim.Network, ["name"], root=dc["self"])
    hit = next((o for o, p in nets if p.get("name") == network), None)
    if hit is None:
        names = sorted({str(p.get("name")) for _, p in nets})
        raise PermanentError(
            f"network {network!r} does not exist at {where(vcenter)}: fix {field}; networks there: {name_list(names)}"
        )
    if isinstance(hit, vim.dvs.DistributedVirtualPortgroup):
        pg = properties(si, hit, ["key", "config.distributedVirtualSwitch"])
        switch = properties(si, pg["config.distributedVirtualSwitch"], ["uuid"])
        port = vim.dvs.PortConnection(portgroupKey=pg["key"], switchUuid=switch["uuid"])
        return _dev.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    if isinstance(hit, vim.OpaqueNetwork):
        raise PermanentError(f"network {network!r} is an NSX opaque network, which Zerfaux does not support yet")
    return _dev.VirtualEthernetCard.NetworkBackingInfo(deviceName=network, network=hit)
