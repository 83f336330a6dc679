"""What a recovery run needs from the DR site: one Protocol for storage, one for compute.

Every method is blocking (run it in a worker thread), idempotent (a second call with the same
arguments converges on the same state and says so rather than making a second thing), and
checks ``stop`` before it starts anything new. Errors are ``PermanentError`` (bad input, a name
that exists but is not ours, something missing that a person must create) or ``TransientError``
(the peer cannot be reached); library exceptions are translated at the boundary.

Names Zerfaux makes for a run carry ``tag``: ``zerfaux-test-<8 hex of the run id>``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from handlers.errors import PermanentError
from handlers.types import SSHEndpoint, VCenterEndpoint


def run_tag(run_id: str) -> str:
    """``zerfaux-test-<8 hex>``: the clone, the datastore, the port group and the VM suffix of a run."""
    return "zerfaux-test-" + run_id.replace("-", "")[:8]


# ---- storage (the DR storage host, ZFS over SSH) -------------------------------------------------


@dataclass(frozen=True)
class CloneInfo:
    dataset: str  # <target_root>/zerfaux-test-<8 hex>
    origin: str  # <replica>@<snapshot>
    mountpoint: str  # where the files are on the storage host (the NFS export's path)
    adopted: bool  # it existed already with this origin and Zerfaux's mark


class ExportNotServed(PermanentError):
    """The clone's NFS export is configured on the storage host, but nothing serves it there.

    ``path`` is the exported directory. A run records this as a warning and goes on: a DR host
    that cannot mount it refuses the datastore in the next step, in vSphere's words."""

    path: str


class RecoveryStorage(Protocol):
    def snapshot_guid(self, target: SSHEndpoint, snapshot: str, stop: threading.Event) -> str | None:
        """The GUID of ``dataset@snap`` on the target, or None when it does not exist."""
        ...

    def available_bytes(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> int:
        """``zfs get available`` of ``dataset`` (what a clone may grow into)."""
        ...

    def hold(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        """``zfs hold tag snapshot``; True when it was placed now, False when it was there already."""
        ...

    def release(self, target: SSHEndpoint, snapshot: str, tag: str, stop: threading.Event) -> bool:
        """``zfs release``; False (no error) when the hold or the snapshot is already gone."""
        ...

    def clone(self, target: SSHEndpoint, snapshot: str, dataset: str, run_id: str,
              stop: threading.Event) -> CloneInfo:
        """A writable, mounted clone of ``snapshot`` at ``dataset``, marked ``zerfaux:recovery_run=<run_id>``.

        Adopts a clone that exists with this origin and this mark; a dataset of that name with
        another origin or without the mark is a ``PermanentError`` (never touched)."""
        ...

    def export(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
               clients: Sequence[str] | None = None) -> str:
        """Share the clone over NFS (``sharenfs``, read-write, root not squashed) to ``clients``
        (``replication_targets.nfs_clients``, else the run's DR hosts; None: the backend's
        default); returns the exported path. ``NFSExportError`` (a ``PermanentError`` carrying
        the path) when the host set the property but does not serve the export."""
        ...

    def unexport(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        """Stop sharing; False when it was not shared or is gone."""
        ...

    def destroy_clone(self, target: SSHEndpoint, dataset: str, run_id: str, stop: threading.Event) -> bool:
        """Destroy the clone (and only a clone carrying this run's mark); False when already gone."""
        ...


# ---- compute (the DR vCenter) --------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a run's VMs go: a compute resource whose hosts will all mount the run's datastore."""

    datacenter: str
    compute_resource: str  # cluster or standalone host name
    hosts: tuple[str, ...]  # host names; the datastore is presented on each
    resource_pool: str | None = None
    folder: str | None = None


@dataclass(frozen=True)
class SiteCheck:
    networks_missing: tuple[str, ...]  # asked-for networks the DR datacenter does not have
    placement: Placement


@dataclass(frozen=True)
class RecoveryDisk:
    file: str  # "[zerfaux-test-<hex>] dir/disk.vmdk": an existing descriptor on the run's datastore
    capacity: int
    controller: str = "lsilogic"


@dataclass(frozen=True)
class RecoveryNic:
    network: str  # a DR network name; the run's own isolated port group is ``run_tag``
    source_network: str


@dataclass(frozen=True)
class RecoveryVMSpec:
    run_id: str  # extraConfig zerfaux.recovery_run_id: a retry adopts rather than making a second
    protected_vm_id: str  # extraConfig zerfaux.protected_vm_id
    name: str  # "<vm name>-test-<8 hex>"
    datastore: str  # the run's datastore: the VM's own files go there too
    num_cpu: int
    memory_mb: int
    guest_id: str
    firmware: str
    disks: tuple[RecoveryDisk, ...]
    nics: tuple[RecoveryNic, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class VMRef:
    moref: str
    adopted: bool


@dataclass(frozen=True)
class Readiness:
    ready: bool  # False: tools_timeout_seconds passed without Tools or a green heartbeat
    how: str | None  # "tools" | "heartbeat" | None
    waited_seconds: float


class RecoveryCompute(Protocol):
    def check_site(self, vcenter: VCenterEndpoint, networks: Sequence[str], cluster: str | None,
                   stop: threading.Event) -> SiteCheck:
        """Answers or raises ``TransientError``: the vCenter is there, which networks it lacks,
        and where the run's VMs will go (``cluster`` = ``protection_groups.dr_cluster`` when set,
        else the first cluster with connected hosts, else a standalone host). No effect."""
        ...

    def present_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          remote_host: str, remote_path: str, stop: threading.Event) -> bool:
        """``CreateNasDatastore`` of ``remote_host:remote_path`` named ``name`` on every host of the
        placement (same host and path everywhere); True when any host mounted it now."""
        ...

    def remove_datastore(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                         stop: threading.Event) -> str | None:
        """Unmount the datastore from every host; returns a warning in words when the vCenter
        cannot (vcsim has no ``RemoveDatastore``), None when it is gone."""
        ...

    def create_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        """An isolated standard port group ``name`` (on its own vSwitch with no uplink) on every
        host of the placement; True when made now."""
        ...

    def remove_port_group(self, vcenter: VCenterEndpoint, placement: Placement, name: str,
                          stop: threading.Event) -> bool:
        """Remove it (and its vSwitch) from every host; False when already gone."""
        ...

    def create_vm(self, vcenter: VCenterEndpoint, placement: Placement, spec: RecoveryVMSpec,
                  stop: threading.Event) -> VMRef:
        """``CreateVM_Task`` on ``spec.datastore``, powered off; adopts a VM carrying this run's and
        this protected VM's marks instead of making a second."""
        ...

    def power_on(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> str:
        """Power on (already on: no call); returns ``summary.runtime.bootTime`` as ISO 8601."""
        ...

    def wait_ready(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float,
                   stop: threading.Event) -> Readiness:
        """Wait until Tools run (``guest.toolsRunningStatus``) or the heartbeat is green, at most
        ``timeout_seconds`` (0: do not wait, ``ready`` False, ``how`` None). Stops on ``stop``."""
        ...

    def destroy_vm(self, vcenter: VCenterEndpoint, moref: str, run_id: str, stop: threading.Event) -> bool:
        """Power off (hard) and ``Destroy_Task`` a VM that carries this run's mark; False when gone.
        A VM without the mark is a ``PermanentError``, never destroyed."""
        ...

    def find_run_vms(self, vcenter: VCenterEndpoint, run_id: str, stop: threading.Event) -> dict[str, str]:
        """protected_vm_id → moref of every VM carrying this run's mark (cleanup finds what a
        killed attempt made before it could record it)."""
        ...
