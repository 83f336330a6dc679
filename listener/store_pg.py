"""The Postgres store: psycopg 3, async, pooled. The only module that runs SQL on a connection."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from listener import sqlfile
from listener.config import redact_url
from listener.protection import GroupStatus, RpoCompliance
from listener.store import ATTEMPT_CALLS, ClaimedOperation, QueueState, Schedule, StoreUnavailable, within

log = logging.getLogger(__name__)

QUERIES = sqlfile.load(Path(__file__).with_name("queries.sql"))
_RETRYABLE = (psycopg.OperationalError, PoolTimeout)


class PostgresStore:
    def __init__(self, conninfo: str, pool_size: int = 10, retry_seconds: float = 60.0,
                 attempt_retry_seconds: float | None = None, retry_window_seconds: float = 3600.0) -> None:
        self._conninfo = conninfo
        self.description = redact_url(conninfo)
        self._retry_seconds = retry_seconds
        # Calls for a running attempt (ATTEMPT_CALLS) end, answered or not, within this.
        self._attempt_seconds = retry_seconds if attempt_retry_seconds is None else attempt_retry_seconds
        self._window = retry_window_seconds  # how long an operation's transient failures are retried
        self._has_vault: bool | None = None
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
            check=AsyncConnectionPool.check_connection,
            timeout=10.0,
        )

    async def open(self) -> None:
        try:
            probe = await psycopg.AsyncConnection.connect(self._conninfo, connect_timeout=10)
            await probe.close()
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"cannot connect to {self.description}: {reason}") from exc
        await self._pool.open(wait=True, timeout=15.0)

    async def close(self) -> None:
        await self._pool.close()

    async def _rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a named query, riding out a database restart for up to ``retry_seconds`` (a call
        made for a running attempt: ``attempt_retry_seconds``). The budget bounds the whole call,
        hung or not: a half-open connection gives no error, only silence."""
        seconds = self._attempt_seconds if name in ATTEMPT_CALLS else self._retry_seconds
        return await within(seconds, self._retrying(name, params, seconds), f"{self.description}: {name}")

    async def _retrying(self, name: str, params: Mapping[str, Any] | None, seconds: float) -> list[dict[str, Any]]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_RETRYABLE),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            stop=stop_after_delay(seconds),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "database unreachable (%s); retrying %s", state.outcome.exception() if state.outcome else "?", name
            ),
        ):
            with attempt:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(QUERIES[name], params or {})
                    rows = await cur.fetchall() if cur.description else []
                    return cast(list[dict[str, Any]], rows)
        raise AssertionError("unreachable")

    async def _one(self, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        rows = await self._rows(name, params)
        return rows[0]

    async def ping(self) -> None:
        try:
            async with self._pool.connection(timeout=5.0) as conn:
                await conn.execute("select 1")
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreUnavailable(f"{self.description} does not answer: {exc}") from exc

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, held: Sequence[UUID] | None = None
    ) -> list[ClaimedOperation]:
        rows = await self._rows("claim", {"worker": worker, "limit": limit, "lease": lease_seconds,
                                          "held": None if held is None else list(held), "window": self._window})
        return [ClaimedOperation.from_row(row) for row in rows]

    async def heartbeat(self, worker: str, ids: Sequence[UUID], lease_seconds: float) -> dict[UUID, bool]:
        rows = await self._rows("heartbeat", {"worker": worker, "ids": list(ids), "lease": lease_seconds})
        return {UUID(str(row["id"])): bool(row["cancel_requested"]) for row in rows}

    async def progress(self, op_id: UUID, worker: str, progress: Mapping[str, Any]) -> str:
        row = await self._one("progress", {"id": op_id, "worker": worker, "progress": Jsonb(dict(progress))})
        return str(row["state"])

    async def current_input(self, op_id: UUID, worker: str) -> Mapping[str, Any] | None:
        row = await self._one("current_input", {"id": op_id, "worker": worker})
        payload = row["payload"]
        return dict(payload) if payload is not None else None

    async def complete_many(
        self, worker: str, items: Sequence[tuple[UUID, Mapping[str, Any]]]
    ) -> dict[UUID, tuple[bool, str | None]]:
        payload = [{"id": str(op_id), "result": dict(result)} for op_id, result in items]
        rows = await self._rows("complete_many", {"worker": worker, "items": Jsonb(payload)})
        return {UUID(str(r["id"])): (bool(r["done"]), r["error"]) for r in rows}

    async def fail(self, op_id: UUID, worker: str, error: str, permanent: bool, retry_seconds: float) -> str:
        row = await self._one(
            "fail",
            {"id": op_id, "worker": worker, "error": error, "permanent": permanent, "retry": retry_seconds,
             "window": self._window},
        )
        return str(row["outcome"])

    async def finish_cancelled(self, op_id: UUID, worker: str, message: str) -> bool:
        row = await self._one("finish_cancelled", {"id": op_id, "worker": worker, "message": message})
        return bool(row["done"])

    async def release(self, worker: str, ids: Sequence[UUID]) -> int:
        row = await self._one("release", {"worker": worker, "ids": list(ids)})
        return int(row["released"])

    async def prune(self, days: float) -> int:
        row = await self._one("prune", {"days": days})
        return int(row["pruned"])

    async def queue_state(self) -> QueueState:
        return QueueState.from_row(await self._one("queue_state"))

    async def schedule_due(self) -> Schedule:
        return Schedule.from_row(await self._one("schedule_due"))

    async def record_rpo_transitions(self) -> int:
        return int((await self._one("record_rpo_transitions"))["recorded"])

    async def vault_secret(self, name: str) -> str | None:
        if self._has_vault is None:
            self._has_vault = bool((await self._one("has_vault"))["present"])
        if not self._has_vault:
            return None
        rows = await self._rows("vault_secret", {"name": name})
        return str(rows[0]["decrypted_secret"]) if rows else None

    async def claim_mode(self, mode: str) -> str:
        return str((await self._one("claim_mode", {"mode": mode}))["mode"])

    async def set_mode(self, mode: str) -> str | None:
        previous = (await self._one("set_mode", {"mode": mode}))["previous"]
        return None if previous is None else str(previous)

    async def database_mode(self) -> str | None:
        mode = (await self._one("database_mode"))["mode"]
        return None if mode is None else str(mode)

    async def broadcast_ready(self) -> bool:
        return bool((await self._one("broadcast_ready"))["ready"])

    async def status_report(self, recent: int = 15, worker_seconds: float = 120.0) -> dict[str, Any]:
        row = await self._one("status_report", {"recent": recent, "seconds": worker_seconds})
        return dict(row["report"])

    async def protection_overview(self) -> list[GroupStatus]:
        return [GroupStatus.from_row(row) for row in await self._rows("protection_overview")]

    async def rpo_report(self, since: datetime, until: datetime) -> list[RpoCompliance]:
        rows = await self._rows("rpo_report", {"since": since, "until": until})
        return [RpoCompliance.from_row(row) for row in rows]

    async def run_report(self, run_id: UUID) -> dict[str, Any] | None:
        report = (await self._one("run_report", {"run": run_id}))["report"]
        return None if report is None else dict(report)
