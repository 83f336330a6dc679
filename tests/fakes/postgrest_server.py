"""A small PostgREST for the tests: ``POST /rest/v1/rpc/<function>`` on real Postgres.

PostgREST runs only as a Docker image, which these machines cannot run. This fake serves the one
thing the PostgREST store uses, the way PostgREST does it (docs.postgrest.org, "Functions as
RPC"): the JSON body is the function's named arguments, typed by the function's own signature
(``json_to_record`` with the argument types); ``Content-Profile`` picks the schema among the
exposed ones; the request runs in one transaction as the role the key stands for; a scalar
function answers its value, a set-returning one an array of objects; errors come back as
``{"code", "message", "details", "hint"}`` with PostgREST's status codes. Only functions found in
the catalog are called, and every name is quoted as an identifier.

Keys: the API gateway's rules of tests/fakes/keys.py decide the role (``apikey`` must be one of
the project's keys; a verified JWT in ``Authorization: Bearer`` names the role; an ``sb_secret_…``
key alone runs as ``service_role``; a legacy key alone as ``anon``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.keys import ProjectKeys

_FUNCTION = """
select p.proname, p.proretset,
       coalesce(p.proargnames, '{}') as names,
       coalesce(p.proargmodes::text[], '{}') as modes,
       array(select format_type(t, null) from unnest(p.proargtypes) t) as types,
       p.pronargdefaults as defaults
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where n.nspname = %(schema)s and p.proname = %(name)s and p.prokind = 'f'
"""


@dataclass
class Faults:
    """Failures the tests inject: the next ``unavailable`` requests answer 503 PGRST001."""

    unavailable: int = 0
    credentials: list[tuple[str, str | None]] = field(default_factory=list)  # (apikey, Authorization) seen


@dataclass(frozen=True)
class _Signature:
    names: list[str]  # input arguments, in order
    types: list[str]
    required: set[str]
    returns_set: bool


def _signature(row: dict[str, Any]) -> _Signature:
    names, modes = list(row["names"]), list(row["modes"])
    inputs = [n for i, n in enumerate(names) if not modes or modes[i] in ("i", "b", "v")]
    # proargtypes lists input arguments only; the last pronargdefaults of them have defaults.
    required = set(inputs[: len(inputs) - int(row["defaults"])])
    return _Signature(inputs, list(row["types"]), required, bool(row["proretset"]))


def _error(status: int, code: str, message: str, details: str | None = None, hint: str | None = None) -> Response:
    return JSONResponse({"code": code, "message": message, "details": details, "hint": hint}, status_code=status)


def _status_for(sqlstate: str, authenticated: bool) -> int:
    """PostgREST's table of SQLSTATE to HTTP status (docs.postgrest.org, "Errors")."""
    if sqlstate == "42501":
        return 403 if authenticated else 401
    exact = {"23503": 409, "23505": 409, "25006": 405, "P0001": 400, "42883": 404, "42P01": 404}
    if sqlstate in exact:
        return exact[sqlstate]
    classes = {"08": 503, "53": 503, "28": 403, "0L": 403, "0P": 403}
    if sqlstate[:2] in classes:
        return classes[sqlstate[:2]]
    if sqlstate[:2] in ("09", "25", "2D", "38", "39", "3B", "40", "54", "55", "57", "58", "F0", "HV", "P0", "XX"):
        return 500
    return 400


def create_app(database_url: str, keys: ProjectKeys, schemas: Sequence[str] = ("public", "zerfaux"),
               faults: Faults | None = None) -> Starlette:
    faults = faults or Faults()
    seen = faults.credentials
    pool = AsyncConnectionPool(database_url, min_size=1, max_size=10, open=False)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.open(wait=True)
        try:
            yield
        finally:
            await pool.close()

    async def rpc(request: Request) -> Response:
        apikey = request.headers.get("apikey")
        if apikey is None:
            return JSONResponse({"message": "No API key found in request",
                                 "hint": "No `apikey` request header or url param was found."}, status_code=401)
        if keys.apikey_role(apikey, request.headers.get("user-agent", "")) is None:
            return JSONResponse({"message": "Invalid API key"}, status_code=401)
        seen.append((apikey, request.headers.get("authorization")))
        role = keys.request_role(apikey, request.headers.get("authorization"), request.headers.get("user-agent", ""))
        if role is None:
            return _error(401, "PGRST301", "JWT could not be decoded")
        schema = request.headers.get("content-profile") or schemas[0]
        if schema not in schemas:
            return _error(406, "PGRST106", f"The schema must be one of the following: {', '.join(schemas)}")
        if faults.unavailable > 0:
            faults.unavailable -= 1
            return _error(503, "PGRST001", "Database client error. Retrying the connection.")
        try:
            args = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(400, "PGRST102", "Empty or invalid json")
        if not isinstance(args, dict):
            return _error(400, "PGRST102", "Expected a JSON object of named arguments")
        name = request.path_params["function"]
        try:
            return await _call(pool, schema, name, args, role)
        except psycopg.OperationalError as exc:
            return _error(503, "PGRST000", "Could not connect with the database", str(exc))
        except psycopg.Error as exc:
            state = exc.sqlstate or "XX000"
            return _error(_status_for(state, role != "anon"), state, exc.diag.message_primary or str(exc),
                          exc.diag.message_detail, exc.diag.message_hint)

    return Starlette(routes=[Route("/rest/v1/rpc/{function}", rpc, methods=["POST"])], lifespan=lifespan)


async def _call(pool: AsyncConnectionPool, schema: str, name: str, args: dict[str, Any], role: str) -> Response:
    async with pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        found = await (await cur.execute(_FUNCTION, {"schema": schema, "name": name})).fetchall()
        signature = next((s for s in map(_signature, found)
                          if s.required <= set(args) <= set(s.names)), None)
        if signature is None:
            listed = ", ".join(sorted(args))
            return _error(404, "PGRST202", f"Could not find the function {schema}.{name}({listed}) in the schema cache")
        await cur.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        await cur.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"role": role}),))
        used = [(n, t) for n, t in zip(signature.names, signature.types) if n in args]
        call = sql.SQL("{}.{}({})").format(
            sql.Identifier(schema), sql.Identifier(name),
            sql.SQL(", ").join(sql.SQL("{} => _.{}").format(sql.Identifier(n), sql.Identifier(n)) for n, _ in used),
        )
        source = (sql.SQL("json_to_record(%(args)s::json) as _({})").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in used))
            if used else sql.SQL("(select 1) as _"))
        if signature.returns_set:
            query = sql.SQL("select coalesce(jsonb_agg(to_jsonb(r)), '[]') as body from {}, lateral {} as r").format(source, call)
        else:
            query = sql.SQL("select to_jsonb({}) as body from {}").format(call, source)
        row = await (await cur.execute(query, {"args": json.dumps(args)})).fetchone()
        body = row["body"] if row else None
        return Response(json.dumps(body), media_type="application/json")
