"""Fencing on real Postgres (issue 11, sections 1 and 2, engine side).

A listener cut off from the database by a relay that stops forwarding (half-open sockets, no
error anywhere) stops its own backend before its lease can pass to another listener; the other
listener then takes the operation over and finishes it once. SIGTERM tells a backend to stop
(keep its resumable state), not to cancel, and the operation is released only after the backend
returned. A handler thread that ignores the stop keeps its concurrency slot until it returns.

What is observed: the stub world's journal (each backend writes when and in which process it was
told to stop, resumed, sent), the listeners' /metrics, and the rows of zerfaux.operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from handlers.backends.stub.world import StubWorld
from handlers.context import OperationContext
from listener.dispatcher import DispatchSettings, Dispatcher
from listener.service import make_store
from tests.integration.conftest import DR, PRIMARY
from tests.support.engine import engine_settings, eventually
from tests.support.pg import Database
from tests.support.tcp_proxy import tcp_proxy
from tests.support.workload import Proc, listener_env, request_replications

LEASE = 6.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running_metric(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    for line in text.splitlines():
        if line.startswith("zerfaux_running_operations "):
            return float(line.split()[1])
    raise AssertionError("no zerfaux_running_operations in /metrics")


def _wait(check: Any, timeout: float, procs: list[Proc], what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    tails = "\n---\n".join(p.output[-3000:] for p in procs)
    raise AssertionError(f"{what}: not within {timeout}s\n{tails}")


def _effects(world: Path, effect: str) -> list[dict[str, Any]]:
    return [e for e in StubWorld(world).journal() if e["kind"] == "replication.run" and e["effect"] == effect]


def test_a_listener_cut_off_from_the_database_stops_its_backend_and_another_finishes_the_job_once(
    seeded_db: Database, tmp_path: Path
) -> None:
    db, world = seeded_db, tmp_path / "world"
    server = urlsplit(db.url)
    common = {"ZERFAUX_LEASE_SECONDS": str(LEASE), "ZERFAUX_SWEEP_SECONDS": "0.5"}
    http = _free_port()
    with tcp_proxy(server.hostname or "127.0.0.1", server.port or 5432) as relay:
        cut_off = Proc(relay.url_for(db.url), "run", env={
            **listener_env(world, ZERFAUX_STUB_SECONDS="40", **common), "ZERFAUX_WORKER_ID": "cut-off",
            "ZERFAUX_HTTP_PORT": str(http), "ZERFAUX_HTTP_HOST": "127.0.0.1"})
        successor: Proc | None = None
        procs = [cut_off]
        try:
            cut_off.wait_for_line("listening as")
            (job,) = request_replications(db.url, 1)
            _wait(lambda: db.value("select bytes_transferred from replication_jobs where id = %s", (job,)),
                  20, procs, "progress from the first listener")
            assert _running_metric(http) == 1

            relay.cut()  # half-open: nothing forwarded, every socket stays open
            cut_at = time.time()
            successor = Proc(db.url, "run", env={
                **listener_env(world, ZERFAUX_STUB_SECONDS="3", **common), "ZERFAUX_WORKER_ID": "successor"})
            procs.append(successor)
            samples: list[tuple[float, float]] = []  # (time answered, running operations)

            def finished() -> bool:
                running = _running_metric(http)
                samples.append((time.time(), running))  # the time it answered, not asked
                return bool(db.value("select status = 'completed' from replication_jobs where id = %s", (job,)))

            _wait(finished, LEASE + 40, procs, "the job completed by the successor")
        finally:
            relay.restore()
            cut_off.stop()
            if successor is not None:
                successor.stop()

    (stopped,) = _effects(world, "stopped")
    assert stopped["pid"] == cut_off.pid and stopped["why"].startswith("lease lost: not renewed for")
    stopped_after = stopped["at"] - cut_at
    assert stopped_after <= LEASE + 3, f"the cut-off backend was told to stop {stopped_after:.1f}s after the cut"
    # Its slot stayed taken until its backend had returned, and only then was freed.
    early = [(round(at - stopped["at"], 2), running) for at, running in samples if at < stopped["at"] and running != 1]
    assert early == [], ("slot freed before the backend returned (seconds before its stop, running)",
                         cut_off.output[-3000:])
    assert any(running == 0 for _, running in samples), samples
    # The successor started only after the first backend had stopped, resumed its partial
    # receive, and sent the snapshot: once.
    (resumed,) = _effects(world, "resumed")
    (sent,) = _effects(world, "sent")
    assert successor is not None and resumed["pid"] == sent["pid"] == successor.pid
    assert resumed["at"] > stopped["at"] and resumed["bytes"] == stopped["bytes"]
    row = db.one("select o.status, o.attempts, o.worker_id, j.status as job, j.error from zerfaux.operations o"
                 " join replication_jobs j on j.id = o.subject_id")
    assert row == {"status": "succeeded", "attempts": 2, "worker_id": "successor", "job": "completed", "error": None}
    print(f"fenced {stopped_after:.2f}s after the cut (lease {LEASE:g}s); successor resumed "
          f"{resumed['at'] - stopped['at']:.2f}s after the stop")


def test_sigterm_stops_the_backend_then_releases_and_the_next_listener_resumes(
    seeded_db: Database, tmp_path: Path
) -> None:
    db, world = seeded_db, tmp_path / "world"
    first = Proc(db.url, "run", env={
        **listener_env(world, ZERFAUX_STUB_SECONDS="40", ZERFAUX_LEASE_SECONDS=str(LEASE),
                       ZERFAUX_SHUTDOWN_GRACE_SECONDS="0.5"), "ZERFAUX_WORKER_ID": "first"})
    try:
        first.wait_for_line("listening as")
        (job,) = request_replications(db.url, 1)
        _wait(lambda: db.value("select bytes_transferred from replication_jobs where id = %s", (job,)),
              20, [first], "progress from the first listener")
    finally:
        term_at = time.time()
        code = first.stop(signal.SIGTERM, timeout=30)
    assert code == 0, first.output[-3000:]

    (stopped,) = _effects(world, "stopped")
    assert stopped["pid"] == first.pid and stopped["why"] == "shutting down"
    row = db.one("select o.status, o.attempts, o.worker_id, extract(epoch from o.run_after)::float8 as released_at,"
                 " j.status as job from zerfaux.operations o join replication_jobs j on j.id = o.subject_id")
    # Released (the attempt not counted), and only after the backend had returned.
    assert (row["status"], row["attempts"], row["worker_id"], row["job"]) == ("queued", 0, None, "pending")
    assert row["released_at"] > stopped["at"]
    row_released = row["released_at"]

    second = Proc(db.url, "run", "--until-idle", env={
        **listener_env(world, ZERFAUX_STUB_SECONDS="2"), "ZERFAUX_WORKER_ID": "second"})
    assert second.wait(60) == 0, second.output[-3000:]
    (resumed,) = _effects(world, "resumed")
    (sent,) = _effects(world, "sent")
    assert resumed["pid"] == sent["pid"] == second.pid and resumed["bytes"] == stopped["bytes"]
    row = db.one("select o.status, o.attempts, j.status as job, j.error from zerfaux.operations o"
                 " join replication_jobs j on j.id = o.subject_id")
    assert row == {"status": "succeeded", "attempts": 1, "job": "completed", "error": None}
    assert db.value("select count(*) from zerfaux.operations where status = 'cancelled'") == 0
    assert db.value("select count(*) from replication_jobs where status = 'cancelled' or cancel_requested") == 0
    # The listener's own lines never call the stop a cancel (psycopg's warning about a query it
    # interrupted while the listener shut its connections is not about the job).
    ours = [line for line in first.output.lower().splitlines() if " psycopg:" not in line]
    assert not any("cancel" in line for line in ours), first.output[-3000:]
    print(f"stopped {stopped['at'] - term_at:.2f}s after SIGTERM (grace 0.5s); released "
          f"{row_released - stopped['at']:.3f}s after the backend returned")


class Stubborn:
    """A handler whose backend thread notices the stop, then ignores it until told to go on,
    and then raises (as a backend whose killed process broke its pipe would)."""

    kind = "vcenter.sync"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go_on = threading.Event()
        self.reasons: list[str | None] = []
        self.returned_at: float | None = None

    async def __call__(self, ctx: OperationContext, payload: Mapping[str, Any]) -> dict[str, Any]:
        if payload["vcenter"]["id"] == DR:
            return {"vms": [], "datastores": []}  # the operation queued behind it: quick

        def backend() -> dict[str, Any]:
            self.entered.set()
            ctx.stop.wait(30)
            self.reasons.append(ctx.stop.reason)
            self.go_on.wait(30)
            self.returned_at = time.time()
            raise BrokenPipeError("zfs receive: broken pipe")

        return await asyncio.to_thread(backend)


@contextlib.asynccontextmanager
async def _dispatcher(db: Database, handler: Stubborn, **overrides: Any) -> AsyncIterator[Dispatcher]:
    store = make_store(engine_settings(db.url))
    await store.open()
    settings = DispatchSettings(**{"worker_id": "stubborn", "concurrency": 1, "lease_seconds": 2.0,
                                   "idle_seconds": 0.1, "retry_base_seconds": 0.05, "retry_max_seconds": 0.2,
                                   **overrides})
    try:
        yield Dispatcher(store, {handler.kind: handler}, settings)
    finally:
        await store.close()


async def test_a_backend_that_ignores_a_lost_lease_keeps_its_slot_until_it_returns(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    handler = Stubborn()
    async with _dispatcher(world, handler) as dispatcher:
        task = asyncio.create_task(dispatcher.run())
        await eventually(handler.entered.is_set)
        world.sql("update zerfaux.operations set worker_id = 'thief', lease_expires_at = now() + interval '1 hour'")
        await eventually(lambda: handler.reasons == ["stop"], timeout=5)
        world.sql("update vcenters set sync_requested_at = now() where id = %s", (DR,))
        # The only slot is still taken: for a while (ten claim rounds) the new operation waits.
        for _ in range(10):
            await asyncio.sleep(0.1)
            assert dispatcher.running == 1
            assert world.value("select status from zerfaux.operations o join vcenters v on v.id = o.subject_id"
                               " where v.id = %s", (DR,)) == "queued"
        handler.go_on.set()
        await eventually(lambda: world.value("select status from zerfaux.operations where subject_id = %s",
                                             (DR,)) == "succeeded", timeout=10)
        dispatcher.stop()
        await asyncio.wait_for(task, 30)
    first = world.one("select status, worker_id, attempts, last_error from zerfaux.operations where subject_id = %s",
                      (PRIMARY,))
    # What the stopped backend raised was the stop, not a failure: nothing written.
    assert first == {"status": "running", "worker_id": "thief", "attempts": 1, "last_error": None}


async def test_at_shutdown_an_operation_is_released_only_after_its_backend_returned(world: Database) -> None:
    world.sql("update vcenters set sync_requested_at = now() where id = %s", (PRIMARY,))
    handler = Stubborn()
    async with _dispatcher(world, handler, shutdown_grace_seconds=0.2) as dispatcher:
        task = asyncio.create_task(dispatcher.run())
        await eventually(handler.entered.is_set)
        dispatcher.stop()
        await eventually(lambda: handler.reasons == ["stop"], timeout=5)
        for _ in range(10):  # the backend has not returned: the operation stays ours
            await asyncio.sleep(0.1)
            assert world.value("select worker_id from zerfaux.operations") == "stubborn"
        handler.go_on.set()
        await asyncio.wait_for(task, 30)
    row = world.one("select status, attempts, worker_id, last_error, extract(epoch from run_after)::float8 as released_at"
                    " from zerfaux.operations")
    assert handler.returned_at is not None and row.pop("released_at") > handler.returned_at
    assert row == {"status": "queued", "attempts": 0, "worker_id": None, "last_error": None}
