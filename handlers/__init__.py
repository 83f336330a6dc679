"""Operation handlers, one module per kind; backends are chosen once, here, at start.

``handlers`` never imports ``listener``: the engine hands in what the backends need.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from handlers.context import OperationContext, StopSignal
from handlers.dr_shell import DRShellHandler
from handlers.recovery_run import RecoveryRunHandler
from handlers.errors import HandlerError, OperationCancelled, OperationStopped, PermanentError, TransientError
from handlers.replication import ReplicationHandler
from handlers.secrets import SecretResolver
from handlers.storage_vmotion import StorageVMotionHandler
from handlers.types import Row
from handlers.vcenter_sync import VCenterSyncHandler

log = logging.getLogger(__name__)

__all__ = [
    "BackendSettings",
    "BackendUnavailable",
    "Handler",
    "HandlerError",
    "HandlerSet",
    "OperationCancelled",
    "OperationContext",
    "OperationStopped",
    "PermanentError",
    "StopSignal",
    "TransientError",
    "build_handlers",
]


class Handler(Protocol):
    kind: str

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BackendSettings:
    use_stubs: bool = True
    stub_seconds: float = 0.0
    stub_seconds_jitter: float = 0.0  # a random extra of up to this much per stub operation
    stub_world: str | None = None  # directory of the stubs' shared, journaled outside world
    stub_vms: int = 50
    progress_interval: float = 1.0
    vcenter_ca_bundle: str | None = None
    ssh_cipher: str = "aes128-gcm@openssh.com"


@dataclass
class HandlerSet:
    by_kind: dict[str, Handler]
    mode: str  # "stub" | "real"
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


class _Stamped:
    """A handler whose result names the backends that produced it: ``"mode": "stub" | "real"``,
    so a result the stubs made up never passes for a real one (issue 11 §5)."""

    def __init__(self, inner: Handler, mode: str) -> None:
        self.kind = inner.kind
        self.cleans_up_on_cancel = bool(getattr(inner, "cleans_up_on_cancel", False))
        self._inner = inner
        self._mode = mode

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        return {**await self._inner(ctx, payload), "mode": self._mode}


def _handler_set(handlers: list[Handler], mode: str, closers: list[Callable[[], None]] | None = None) -> HandlerSet:
    return HandlerSet({h.kind: _Stamped(h, mode) for h in handlers}, mode, closers or [])


class BackendUnavailable(RuntimeError):
    """Real backends were asked for and cannot be built here; the message says what is missing."""


def build_handlers(settings: BackendSettings, secrets: SecretResolver) -> HandlerSet:
    if settings.use_stubs:
        from handlers.backends.stub import backends as stubs
        from handlers.backends.stub import sites
        from handlers.backends.stub.world import StubWorld

        seconds, jitter = settings.stub_seconds, settings.stub_seconds_jitter
        world = StubWorld(settings.stub_world) if settings.stub_world else None
        replication = stubs.ZFSReplicationStub(seconds, jitter=jitter, world=world)
        site_storage = sites.SiteStorageStub(seconds, jitter=jitter, world=world)
        shells = stubs.DRShellBuilderStub(seconds, jitter=jitter, world=world)
        # Inventory reads are instant by default (the demo syncs at once); in a shared world
        # they take as long as the rest, so a crash can land in the middle of one too.
        handlers: list[Handler] = [
            VCenterSyncHandler(stubs.VCenterInventoryStub(
                settings.stub_vms, seconds=seconds if world else 0.0, jitter=jitter, world=world)),
            ReplicationHandler(replication, settings.progress_interval),
            StorageVMotionHandler(stubs.StorageMoverStub(seconds, jitter=jitter, world=world)),
            DRShellHandler(shells),
            RecoveryRunHandler(site_storage, sites.SiteComputeStub(seconds, jitter=jitter, world=world,
                                                                   shells=None if world else shells.made),
                               sites.SiteReplicationStub(replication, site_storage)),
        ]
        return _handler_set(handlers, "stub")
    return _build_real(settings, secrets)


def _build_real(settings: BackendSettings, secrets: SecretResolver) -> HandlerSet:
    try:
        from handlers.backends.vcenter import real as vcenter_real
        from handlers.backends.zfs import real as zfs_real
    except ImportError as exc:
        raise BackendUnavailable(
            f"ZERFAUX_USE_STUBS=false needs the real backends, but {exc.name or exc} cannot be "
            "imported: install the project with its dependencies (pip install .) or set "
            "ZERFAUX_USE_STUBS=true"
        ) from exc
    missing = zfs_real.missing_tools()
    if missing:
        raise BackendUnavailable(
            "ZERFAUX_USE_STUBS=false needs these programs on PATH for ZFS replication: "
            + ", ".join(missing)
            + " (apt-get install openssh-client sanoid; zfs where datasets are local)"
        )
    sessions = vcenter_real.VCenterSessions(secrets, ca_bundle=settings.vcenter_ca_bundle)
    zfs = zfs_real.ZFSReplicationReal(secrets, cipher=settings.ssh_cipher)
    recovery, recovery_closers = _recovery_real(settings, secrets, sessions, zfs)
    handlers: list[Handler] = [
        VCenterSyncHandler(vcenter_real.VCenterInventoryReal(sessions)),
        ReplicationHandler(zfs, settings.progress_interval),
        StorageVMotionHandler(vcenter_real.StorageMoverReal(sessions)),
        DRShellHandler(vcenter_real.DRShellBuilderReal(sessions)),
        *recovery,
    ]
    return _handler_set(handlers, "real", [*recovery_closers, sessions.close, zfs.close])


def _recovery_real(settings: BackendSettings, secrets: SecretResolver, sessions: Any, replication: Any = None
                   ) -> tuple[list[Handler], list[Callable[[], None]]]:
    """The recovery run's real backends, imported late. A module that is not there at all (a build
    from before they landed) leaves ``recovery.run`` out, logged with its name: such operations then
    fail as an unknown kind naming what this listener runs. One that is there but fails to import
    stops the start, naming it. The failover classes carry the test failover's calls too
    (``FailoverStorageReal`` and ``FailoverComputeReal`` subclass the recovery ones); a run's own
    replications go through the engine's ``replication`` (the ``zfs`` of ``_build_real``)."""
    classes = []
    for module, name in (("handlers.backends.zfs.failover", "FailoverStorageReal"),
                         ("handlers.backends.vcenter.failover", "FailoverComputeReal")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise BackendUnavailable(f"{name} ({module}) cannot be imported: {exc}") from exc
            log.warning("recovery runs are off: %s (%s) is not in this build", name, module)
            return [], []
        except (ImportError, AttributeError) as exc:
            raise BackendUnavailable(f"ZERFAUX_USE_STUBS=false needs {name} ({module}) for recovery runs, "
                                     f"but it cannot be imported: {exc}") from exc
    storage = classes[0](secrets, cipher=settings.ssh_cipher)
    compute = classes[1](sessions)
    closers = [c for c in (getattr(storage, "close", None), getattr(compute, "close", None)) if callable(c)]
    return [RecoveryRunHandler(storage, compute, replication)], closers
