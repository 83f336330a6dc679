"""``recovery.run``: a test failover or its cleanup, step by step (handlers/recovery, docs/recovery.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from handlers.context import OperationContext
from handlers.recovery.backends import RecoveryCompute, RecoveryStorage
from handlers.recovery.plan import build_plan
from handlers.recovery.runner import Runner
from handlers.types import Row

log = logging.getLogger(__name__)


class RecoveryRunHandler:
    kind = "recovery.run"
    # A cancelled test must still remove what it made: the engine runs this handler even when the
    # cancel was asked before the attempt started (its stop signal arrives already cancelled).
    cleans_up_on_cancel = True

    def __init__(self, storage: RecoveryStorage, compute: RecoveryCompute) -> None:
        self._storage = storage
        self._compute = compute

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Row]) -> dict[str, Any]:
        plan = build_plan(payload)
        stored = [s for s in payload.get("steps") or [] if isinstance(s, Mapping)]
        test_rows = [s for s in payload.get("test_steps") or [] if isinstance(s, Mapping)]
        log.debug("recovery run %s (%s): %d steps, %d recorded", plan.run_id, plan.kind, len(plan.steps), len(stored))
        return await Runner(plan, self._storage, self._compute, ctx, stored, test_rows).run()
