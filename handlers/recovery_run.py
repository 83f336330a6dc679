"""``recovery.run``: a test failover or its cleanup, a planned migration, a failover, its commit or
rollback, a reprotect; step by step (handlers/recovery, docs/recovery.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from handlers.context import OperationContext
from handlers.recovery.backends import RecoveryCompute, RecoveryStorage
from handlers.recovery.failover_plan import FAILOVER_KINDS, build_failover_plan
from handlers.recovery.failover_runner import FailoverRunner
from handlers.recovery.plan import build_plan
from handlers.recovery.runner import Runner
from handlers.types import Row

log = logging.getLogger(__name__)


class RecoveryRunHandler:
    kind = "recovery.run"
    # A cancelled test must still remove what it made: the engine runs this handler even when the
    # cancel was asked before the attempt started (its stop signal arrives already cancelled).
    cleans_up_on_cancel = True

    def __init__(self, storage: RecoveryStorage, compute: RecoveryCompute, replication: Any = None) -> None:
        """``storage`` and ``compute`` also carry the failover Protocols (``failover_backends``) for
        the failover kinds; ``replication`` is the engine's ``ZFSReplication`` (a planned migration
        and a reprotect replicate as steps of their own)."""
        self._storage = storage
        self._compute = compute
        self._replication = replication

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        stored = [s for s in payload.get("steps") or [] if isinstance(s, Mapping)]
        kind = str((payload.get("run") or {}).get("kind") or "")
        if kind in FAILOVER_KINDS:
            plan = build_failover_plan(payload)
            log.debug("recovery run %s (%s): %d steps, %d recorded", plan.run_id, kind, len(plan.steps), len(stored))
            return await FailoverRunner(plan, self._storage, self._compute, self._replication, ctx, stored).run()
        test_plan = build_plan(payload)
        test_rows = [s for s in payload.get("test_steps") or [] if isinstance(s, Mapping)]
        log.debug("recovery run %s (%s): %d steps, %d recorded", test_plan.run_id, test_plan.kind,
                  len(test_plan.steps), len(stored))
        return await Runner(test_plan, self._storage, self._compute, ctx, stored, test_rows).run()
