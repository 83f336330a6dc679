"""Claim operations, run each in its handler under a renewed lease, decide what happens next.

Every event source only calls ``wake()``; the queue in Postgres is the truth. The outcome of an
attempt is decided in one place (``_settle``): success completes, ``PermanentError`` fails at
once, ``OperationCancelled`` ends cancelled, anything else is retried with exponential backoff
and jitter until ``max_attempts``. A worker that lost its lease writes nothing (the SQL
functions check ownership too).

Fencing: a run whose lease was not renewed for ``lease - margin`` (measured from when the last
successful renewal, or the claim, was sent) is told to stop by a watchdog that needs no answer
from the database, so a worker cut off from it stops its effects before another worker may
take the operation over. A run keeps its concurrency slot until its handler (and the backend
thread under it) has returned; the engine never cancels the task of a running handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from handlers import (
    Handler,
    HandlerError,
    OperationCancelled,
    OperationStopped,
    PermanentError,
    StopSignal,
    TransientError,
)
from listener.backoff import Backoff
from listener.metrics import Metrics
from listener.store import ClaimedOperation, Store, StoreUnavailable, within

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
    # After grace, stopped backends get this much longer to return before we give up on them.
    stop_wait_seconds: float = 30.0

    @property
    def lease_margin_seconds(self) -> float:
        """How long before the lease runs out a worker that could not renew it stops the attempt:
        max(1 s, lease/5), at most a quarter of the lease (6 s of the default 30 s lease). It
        covers the time a backend takes to see the stop and the two clocks' rates."""
        return min(max(1.0, self.lease_seconds / 5.0), self.lease_seconds / 4.0)

    @property
    def heartbeat_seconds(self) -> float:
        """Renewal period, start to start: three per (lease - margin), so two renewals, each with
        its full timeout, can still answer before the watchdog stops the attempt (8 s of 30 s)."""
        return max((self.lease_seconds - self.lease_margin_seconds) / 3.0, 0.05)

    @property
    def heartbeat_timeout_seconds(self) -> float:
        """A renewal that has not answered by then is abandoned (below the renewal period)."""
        return self.heartbeat_seconds * 0.75


class _Run:
    """The engine's side of one attempt: what the handler sees as its OperationContext."""

    def __init__(self, op: ClaimedOperation, store: Store, worker: str, renewed_at: float) -> None:
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
        # Monotonic time at which the last renewal that succeeded (or the claim) was SENT: the
        # lease runs from no later than that, whatever the database's clock says.
        self.renewed_at = renewed_at
        self.stopped = False  # ended by the engine's stop, lease still held, nothing written: release it

    def mark_lost(self, why: str = "lease lost") -> None:
        """Write nothing more for this attempt and tell its backend to stop (keeping state)."""
        self.lost = True
        self.stop.stop(why)

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.stop.cancel()

    async def report(self, progress: Mapping[str, Any]) -> None:
        if self.lost:
            return
        try:
            state = await self._store.progress(self.op.id, self._worker, progress)
        except StoreUnavailable as exc:  # progress is a courtesy: the next report tries again
            log.warning("operation %s (%s): progress not written: %s", self.op.id, self.kind, exc)
            return
        if state == "lost":
            log.warning("operation %s (%s): lease lost, stopping", self.op.id, self.kind)
            self.mark_lost()
        elif state == "cancel":
            self.request_cancel()

    async def record(self, progress: Mapping[str, Any], retry_seconds: float = 3.0) -> None:
        """Like ``report``, for progress the handler relies on (a step recorded before its effect):
        it is written or this raises. ``OperationStopped`` once the lease is lost (the effect must
        not happen); ``TransientError`` when the store stays unavailable past a brief retry (the
        attempt fails and is retried, resuming from what was recorded)."""
        deadline = time.monotonic() + retry_seconds
        delay = 0.1
        while True:
            if self.lost:
                raise OperationStopped(f"progress not recorded: {self.stop.why or 'lease lost'}")
            try:
                state = await self._store.progress(self.op.id, self._worker, progress)
                break
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise TransientError(f"the run's progress could not be recorded: {exc}") from exc
                log.warning("operation %s (%s): progress not recorded, trying again: %s", self.op.id, self.kind, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if state == "lost":
            log.warning("operation %s (%s): lease lost, stopping", self.op.id, self.kind)
            self.mark_lost()
            raise OperationStopped("lease lost: progress not recorded")
        if state == "cancel" and not self.stop.cancelled:
            self.request_cancel()

    async def reread(self) -> Mapping[str, Any] | None:
        """The operation's input as the database has it now (None once the lease is gone)."""
        if self.lost:
            return None
        try:
            return await self._store.current_input(self.op.id, self._worker)
        except StoreUnavailable as exc:  # like progress: the next read tries again
            log.warning("operation %s (%s): input not read again: %s", self.op.id, self.kind, exc)
            return None


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
        heartbeats = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        watchdog = asyncio.create_task(self._watchdog_loop(), name="lease-watchdog")
        try:
            await self._claim_loop(until_idle)
        finally:
            try:
                await self._shutdown()
            finally:
                heartbeats.cancel()
                watchdog.cancel()
                await asyncio.gather(heartbeats, watchdog, return_exceptions=True)

    async def _claim_loop(self, until_idle: bool) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            free = self._settings.concurrency - len(self._runs)
            sent = time.monotonic()  # a claim's lease runs from no later than this
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
                    self._start(op, sent)
                if claimed and time.monotonic() - sent > self._settings.heartbeat_seconds:
                    self._poke.set()  # a slow claim: renew now, before the watchdog counts it lost
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

    def _start(self, op: ClaimedOperation, sent: float) -> None:
        run = _Run(op, self._store, self.worker_id, sent)
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
        except asyncio.CancelledError:  # only when the whole loop is torn down
            log.warning("operation %s kind=%s attempt=%d: abandoned while settling", op.id, op.kind, op.attempts)
            raise
        except StoreUnavailable as exc:
            log.error("operation %s kind=%s attempt=%d: its outcome could not be written (%s); the lease "
                      "expires and the operation runs again", op.id, op.kind, op.attempts, exc)
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
            if not getattr(handler, "cleans_up_on_cancel", False):
                await self._cancelled(run, "cancelled before it started")
                return
            # Its earlier attempt may have made things only the handler can remove: it runs with
            # the cancel already signalled, cleans up and ends cancelled.
            run.stop.cancel("cancel requested before this attempt")
        try:
            result = await handler(run, op.payload)
        except Exception as exc:
            run.settling = True
            if run.stop.reason == "stop":
                # Whatever a stopped backend raises (OperationStopped, a cancel, a broken pipe
                # from its killed process) is the stop, not a failure of the operation.
                self._stopped(run, _describe(exc))
                return
            await self._settle_error(run, exc)
            return
        run.settling = True
        if run.lost:
            log.warning("operation %s kind=%s finished after its lease was lost: result dropped", op.id, op.kind)
            return
        await self._write_success(run, result)

    def _stopped(self, run: _Run, raised: str) -> None:
        op = run.op
        run.stopped = not run.lost
        log.info("operation %s kind=%s attempt=%d stopped (%s); nothing written: %s",
                 op.id, op.kind, op.attempts, run.stop.why, raised)

    async def _settle_error(self, run: _Run, exc: Exception) -> None:
        if isinstance(exc, OperationCancelled):
            if not run.lost:
                await self._cancelled(run, str(exc) or "cancelled")
            return
        if isinstance(exc, PermanentError):
            await self._fail(run, str(exc), permanent=True)
        elif isinstance(exc, HandlerError):  # our own words: a TransientError says what happened
            await self._fail(run, str(exc) or type(exc).__name__, permanent=False)
        else:
            await self._fail(run, _describe(exc), permanent=False)

    async def _write_success(self, run: _Run, result: Mapping[str, Any]) -> None:
        op = run.op
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
        period = self._settings.heartbeat_seconds
        due = time.monotonic() + period
        while True:
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=max(0.0, due - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            self._poke.clear()
            due = time.monotonic() + period  # start to start: a slow answer does not shift the next
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        # A run whose handler already returned is writing its outcome: the SQL checks
        # ownership there, and a missing id here only means it just finished.
        runs = [r for r in self._runs.values() if not r.lost and not r.settling]
        if not runs:
            return
        sent = time.monotonic()
        try:
            # Bounded below the renewal period: a hung call must not delay the next renewal
            # (the watchdog does not wait for it either).
            held = await within(
                self._settings.heartbeat_timeout_seconds,
                self._store.heartbeat(self.worker_id, [r.op.id for r in runs], self._settings.lease_seconds),
                "heartbeat",
            )
        except Exception as exc:
            log.error("heartbeat failed (%s); the lease of %d operation(s) was not renewed",
                      _describe(exc), len(runs))
            return
        for run in runs:
            if run.lost:
                continue  # fenced by the watchdog while the answer was on its way
            if run.op.id not in held:
                log.warning("operation %s kind=%s: lease lost, stopping without writing", run.op.id, run.kind)
                run.mark_lost("lease lost: another worker holds it")
                continue
            run.renewed_at = max(run.renewed_at, sent)
            if held[run.op.id] and not run.cancel_requested:
                log.info("operation %s kind=%s: cancellation requested", run.op.id, run.kind)
                run.request_cancel()

    async def _watchdog_loop(self) -> None:
        """Stop, on this worker's own clock, every attempt whose lease may be about to pass to
        another worker: needs no answer from the database, so a cut-off worker fences itself."""
        lease = self._settings.lease_seconds
        allowed = lease - self._settings.lease_margin_seconds
        tick = min(0.2, lease / 20.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for run in list(self._runs.values()):
                if run.lost or run.settling or now - run.renewed_at < allowed:
                    continue
                why = f"lease lost: not renewed for {now - run.renewed_at:.1f}s"
                log.warning("operation %s kind=%s attempt=%d: %s (lease %.0fs, margin %.1fs); stopping its "
                            "backend and writing nothing more", run.op.id, run.kind, run.attempt, why,
                            lease, self._settings.lease_margin_seconds)
                run.mark_lost(why)

    async def _shutdown(self) -> None:
        if not self._runs:
            try:
                await self._store.release(self.worker_id, [])  # leaves zerfaux.workers: not live
            except Exception as exc:
                log.debug("could not deregister worker %s: %s", self.worker_id, exc)
            return
        grace = self._settings.shutdown_grace_seconds
        pending = [r.task for r in self._runs.values() if r.task is not None]
        log.info("stopping: waiting up to %.0fs for %d running operation(s)", grace, len(pending))
        if pending:
            await asyncio.wait(pending, timeout=grace)
        left = list(self._runs.values())
        if not left:
            return
        # Tell what is left to stop (keeping resumable state), and wait for the backends to
        # return: releasing first would let another worker start while this one still sends.
        for run in left:
            if not run.lost:
                run.stop.stop("shutting down")
        bound = grace + self._settings.stop_wait_seconds
        log.info("stopping %d operation(s) (shutting down); waiting up to %.0fs for their backends to return",
                 len(left), bound)
        tasks = {r.task: r for r in left if r.task is not None}
        _, stuck = await asyncio.wait(tasks, timeout=bound) if tasks else (set(), set())
        for task in stuck:
            run = tasks[task]
            log.error("operation %s kind=%s attempt=%d: its backend did not return within %.0fs of being told "
                      "to stop; NOT releasing it: its lease expires within %.0fs and another worker takes "
                      "it over, while this process waits for the thread to end", run.op.id, run.kind,
                      run.attempt, bound, self._settings.lease_seconds)
        ids = [r.op.id for r in left if r.task not in stuck and r.stopped]
        try:
            released = await self._store.release(self.worker_id, ids)
            if ids:
                log.info("released %d operation(s) for another worker", released)
        except Exception as exc:
            log.error("could not release %d operation(s) (%s): their leases will expire", len(ids), exc)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
