"""The PostgREST store: the engine's SQL functions called as RPC with the server key.

For a team whose only credentials are ``SUPABASE_URL`` and the server key (``SUPABASE_SECRET_KEY``
or ``SUPABASE_SERVICE_ROLE_KEY``: an ``sb_secret_…`` key, sent as ``apikey`` only, or the legacy
service_role JWT, sent as ``apikey`` and bearer token; listener.apikeys). Every
state change is ``POST /rest/v1/rpc/<function>`` on schema ``zerfaux`` (which must be among the
project's exposed schemas, docs/deploy-supabase.md) with the functions' own argument names, so
the behaviour is the Postgres store's; only the wire differs. Transport failures and gateway
errors are retried for up to ``retry_seconds`` and then become ``StoreUnavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from listener.apikeys import is_api_key
from listener.protection import GroupStatus, RpoCompliance
from listener.store import ATTEMPT_CALLS, ClaimedOperation, QueueState, Schedule, StoreUnavailable, within

log = logging.getLogger(__name__)

SCHEMA = "zerfaux"
# PostgREST answers these when the database (or the gateway in front of it) cannot serve now:
# PGRST000-003 are its connection and pool errors, 08xxx is Postgres' connection class.
_RETRY_STATUS = {"502", "503", "504", "520"}


class _Unavailable(Exception):
    """Internal: one attempt failed in a way worth retrying."""


def _retryable(exc: APIError) -> bool:
    code = str(exc.code or "")
    return code in _RETRY_STATUS or code.startswith(("PGRST00", "08", "57P"))


class PostgrestStore:
    def __init__(self, url: str, key: str, retry_seconds: float = 60.0, timeout: float = 30.0,
                 attempt_retry_seconds: float | None = None, retry_window_seconds: float = 3600.0) -> None:
        self._window = retry_window_seconds  # how long an operation's transient failures are retried
        self._url = url.rstrip("/")
        self._key = key
        self.description = f"{self._url}/rest/v1 (PostgREST, schema {SCHEMA})"
        self._retry_seconds = retry_seconds
        # Calls for a running attempt (ATTEMPT_CALLS) end, answered or not, within this.
        self._attempt_seconds = retry_seconds if attempt_retry_seconds is None else attempt_retry_seconds
        self._timeout = timeout
        self._client: AsyncClient | None = None
        self._http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        # Our own httpx client: one pool for every RPC, closed with the store.
        self._http = httpx.AsyncClient(timeout=self._timeout, follow_redirects=True)
        self._client = await acreate_client(
            self._url,
            self._key,
            AsyncClientOptions(schema=SCHEMA, httpx_client=self._http, auto_refresh_token=False,
                               persist_session=False),
        )
        if is_api_key(self._key):
            # supabase-py sends the key as a bearer token too; an sb_ key is not a JWT and goes
            # in apikey alone (the gateway mints the JWT of its role).
            self._client.options.headers.pop("Authorization", None)
            self._client._postgrest = None  # built again, from these headers, at the first call
        try:
            await self.ping()
        except StoreUnavailable:
            await self.close()
            raise

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http = None
        self._client = None

    async def _call(self, fn: str, params: Mapping[str, Any], retry_seconds: float | None = None) -> Any:
        """One RPC, riding out a restart of PostgREST or the database for ``retry_seconds``; a
        call made for a running attempt ends within ``attempt_retry_seconds``, hung or not."""
        if retry_seconds is None:
            retry_seconds = self._attempt_seconds if fn in ATTEMPT_CALLS else self._retry_seconds
        # At least one request's own timeout: ping retries for 0 s but may wait that long.
        bound = retry_seconds if fn in ATTEMPT_CALLS else max(retry_seconds, self._timeout)
        return await within(bound, self._retrying(fn, params, retry_seconds), f"{self.description}: {fn}")

    async def _retrying(self, fn: str, params: Mapping[str, Any], seconds: float) -> Any:
        if self._client is None:
            raise StoreUnavailable(f"{self.description}: the store is not open")
        client = self._client
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_Unavailable),
                wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
                stop=stop_after_delay(seconds),
                reraise=True,
                before_sleep=lambda state: log.warning(
                    "PostgREST unreachable (%s); retrying %s",
                    state.outcome.exception() if state.outcome else "?", fn,
                ),
            ):
                with attempt:
                    try:
                        response = await client.rpc(fn, dict(params)).execute()
                    except httpx.TransportError as exc:
                        raise _Unavailable(f"{type(exc).__name__}: {exc}") from exc
                    except APIError as exc:
                        if _retryable(exc):
                            raise _Unavailable(_describe(exc)) from exc
                        raise
                    return response.data
        except _Unavailable as exc:
            raise StoreUnavailable(f"{self.description} does not answer: {exc}") from exc
        except APIError as exc:
            if str(exc.code) in ("401", "403", "42501", "PGRST301", "PGRST302"):
                raise StoreUnavailable(
                    f"{self.description} refused the key ({_describe(exc)}): use the project's "
                    "service-role key (Settings > API)"
                ) from exc
            if str(exc.code) in ("PGRST106", "PGRST202"):
                raise StoreUnavailable(
                    f"{self.description}: {fn} not found ({_describe(exc)}): add {SCHEMA} to the "
                    "exposed schemas (Settings > API) and apply the migrations (zerfaux migrate)"
                ) from exc
            raise
        raise AssertionError("unreachable")

    async def _rows(self, fn: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        data = await self._call(fn, params)
        if not isinstance(data, list):
            raise StoreUnavailable(f"{self.description}: {fn} answered {type(data).__name__}, not rows")
        return data

    async def ping(self) -> None:
        try:
            await self._call("ping", {}, retry_seconds=0.0)
        except APIError as exc:
            raise StoreUnavailable(f"{self.description} does not answer: {_describe(exc)}") from exc

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, held: Sequence[UUID] | None = None
    ) -> list[ClaimedOperation]:
        rows = await self._rows("claim", {
            "p_worker": worker, "p_limit": limit, "p_lease_seconds": lease_seconds,
            "p_held": None if held is None else [str(i) for i in held], "p_retry_window_seconds": self._window,
        })
        return [ClaimedOperation.from_row(row) for row in rows]

    async def heartbeat(self, worker: str, ids: Sequence[UUID], lease_seconds: float) -> dict[UUID, bool]:
        rows = await self._rows(
            "heartbeat", {"p_worker": worker, "p_ids": [str(i) for i in ids], "p_lease_seconds": lease_seconds}
        )
        return {UUID(str(row["id"])): bool(row["cancel_requested"]) for row in rows}

    async def progress(self, op_id: UUID, worker: str, progress: Mapping[str, Any]) -> str:
        return str(await self._call("progress", {"p_id": str(op_id), "p_worker": worker, "p_progress": dict(progress)}))

    async def current_input(self, op_id: UUID, worker: str) -> Mapping[str, Any] | None:
        payload = await self._call("current_input", {"p_id": str(op_id), "p_worker": worker})
        return dict(payload) if isinstance(payload, Mapping) else None

    async def complete_many(
        self, worker: str, items: Sequence[tuple[UUID, Mapping[str, Any]]]
    ) -> dict[UUID, tuple[bool, str | None]]:
        payload = [{"id": str(op_id), "result": dict(result)} for op_id, result in items]
        rows = await self._rows("complete_many", {"p_worker": worker, "p_items": payload})
        return {UUID(str(r["id"])): (bool(r["done"]), r["error"]) for r in rows}

    async def fail(self, op_id: UUID, worker: str, error: str, permanent: bool, retry_seconds: float) -> str:
        return str(await self._call("fail", {
            "p_id": str(op_id), "p_worker": worker, "p_error": error,
            "p_permanent": permanent, "p_retry_seconds": retry_seconds, "p_window_seconds": self._window,
        }))

    async def finish_cancelled(self, op_id: UUID, worker: str, message: str) -> bool:
        return bool(await self._call("finish_cancelled", {"p_id": str(op_id), "p_worker": worker, "p_message": message}))

    async def release(self, worker: str, ids: Sequence[UUID]) -> int:
        return int(await self._call("release", {"p_worker": worker, "p_ids": [str(i) for i in ids]}))

    async def prune(self, days: float) -> int:
        return int(await self._call("prune", {"p_days": days}))

    async def queue_state(self) -> QueueState:
        rows = await self._rows("queue_state", {})
        row = dict(rows[0])
        # JSON carries timestamps as text; the dispatcher wants a datetime.
        if row.get("next_run_after") is not None:
            row["next_run_after"] = datetime.fromisoformat(str(row["next_run_after"]))
        return QueueState.from_row(row)

    async def schedule_due(self) -> Schedule:
        rows = await self._rows("schedule_due", {})
        return Schedule.from_row(rows[0] if rows else {})

    async def record_rpo_transitions(self) -> int:
        return int(await self._call("record_rpo_transitions", {}))

    async def status_report(self, recent: int = 15, worker_seconds: float = 120.0) -> dict[str, Any]:
        return dict(await self._call("status_report", {"p_recent": recent, "p_worker_seconds": worker_seconds}))

    async def claim_mode(self, mode: str) -> str:
        return str(await self._call("claim_mode", {"p_mode": mode}))

    async def set_mode(self, mode: str) -> str | None:
        previous = await self._call("set_mode", {"p_mode": mode})
        return None if previous is None else str(previous)

    async def database_mode(self) -> str | None:
        mode = await self._call("database_mode", {})
        return None if mode is None else str(mode)

    async def broadcast_ready(self) -> bool:
        return bool(await self._call("broadcast_ready", {}))

    async def vault_secret(self, name: str) -> str | None:
        value = await self._call("vault_secret", {"p_name": name})
        return None if value is None else str(value)

    async def protection_overview(self) -> list[GroupStatus]:
        return [GroupStatus.from_row(row) for row in await self._rows("protection_overview", {})]

    async def rpo_report(self, since: datetime, until: datetime) -> list[RpoCompliance]:
        rows = await self._rows("rpo_report", {"p_from": since.isoformat(), "p_to": until.isoformat()})
        return [RpoCompliance.from_row(row) for row in rows]

    async def run_report(self, run_id: UUID) -> dict[str, Any] | None:
        report = await self._call("run_report", {"p_run": str(run_id)})
        return None if report is None else dict(report)


def _describe(exc: APIError) -> str:
    parts = [str(exc.code or ""), exc.message or ""]
    return ": ".join(p for p in parts if p) or "error"
