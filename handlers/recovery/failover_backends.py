"""What a failover, a planned migration, a rollback and a reprotect (issue 14) will need from the sites.

Groundwork only: no run calls these yet. Two Protocols beside ``handlers.recovery.backends``
(whose Protocols stay as they are): ``FailoverCompute`` for either vCenter (the source's VMs are
shut down and fenced, the DR shells get their disks and networks), ``FailoverStorage`` for
either storage host (the DR replica before and after a failover, the original site's dataset
at a reprotect).

The rules of ``handlers.recovery.backends`` hold here too: every method blocks (run it in a
worker thread), converges when called again with the same arguments, checks ``stop`` before it
starts anything new, and raises ``PermanentError`` or ``TransientError`` only. On top of them:
nothing here ever deletes a disk file, a dataset or a snapshot. Disks are detached with no
``fileOperation``; a rollback goes back to the newest snapshot only (plain ``zfs rollback``,
never ``-r``/``-R``); a rename refuses to replace anything.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from handlers.recovery.backends import RecoveryDisk, RecoveryNic
from handlers.types import SSHEndpoint, VCenterEndpoint

PRE_FAILOVER_PREFIX = "zerfaux_pre_failover_"


def pre_failover_snapshot(run_id: str) -> str:
    """``zerfaux_pre_failover_<8 hex of the run id>``: the snapshot a failover takes before any write."""
    return PRE_FAILOVER_PREFIX + run_id.replace("-", "")[:8]


# ---- compute (source and DR vCenter) -------------------------------------------------------------


ShutdownHow = Literal["guest", "power_off", "already_off"]


@dataclass(frozen=True)
class ShutdownResult:
    how: ShutdownHow  # guest: ShutdownGuest; power_off: hard power off; already_off: nothing done
    powered_off_at: str | None  # ISO 8601 from vCenter's power-off event; None: already off, no event
    waited_seconds: float  # from the first call to the VM being off (0 when already off)


class PowerState(NamedTuple):
    """``(state, changed_at)``: unpacks as the pair a fencing check compares."""

    state: str  # runtime.powerState: poweredOn | poweredOff | suspended
    changed_at: str | None  # ISO 8601 of the newest power event of the VM (or its boot time); None: unknown


@dataclass(frozen=True)
class AttachResult:
    attached: tuple[str, ...]  # files attached by this call
    already: tuple[str, ...]  # files that were attached before it (nothing done for them)


@dataclass(frozen=True)
class NicChange:
    device_key: int  # the NIC's key in the VM (negative: added by this call)
    source_network: str
    network: str
    changed: bool  # False: it was on ``network`` already


class FailoverCompute(Protocol):
    def shutdown_vm(self, vcenter: VCenterEndpoint, moref: str, timeout_seconds: float, force_power_off: bool,
                    stop: threading.Event) -> ShutdownResult:
        """Stop a VM and wait until ``runtime.powerState`` is poweredOff.

        With VMware Tools running: ``ShutdownGuest`` and wait up to ``timeout_seconds``. Without
        Tools (or ``ToolsUnavailable``): wait the same time for the VM to go off by itself. Then,
        still on: a hard power off when ``force_power_off``, else ``PermanentError`` naming the VM
        and ``options.force_power_off`` (the VM is left running). Already off: ``already_off``, no
        call. A suspended VM is powered off only when ``force_power_off``."""
        ...

    def power_state(self, vcenter: VCenterEndpoint, moref: str, stop: threading.Event) -> PowerState:
        """The VM's power state and when it last changed (fencing: is the source VM really off, since
        when). No effect."""
        ...

    def power_states(self, vcenter: VCenterEndpoint, morefs: Sequence[str], stop: threading.Event) -> dict[str, str]:
        """``{moref: runtime.powerState}`` of many VMs in one read (no change times: ``power_state``
        has those). A moref with no VM at the vCenter is absent from the answer. No effect."""
        ...

    def attach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, disks: Sequence[RecoveryDisk],
                     stop: threading.Event) -> AttachResult:
        """Attach existing VMDKs (``[datastore] dir/disk.vmdk`` on the presented replica datastore) to a
        DR shell (a VM carrying ``zerfaux.protected_vm_id``), with NO ``fileOperation``: nothing is
        created or replaced. A file attached already is left as it is; controllers are added only
        when the shell has none of a disk's kind with a free unit. The datastore must be mounted on
        the shell's host, else ``PermanentError`` naming it."""
        ...

    def detach_disks(self, vcenter: VCenterEndpoint, shell_moref: str, stop: threading.Event) -> tuple[str, ...]:
        """Remove every disk from a powered-off DR shell, ``fileOperation`` unset: the files stay
        where they are. Returns the files detached (empty: none was attached)."""
        ...

    def set_networks(self, vcenter: VCenterEndpoint, moref: str, nics: Sequence[RecoveryNic],
                     stop: threading.Event) -> tuple[NicChange, ...]:
        """Put the VM's NICs on ``nics[i].network`` in device order (the shell's NICs are made in its
        source VM's order); a NIC missing for an entry is added, NICs beyond the list are left alone.
        Every network is looked up before the one reconfiguration: an unknown one is a
        ``PermanentError`` naming it and ``network_mappings``, nothing changed."""
        ...


# ---- storage (a ZFS host over SSH) ---------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot: str  # dataset@name
    guid: str
    created: bool  # False: it existed, its GUID is returned


@dataclass(frozen=True)
class Written:
    bytes: int | None  # data written to the dataset since the snapshot; None: this ZFS cannot say
    how: str  # "written" (the property), "send_stream" (counted from an incremental stream), "unavailable"
    note: str = ""  # what a person should know (what the host could not do)


@dataclass(frozen=True)
class CommonSnapshot:
    name: str  # the snapshot's name (after the @) on the first dataset
    guid: str  # decimal text
    created: str  # ISO 8601 UTC, its creation on the first dataset


@dataclass(frozen=True)
class KeptChanges:
    kept_dataset: str  # <ds>_zerfaux_kept_<8 hex>: the dataset as it was, every snapshot with it
    kept_snapshot: str  # <kept_dataset>@zerfaux_kept_<8 hex>: its last state, held
    hold_tag: str  # the tag of the hold on kept_snapshot (zfs release <tag> ... lets it go)
    clone: str  # ds again: a clone of <kept_dataset>@<common>, newest state the common snapshot


KEPT_PREFIX = "zerfaux_kept_"
SUPERSEDED_PREFIX = "zerfaux_superseded_"


def kept_names(dataset: str, run_id: str) -> tuple[str, str]:
    """(``<ds>_zerfaux_kept_<8 hex>``, ``zerfaux_kept_<8 hex>``): where keep_changes puts a dataset's changes."""
    short = run_id.replace("-", "")[:8]
    return f"{dataset}_{KEPT_PREFIX}{short}", f"{KEPT_PREFIX}{short}"


class FailoverStorage(Protocol):
    def snapshot(self, target: SSHEndpoint, dataset: str, name: str, stop: threading.Event,
                 run_id: str | None = None) -> SnapshotInfo:
        """``zfs snapshot dataset@name`` (``-r`` where the dataset has children, marked
        ``zerfaux:recovery_run=<run_id>`` when given); an existing snapshot of that name is not made
        again, its GUID is returned (``created`` False)."""
        ...

    def rollback(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        """Plain ``zfs rollback dataset@snapshot`` (each dataset of the tree, parents first), and only
        to the NEWEST snapshot: a snapshot with newer ones after it is refused with ``PermanentError``
        naming them, before any rollback (nothing is destroyed, ever). Rolling back again is
        harmless. Returns the datasets rolled back."""
        ...

    def promote_writable(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> str:
        """Make a received replica usable at the DR site: ``readonly=off`` where it was on, mounted
        (replicas are received with ``-u``); returns the mountpoint. Mounted and writable: nothing."""
        ...

    def written_since(self, target: SSHEndpoint, dataset: str, snapshot: str, stop: threading.Event) -> Written:
        """How much the dataset holds beyond ``snapshot``: ``written@snapshot`` where ZFS has it; on a
        ZFS without it (zfs-fuse) the data bytes of an incremental stream from ``snapshot`` to a
        temporary ``zerfaux_probe_<hex>`` snapshot, destroyed afterwards."""
        ...

    def rename(self, target: SSHEndpoint, dataset: str, new_name: str, stop: threading.Event) -> bool:
        """``zfs rename dataset new_name`` (its snapshots and children go with it, data stays
        reachable under the new name). ``new_name`` existing: ``PermanentError``, nothing renamed;
        ``dataset`` gone and ``new_name`` there: False (renamed by an earlier attempt)."""
        ...

    def export_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event,
                       clients: Sequence[str] | None = None) -> str:
        """``RecoveryStorage.export`` for the replica itself (a failover to the newest point, a
        planned migration), which ``export`` refuses as not a clone of Zerfaux's: the same share
        and errors (``ExportNotServed``); the dataset must be mounted. Returns the path."""
        ...

    def unexport_replica(self, target: SSHEndpoint, dataset: str, stop: threading.Event) -> bool:
        """Stop sharing the replica (a rollback); False when it was not shared."""
        ...

    # ---- reprotect, failback, commit of an older point (either site's host) ----

    def newest_common_snapshot(self, a: SSHEndpoint, a_ds: str, b: SSHEndpoint, b_ds: str,
                               stop: threading.Event) -> CommonSnapshot | None:
        """The newest snapshot of ``a_ds`` (on ``a``) whose GUID ``b_ds`` (on ``b``) also has, by
        GUID only (names may differ); None when they share none. Either dataset missing:
        ``PermanentError`` naming it and its host. No effect."""
        ...

    def snapshots_after(self, target: SSHEndpoint, ds: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        """Names (after the @) of ``ds``'s snapshots newer than ``snapshot``, oldest first.
        ``snapshot`` missing: ``PermanentError``. No effect."""
        ...

    def keep_changes(self, target: SSHEndpoint, ds: str, common: str, tag: str, run_id: str,
                     stop: threading.Event) -> KeptChanges:
        """Keep what ``ds`` holds beyond ``@common`` where a person can reach it, and leave ``ds``
        with ``@common`` as its newest state so an incremental from ``common`` is received into it:
        ``zfs snapshot ds@zerfaux_kept_<8 hex>`` (held with ``tag``), ``zfs rename ds
        <ds>_zerfaux_kept_<8 hex>`` (every snapshot goes with it), ``zfs clone
        <renamed>@common ds`` with ds's mountpoint. Nothing is destroyed. Idempotent per run: a
        call after any part of an earlier one (a kill between the rename and the clone) finishes
        it. ``PermanentError``, nothing changed, when it cannot (no @common, the kept name taken by
        another dataset, children, a clone already at ds that is not this run's)."""
        ...

    def discard_changes(self, target: SSHEndpoint, ds: str, common: str, stop: threading.Event) -> tuple[str, ...]:
        """``options.discard_source_changes``, the one explicit discard: ``zfs rollback -r
        ds@common``. Returns the snapshots it destroyed (``ds@name``); already at ``@common``: ()."""
        ...

    def load_key(self, target: SSHEndpoint, ds: str, key_secret: str, stop: threading.Event) -> bool:
        """``zfs load-key`` of ``ds``'s encryption root with the value of the secret named
        ``key_secret`` (fed on stdin, never on a command line). False, nothing done: the key is
        loaded already, or the dataset is not encrypted (or this ZFS has no encryption). A wrong
        key: ``PermanentError`` naming the secret."""
        ...

    def set_readonly(self, target: SSHEndpoint, ds: str, on: bool, stop: threading.Event) -> bool:
        """``zfs set readonly=on|off ds``; False when it was so already."""
        ...

    def destroy_snapshot(self, target: SSHEndpoint, snapshot: str, run_id: str, stop: threading.Event) -> bool:
        """``zfs destroy ds@name`` (no -r), only when the snapshot carries
        ``zerfaux:recovery_run=<run_id>`` (else ``PermanentError``, nothing destroyed); False when
        it is gone already. Held or cloned: ``PermanentError``."""
        ...

    def replace_with_clone(self, target: SSHEndpoint, ds: str, clone: str, tag: str,
                           stop: threading.Event) -> dict[str, str]:
        """Commit of a failover to an older point: the clone becomes ``ds``. The clone is ``zfs
        promote``d (the replica's snapshots up to the clone's origin move to it; the newer ones stay
        with the old replica), ``ds`` renamed ``<ds>_zerfaux_superseded_<8 hex of tag>`` and the
        clone renamed to ``ds``, keeping its mountpoint (pinned first when inherited; zfs-fuse
        unmounts it for the rename, OpenZFS renames it mounted). Nothing destroyed. Idempotent.
        Returns {dataset, superseded, point (the snapshot the clone was made from)}."""
        ...

