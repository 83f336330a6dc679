"""The ``sharenfs`` value a recovery clone gets, and how to tell whether the host really exports it.

Two dialects, read from what each ZFS's own ``zfs`` binary does with the property:

* zfs-fuse 0.7 (found by ``Caps.written`` being False: it has no ``written`` property) accepts
  ``on`` (``exportfs -o fsid=N,no_subtree_check '*:<mountpoint>'``: read-only, root squashed,
  useless to ESXi) or space-separated ``<client>:<options>`` entries, each becoming ``exportfs -o
  <options>,fsid=N,no_subtree_check '<client>:<mountpoint>'``. Any other form fails without
  running anything ("exportfs failed"). It runs ``exportfs`` through ``system()``: the value
  reaches a shell on the storage host, so every part of it is checked here first.
* OpenZFS on Linux: ``rw=<client>[:<client>...],<options>`` handed to ``exportfs``.

ESXi mounts NFS v3 as root and writes: ``rw,no_root_squash`` (``sync``; ``crossmnt`` so the
children of a dataset tree's clone are reachable under the root's export).

Whether the host exports it: ``/var/lib/nfs/etab``, the table ``exportfs`` writes and zfs-fuse
itself reads to decide "already shared". Whether anything serves it: ``/proc/fs/nfsd/threads``
(Linux's NFS server; 0 or missing: none runs).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from handlers.recovery.backends import ExportNotServed

ESXI_OPTIONS = "rw,no_root_squash,sync,crossmnt"
ETAB = "/var/lib/nfs/etab"
NFSD_THREADS = "/proc/fs/nfsd/threads"
ETAB_ARGV = ["cat", ETAB]
THREADS_ARGV = ["cat", NFSD_THREADS]
EXPORTFS_ARGV = ["sh", "-c", "command -v exportfs"]  # a constant script: nothing of ours in it
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_WILDCARD = re.compile(r"^\*$|^\*\.[A-Za-z0-9.\-]+$")  # '*' or '*.example.org'


class NFSExportError(ExportNotServed):
    """The clone's ``sharenfs`` is set, but the storage host does not serve it (yet).

    Carries what a caller needs to say exactly what happened: the property now set, whether
    the host's export table lists the path, and whether an NFS server runs there."""

    def __init__(self, message: str, path: str, sharenfs: str, listed: bool, served: bool | None) -> None:
        super().__init__(message)
        self.path = path
        self.sharenfs = sharenfs
        self.listed = listed
        self.served = served


def check_clients(clients: Sequence[str]) -> tuple[str, ...]:
    """Who may mount a clone: host names, addresses, networks (``10.0.0.0/24``) or ``*``."""
    if not clients:
        raise ValueError("nfs_clients is empty: name the DR ESXi hosts' addresses or networks, or '*'")
    for client in clients:
        if _WILDCARD.fullmatch(client):
            continue
        try:
            ipaddress.ip_network(client, strict=False)
            continue
        except ValueError:
            pass
        # vCenter inventory names of hosts may carry '_' (no shell meaning, exportfs takes it).
        if not _CLIENT_NAME.fullmatch(client):
            raise ValueError(f"nfs_clients {client[:100]!r} is not a host name, an address or a network "
                             "(letters, digits, '.', '-' and '_' only)")
    return tuple(clients)


def sharenfs_value(clients: Sequence[str], fuse: bool) -> str:
    """The property for ``clients`` in the host's dialect (``fuse``: zfs-fuse's ``client:opts``)."""
    if fuse:
        return " ".join(f"{client}:{ESXI_OPTIONS}" for client in clients)
    if list(clients) == ["*"]:
        return ESXI_OPTIONS
    return "rw=" + ":".join(clients) + "," + ESXI_OPTIONS.removeprefix("rw,")


def listed(etab: str, path: str) -> bool:
    """Whether the export table has ``path`` (exportfs writes a space in a path as ``\\040``)."""
    for line in etab.splitlines():
        exported = line.split("\t", 1)[0].replace("\\040", " ")
        if exported == path:
            return True
    return False


def served(threads: str | None) -> bool | None:
    """An NFS server runs (threads > 0); None when the host cannot say (not Linux's nfsd)."""
    if threads is None:
        return None
    value = threads.strip()
    return value.isdigit() and int(value) > 0


@dataclass(frozen=True)
class ExportState:
    sharenfs: str  # the property now
    listed: bool  # in the host's export table
    served: bool | None  # an NFS server runs there (None: cannot tell)
    exportfs: bool = True  # the host has exportfs (nfs-utils), which both ZFS dialects run


def explain(dataset: str, path: str, state: ExportState, set_error: str) -> str:
    """In words, why ``dataset`` is not exported though its property says so."""
    head = f"sharenfs={state.sharenfs!r} is set on {dataset}, but "
    if not state.exportfs or ("exportfs" in set_error and "not found" in set_error):
        said = f" ({set_error.strip()})" if set_error.strip() else ""
        return head + (f"the storage host has no exportfs{said}: install nfs-kernel-server there "
                       "and start its NFS server, then run the step again")
    if not state.listed:
        return head + (f"{path} is not in the host's export table ({ETAB})"
                       + (f": zfs said {set_error.strip()!r}" if set_error.strip() else "")
                       + "; check exportfs and the NFS server on the storage host")
    return head + (f"no NFS server runs on the storage host ({NFSD_THREADS} is missing or 0; on Linux the kernel "
                   "needs nfsd and the nfs-kernel-server service): the export table lists "
                   f"{path}, but no DR host can mount it until the server runs")
