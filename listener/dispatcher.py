"""Claim operations, run each in its handler under a renewed lease, decide what happens next.

Every event source only calls ``wake()``; the queue in Postgres is the truth. The outcome of an
attempt is decided in one place (``_settle``): success completes, ``PermanentError`` fails at
once, ``OperationCancelled`` ends cancelled, anything else is retried with exponential backoff
and jitter until ``max_attempts``. A worker that lost its lease writes nothing (the SQL
functions check ownership too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from tenacity import RetryCallState, wait_exponential_jitter

from handlers import Handler, HandlerError, OperationCancelled, PermanentError, StopSignal
from listener.metrics import Metrics
from listener.store import ClaimedOperation, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchSettings:
    worker_id: str
    concurrency: int = 8
    lease_seconds: float = 30.0
    idle_seconds: float = 10.0  # longest wait between claims when nothing wakes us
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    shutdown_grace_seconds: float = 20.0


class Backoff:
    """Delay before retry n (1-based), from tenacity's exponential-with-jitter wait."""

    def __init__(self, base: float, maximum: float) -> None:
        self._wait = wait_exponential_jitter(multiplier=base, max=maximum, jitter=max(base, 0.0))
        self._max = maximum

    def __call__(self, attempt: int) -> float:
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return min(float(self._wait(state)), self._max)


class _Run:
    """The engine's side of one attempt: what the handler sees as its OperationContext."""

    def __init__(self, op: ClaimedOperation, store: Store, worker: str) -> None:
        self.op = op
        self.operation_id = op.id
        self.kind = op.kind
        self.attempt = op.attempts
        self.stop = StopSignal()
        self.cancel = self.stop  # the older name handlers still use
        self.lost = False  # lease gone or released: write nothing more
        self.settling = False  # the handler returned; its outcome is being written
        self.cancel_requested = op.cancel_requested
        self._store = store
        self._worker = worker
        self.task: asyncio.Task[None] | None = None
        self.started = time.monotonic()

    def mark_lost(self) -> None:
        self.lost = True
        self.stop.stop("lease lost")

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.stop.cancel()

    async def report(self, progress: Mapping[str, Any]) -> None:
        if self.lost:
            return
        state = await self._store.progress(self.op.id, self._worker, progress)
        if state == "lost":
            log.warning("operation %s (%s): lease lost, stopping", self.op.id, self.kind)
            self.mark_lost()
        elif state == "cancel":
            self.request_cancel()


class _Completer:
    """Group commit for successes: completions that arrive while one batch is being written go
    out together in the next, one transaction for many operations."""

    def __init__(self, store: Store, worker: str, max_batch: int = 200) -> None:
        self._store = store
        self._worker = worker
        self._max = max_batch
        self._pending: list[tuple[UUID, Mapping[str, Any], asyncio.Future[tuple[bool, str | None]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def complete(self, op_id: UUID, result: Mapping[str, Any]) -> tuple[bool, str | None]:
        future: asyncio.Future[tuple[bool, str | None]] = asyncio.get_running_loop().create_future()
        self._pending.append((op_id, result, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let operations finishing in this same tick join the batch
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            try:
                answers = await self._store.complete_many(self._worker, [(i, r) for i, r, _ in batch])
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for op_id, _, future in batch:
                if not future.done():
                    future.set_result(answers.get(op_id, (False, None)))


class Dispatcher:
    def __init__(
        self,
        store: Store,
        handlers: Mapping[str, Handler],
        settings: DispatchSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._handlers = handlers
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._backoff = Backoff(settings.retry_base_seconds, settings.retry_max_seconds)
        self._completer = _Completer(store, settings.worker_id)
        self._runs: dict[UUID, _Run] = {}
        self._wake = asyncio.Event()
        self._poke = asyncio.Event()
        self._stopping = asyncio.Event()
        self.claims = 0  # claims answered, for readiness and tests

    @property
    def worker_id(self) -> str:
        return self._settings.worker_id

    @property
    def running(self) -> int:
        return len(self._runs)

    def wake(self) -> None:
        """A hint that work may be waiting. Cheap; call it from the event loop."""
        self._wake.set()

    def poke(self) -> None:
        """A hint that a running operation's cancellation may have been asked: heartbeat now."""
        self._poke.set()

    def stop(self) -> None:
        """Stop claiming; ``run`` then finishes or releases what is running and returns."""
        self._stopping.set()
        self._wake.set()

    async def run(self, until_idle: bool = False) -> None:
        heartbeats = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._claim_loop(until_idle)
        finally:
            await self._shutdown()
            heartbeats.cancel()

    async def _claim_loop(self, until_idle: bool) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            free = self._settings.concurrency - len(self._runs)
            claimed: list[ClaimedOperation] = []
            if free > 0:
                try:
                    claimed = await self._store.claim(self.worker_id, free, self._settings.lease_seconds, held=list(self._runs))
                    self.claims += 1
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = self._backoff(min(failures, 10))
                    log.error("claim failed (%s); next try in %.1fs", exc, delay)
                    await self._wait(delay)
                    continue
                for op in claimed:
                    self._start(op)
            if claimed and len(claimed) == free:
                # Full slots: the next finished operation wakes us.
                await self._wait(self._settings.idle_seconds)
                continue
            if claimed:
                continue  # maybe more arrived while we claimed
            if until_idle and not self._runs and await self._drained():
                return
            await self._wait(self._settings.idle_seconds)

    async def _drained(self) -> bool:
        state = await self._store.queue_state()
        if state.queued == 0 and state.expired == 0:
            return True
        if state.runnable == 0 and state.expired == 0 and state.next_run_after is not None:
            delay = max(0.0, state.next_run_after.timestamp() - time.time())
            await self._wait(min(delay + 0.01, self._settings.idle_seconds))
        return False

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    def _start(self, op: ClaimedOperation) -> None:
        run = _Run(op, self._store, self.worker_id)
        self._runs[op.id] = run
        if op.attempts == 1:
            self._metrics.claim_latency.observe(max(op.waited_seconds, 0.0))
        self._metrics.running.set(len(self._runs))
        log.info("claimed operation %s kind=%s attempt=%d/%s", op.id, op.kind, op.attempts, op.max_attempts or "-")
        run.task = asyncio.create_task(self._execute(run), name=f"op-{op.id}")

    async def _execute(self, run: _Run) -> None:
        op = run.op
        try:
            await self._settle(run)
        except asyncio.CancelledError:
            log.info("operation %s kind=%s attempt=%d stopped (lease lost or shutting down)", op.id, op.kind, op.attempts)
        except Exception:  # a bug of ours: never let it kill the loop
            log.exception("operation %s kind=%s: unexpected error while settling", op.id, op.kind)
        finally:
            self._metrics.duration.labels(op.kind).observe(time.monotonic() - run.started)
            self._runs.pop(op.id, None)
            self._metrics.running.set(len(self._runs))
            self._wake.set()

    async def _settle(self, run: _Run) -> None:
        op = run.op
        handler = self._handlers.get(op.kind)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            await self._fail(run, f"unknown operation kind {op.kind!r}: this listener runs {known}; "
                                  "fix zerfaux.operations.kind or upgrade the listener", permanent=True)
            return
        if op.payload is None:
            await self._fail(run, f"the {op.kind} operation's subject {op.subject_id} no longer exists "
                                  "(its row was deleted); nothing to do", permanent=True)
            return
        if run.cancel_requested:
            await self._cancelled(run, "cancelled before it started")
            return
        try:
            result = await handler(run, op.payload)
        except OperationCancelled as exc:
            run.settling = True
            if not run.lost:
                await self._cancelled(run, str(exc) or "cancelled")
            return
        except PermanentError as exc:
            run.settling = True
            await self._fail(run, str(exc), permanent=True)
            return
        except HandlerError as exc:  # our own words: a TransientError says what happened
            run.settling = True
            await self._fail(run, str(exc) or type(exc).__name__, permanent=False)
            return
        except Exception as exc:
            run.settling = True
            await self._fail(run, _describe(exc), permanent=False)
            return
        run.settling = True
        await self._write_success(run, result)

    async def _write_success(self, run: _Run, result: Mapping[str, Any]) -> None:
        op = run.op
        if run.lost:
            log.warning("operation %s kind=%s finished after its lease was lost: result dropped", op.id, op.kind)
            return
        done, error = await self._completer.complete(op.id, result)
        if error:
            await self._fail(run, f"the result could not be written back: {error}", permanent=True)
        elif done:
            self._metrics.operations.labels(op.kind, "succeeded").inc()
            if op.kind == "replication.run":
                self._metrics.bytes_replicated.inc(int(result.get("bytes_transferred") or 0))
            log.info("operation %s kind=%s attempt=%d succeeded", op.id, op.kind, op.attempts)
        else:
            log.warning("operation %s kind=%s: lease lost before completion, result dropped", op.id, op.kind)

    async def _fail(self, run: _Run, error: str, permanent: bool) -> None:
        op = run.op
        if run.lost:
            return
        delay = self._backoff(op.attempts)
        outcome = await self._store.fail(op.id, self.worker_id, error[:4000], permanent, delay)
        if outcome == "retrying":
            log.info("operation %s kind=%s attempt=%d/%s failed, retrying in %.1fs: %s",
                     op.id, op.kind, op.attempts, op.max_attempts, delay, error)
            asyncio.get_running_loop().call_later(delay, self._wake.set)
        elif outcome == "failed":
            log.info("operation %s kind=%s attempt=%d failed: %s", op.id, op.kind, op.attempts, error)
        self._metrics.operations.labels(op.kind, outcome).inc()

    async def _cancelled(self, run: _Run, message: str) -> None:
        if await self._store.finish_cancelled(run.op.id, self.worker_id, message):
            self._metrics.operations.labels(run.op.kind, "cancelled").inc()
            log.info("operation %s kind=%s cancelled: %s", run.op.id, run.op.kind, message)

    async def _heartbeat_loop(self) -> None:
        period = max(self._settings.lease_seconds / 3.0, 0.05)
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=period)
            except asyncio.TimeoutError:
                pass
            self._poke.clear()
            # A run whose handler already returned is writing its outcome: the SQL checks
            # ownership there, and a missing id here only means it just finished.
            runs = [r for r in self._runs.values() if not r.lost and not r.settling]
            if not runs:
                continue
            try:
                held = await self._store.heartbeat(
                    self.worker_id, [r.op.id for r in runs], self._settings.lease_seconds
                )
            except Exception as exc:
                log.error("heartbeat failed (%s); leases may expire", exc)
                continue
            for run in runs:
                if run.op.id not in held:
                    log.warning("operation %s kind=%s: lease lost, stopping without writing",
                                run.op.id, run.kind)
                    run.mark_lost()
                    if run.task is not None:
                        run.task.cancel()
                elif held[run.op.id] and not run.cancel_requested:
                    log.info("operation %s kind=%s: cancellation requested", run.op.id, run.kind)
                    run.request_cancel()

    async def _shutdown(self) -> None:
        if not self._runs:
            try:
                await self._store.release(self.worker_id, [])  # leaves zerfaux.workers: not live
            except Exception as exc:
                log.debug("could not deregister worker %s: %s", self.worker_id, exc)
            return
        pending = [r.task for r in self._runs.values() if r.task is not None]
        log.info("stopping: waiting up to %.0fs for %d running operation(s)",
                 self._settings.shutdown_grace_seconds, len(pending))
        await asyncio.wait(pending, timeout=self._settings.shutdown_grace_seconds)
        left = list(self._runs.values())
        if not left:
            return
        for run in left:
            run.mark_lost()
        try:
            released = await self._store.release(self.worker_id, [r.op.id for r in left])
            log.info("released %d operation(s) for another worker", released)
        except Exception as exc:
            log.error("could not release %d operation(s) (%s): their leases will expire", len(left), exc)
        for run in left:
            if run.task is not None:
                run.task.cancel()
        await asyncio.wait([r.task for r in left if r.task is not None], timeout=5.0)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
