"""The run's step book (what is recorded) and the executor that runs effects between two records.

Every step is recorded 'running' BEFORE its effect and with its outcome AFTER it, so a step
that a killed attempt left 'running' may have had its effect, and one still 'pending' had none:
the cleanup relies on that to skip what a test never touched. Recording goes through the
engine's ``record`` (raises when the lease is lost or the store stays away), falling back to
``report`` for contexts that lack it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from handlers.context import OperationContext
from handlers.errors import OperationCancelled, OperationStopped, PermanentError
from handlers.recovery.plan import Step

log = logging.getLogger(__name__)
T = TypeVar("T")

FINISHED = frozenset({"done", "warning", "skipped"})
ATTEMPTED = frozenset({"running", "done", "warning", "failed"})  # its effect may have happened
Outcome = tuple[str, dict[str, Any], str | None]  # status, detail, error


class Book:
    """The run's steps as recorded: seeded from the input's ``steps``, kept in step with what we write."""

    def __init__(self, ctx: OperationContext, stored: Iterable[Mapping[str, Any]]) -> None:
        self._record: Callable[[Mapping[str, Any]], Awaitable[None]] = getattr(ctx, "record", None) or ctx.report
        self.rows: dict[int, dict[str, Any]] = {}
        self._pending: list[tuple[list[tuple[Step, Outcome]], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        for row in stored:
            self.rows[int(row["seq"])] = {
                "seq": int(row["seq"]), "name": row.get("name"), "status": row.get("status") or "pending",
                "protected_vm_id": None if row.get("protected_vm_id") is None else str(row["protected_vm_id"]),
                "detail": dict(row.get("detail") or {}), "error": row.get("error")}

    def status(self, seq: int) -> str:
        return str(self.rows.get(seq, {}).get("status") or "pending")

    def finished(self, seq: int) -> bool:
        return self.status(seq) in FINISHED

    def detail(self, seq: int) -> dict[str, Any]:
        return dict(self.rows.get(seq, {}).get("detail") or {})

    def steps(self) -> list[Step]:
        return [Step(r["seq"], str(r["name"]), r["protected_vm_id"]) for _, r in sorted(self.rows.items())]

    async def plan(self, steps: Sequence[Step]) -> None:
        missing = [s for s in steps if s.seq not in self.rows]
        if not missing:
            return
        await self._record({"plan": [s.as_plan() for s in steps]})
        for s in missing:
            self.rows[s.seq] = {**s.as_plan(), "status": "pending", "detail": {}, "error": None}

    async def write(self, items: Sequence[tuple[Step, Outcome]]) -> None:
        """Record these steps; returns once they are written. Writes that arrive while one is on
        its way go out together in the next (the outcomes of a priority's VMs finish together):
        one round trip, and one lock of the run's row, instead of one per VM."""
        if not items:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((list(items), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let writes of this same tick join
            batch, self._pending = self._pending, []
            try:
                await self._send([item for items, _ in batch for item in items])
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _send(self, items: Sequence[tuple[Step, Outcome]]) -> None:
        entries = []
        for step, (status, detail, error) in items:
            entry: dict[str, Any] = {"seq": step.seq, "status": status}
            if detail:
                entry["detail"] = detail
            if error:
                entry["error"] = error[:2000]
            entries.append(entry)
        await self._record({"steps": entries})
        for step, (status, detail, error) in items:
            row = self.rows.setdefault(step.seq, {**step.as_plan(), "detail": {}})
            row.update(status=status, error=error)
            row["detail"] = {**row.get("detail", {}), **detail}


class Executor:
    """Runs steps under one stop signal: the test's (``ctx.stop``) or a cleanup's own."""

    def __init__(self, book: Book, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        self.book = book
        self.stop = stop
        self._pool = pool

    def check(self) -> None:
        """Raise at a step boundary when the engine stopped us or a person cancelled."""
        if not self.stop.is_set():
            return
        why = str(getattr(self.stop, "why", "") or "stopped")
        if getattr(self.stop, "reason", "stop") == "cancel":
            raise OperationCancelled(why)
        raise OperationStopped(why)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking backend call in the run's own threads (not the loop's small default pool:
        a priority's VMs wait for their Tools together, each in a thread, for minutes)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    async def sleep(self, seconds: float) -> None:
        end = asyncio.get_running_loop().time() + seconds
        while (left := end - asyncio.get_running_loop().time()) > 0:
            self.check()
            await asyncio.sleep(min(left, 0.2))
        self.check()

    async def one(self, step: Step, effect: Callable[[], Awaitable[Outcome]]) -> dict[str, Any]:
        """Run ``step`` unless it is finished already; answer its detail."""
        if not self.book.finished(step.seq):
            self.check()
            await self.book.write([(step, ("running", {}, None))])
            await self._settle(step, effect)
        return self.book.detail(step.seq)

    async def batch(self, steps: Sequence[Step], effect: Callable[[Step], Awaitable[Outcome]],
                    limit: int) -> None:
        """Run steps together (at most ``limit`` at once); all are recorded 'running' first."""
        todo = [s for s in steps if not self.book.finished(s.seq)]
        if not todo:
            return
        self.check()
        await self.book.write([(s, ("running", {}, None)) for s in todo])
        gate = asyncio.Semaphore(limit)

        async def run(step: Step) -> None:
            async with gate:
                await self._settle(step, lambda: effect(step))

        results = await asyncio.gather(*(run(s) for s in todo), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise _weightiest(errors)

    async def _settle(self, step: Step, effect: Callable[[], Awaitable[Outcome]]) -> None:
        try:
            outcome = await effect()
        except BaseException as exc:
            await self._failed(step, exc)
            raise
        await self.book.write([(step, outcome)])

    async def _failed(self, step: Step, exc: BaseException) -> None:
        if (getattr(self.stop, "reason", None) == "stop" or isinstance(exc, OperationStopped)
                or not isinstance(exc, Exception)):  # a stop, or the process going down
            return  # left 'running': the next attempt does it again, and its backend call converges
        if getattr(self.stop, "reason", None) == "cancel" or isinstance(exc, OperationCancelled):
            error = f"cancelled while running: {exc}"
        else:
            error = str(exc) or type(exc).__name__
        try:
            await self.book.write([(step, ("failed", {}, error))])
        except Exception as again:  # the original error is what the run fails with
            log.warning("step %d %s: its failure was not recorded: %s", step.seq, step.name, again)


def _weightiest(errors: Sequence[BaseException]) -> BaseException:
    """Of several steps' errors, the one that decides the run: stop, then cancel, then permanent."""
    for kind in (OperationStopped, OperationCancelled, PermanentError):
        for exc in errors:
            if isinstance(exc, kind):
                return exc
    return errors[0]
