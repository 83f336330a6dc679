"""A small Supabase Realtime for the tests: Phoenix frames (vsn 1.0.0) over the websockets library.

Realtime runs only as a Docker image, which these machines cannot run. This fake speaks the
frames of FACTS.md exactly: ``phx_join`` with ``config.postgres_changes`` answered by ``phx_reply``
carrying ``response.postgres_changes[].id``; the subscription goes live only with the ``system``
message "Subscribed to PostgreSQL"; a change arrives as ``postgres_changes`` with ``ids`` and
``data{schema, table, commit_timestamp, type, columns, record, old_record, errors}``; heartbeats
on topic ``phoenix`` are answered. Changes come from real Postgres. The real server reads the WAL;
the fake hears NOTIFYs instead: every INSERT and UPDATE of ``zerfaux.operations`` through a trigger
the fake adds to the database it serves (``zerfaux_fake_wal``, carrying the row as committed), and
an UPDATE of ``replication_jobs`` asking for cancellation through the engine's ``zerfaux_cancel``
(the row is then read). Filters are
applied to the record as on the server; as there, a change with no live subscriber is dropped and
nothing is replayed.

Broadcast from Database, on private channels (FACTS.md, Supabase in 2026): a join with
``config.private = true`` is authorized as Realtime does it, by RLS on ``realtime.messages``: as
the channel's role (the socket's key, or a JWT ``access_token``; an ``sb_`` key as access_token
is ignored) it inserts a row for the topic and reads it back, then rolls back; refused, the
reply is an error. A row that ``realtime.send`` writes into ``realtime.messages`` (a NOTIFY
from a trigger the fake adds stands in for Realtime's replication slot) reaches the channels
joined to its topic with the same privacy as ``event: "broadcast"``, payload ``{"type":
"broadcast", "event", "payload", "meta": {"id"}}``. ``config.broadcast.replay {since, limit}``
(private channels only, limit at most 25) sends the topic's messages inserted since ``since``
(ms since the epoch) after the join reply, with ``meta.replayed = true``. Every broadcast frame
sent is kept in ``broadcast_frames``.

Faults the tests use (call them on the fake's loop): ``close_clean()`` (close frame 1000), ``close_abrupt()`` (TCP dropped, no
close frame), ``subscribed_delay`` (seconds before "Subscribed"), ``drop_events`` (the next n
changes vanish), ``fail_subscribe`` (a ``system`` error instead of "Subscribed"), ``refuse``
(new sockets are answered 503, as during an outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg.rows import dict_row
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.fakes.keys import ProjectKeys

log = logging.getLogger(__name__)

PATH = "/realtime/v1/websocket"
_binding_ids = itertools.count(38_412_551)  # the real server's ids are hashes: arbitrary ints

_ROW = {
    ("zerfaux", "operations"): "select to_jsonb(o) as record from zerfaux.operations o where o.id = %s",
    ("public", "replication_jobs"): "select to_jsonb(j) as record from public.replication_jobs j where j.id = %s",
}
# Stands in for the WAL: every INSERT and UPDATE of an operation, with the row as committed (or
# only its id when the row would not fit in a NOTIFY payload, and is then read).
_WAL_TRIGGER = """
create or replace function public.zerfaux_fake_wal() returns trigger language plpgsql as $$
declare
    v_row text := to_jsonb(new)::text;
begin
    perform pg_notify('zerfaux_fake_wal', json_build_object(
        'op', tg_op, 'id', new.id, 'row', case when octet_length(v_row) < 7800 then to_jsonb(new) end)::text);
    return null;
end $$;
drop trigger if exists zerfaux_fake_wal on zerfaux.operations;
create trigger zerfaux_fake_wal after insert or update on zerfaux.operations
    for each row execute function public.zerfaux_fake_wal();
"""
_MESSAGES_TRIGGER = """
create or replace function public.zerfaux_fake_realtime_messages() returns trigger language plpgsql as $$
begin
    perform pg_notify('zerfaux_fake_broadcast', new.id::text);
    return null;
end $$;
drop trigger if exists zerfaux_fake_realtime_messages on realtime.messages;
create trigger zerfaux_fake_realtime_messages after insert on realtime.messages
    for each row execute function public.zerfaux_fake_realtime_messages();
"""
_MESSAGE = "select id::text, topic, event, payload, private from realtime.messages where id = %s and extension = 'broadcast'"
_REPLAY = """
select id::text, topic, event, payload, private from realtime.messages
 where topic = %s and extension = 'broadcast' and private
   and inserted_at >= to_timestamp(%s / 1000.0)::timestamp
 order by inserted_at limit %s
"""
_CAN_READ = """
with probe as (insert into realtime.messages (topic, extension) values (%(topic)s, 'broadcast') returning id)
select id from probe
"""
_COLUMNS = """
select a.attname as name, format_type(a.atttypid, null) as type
  from pg_attribute a where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped
 order by a.attnum
"""


@dataclass
class _Channel:
    topic: str
    join_ref: str | None
    bindings: list[dict[str, Any]]
    live: bool = False
    private: bool = False


@dataclass(eq=False)  # one per connection, kept in a set
class _Client:
    ws: ServerConnection
    role: str
    channels: dict[str, _Channel] = field(default_factory=dict)


class RealtimeFake:
    def __init__(self, database_url: str, keys: ProjectKeys, host: str = "127.0.0.1") -> None:
        self._database_url = database_url
        self._keys = keys
        self.refuse = False
        self.broadcast_frames: list[dict[str, Any]] = []
        self.join_payloads: list[dict[str, Any]] = []
        self._host = host
        self.subscribed_delay = 0.0
        self.drop_events = 0
        self.fail_subscribe = False
        self.events_sent = 0
        self.joins = 0
        self._clients: set[_Client] = set()
        self._server: Server | None = None
        self._feed: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._columns: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.port = 0

    @property
    def live_subscriptions(self) -> int:
        return sum(1 for c in self._clients for ch in c.channels.values() if ch.live)

    async def start(self) -> None:
        self._reader = await psycopg.AsyncConnection.connect(self._database_url, autocommit=True, row_factory=dict_row)
        listener = await psycopg.AsyncConnection.connect(self._database_url, autocommit=True)
        await listener.execute(_WAL_TRIGGER)
        await listener.execute("listen zerfaux_cancel")
        await listener.execute("listen zerfaux_fake_wal")
        if (await (await listener.execute("select to_regclass('realtime.messages')")).fetchone() or [None])[0]:
            await listener.execute(_MESSAGES_TRIGGER)
            await listener.execute("listen zerfaux_fake_broadcast")
        self._feed = asyncio.create_task(self._follow(listener))
        self._server = await serve(self._session, self._host, 0, process_request=self._authorize)
        self.port = list(self._server.sockets)[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in [*self._tasks, *([self._feed] if self._feed else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._feed] if self._feed else []), return_exceptions=True)
        await self._reader.close()

    def close_clean(self) -> None:
        """Send close frames (1000) and return: the handshake finishes in the background."""
        for client in list(self._clients):
            task = asyncio.ensure_future(client.ws.close(1000, "server closing"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close_abrupt(self) -> None:
        for client in list(self._clients):
            client.ws.transport.abort()

    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path != PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.refuse:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        apikey = (query.get("apikey") or [""])[0]
        role = self._keys.apikey_role(apikey, request.headers.get("User-Agent", ""))
        if role is None or query.get("vsn") != ["1.0.0"]:
            return connection.respond(HTTPStatus.FORBIDDEN, "invalid apikey or vsn\n")
        # The new keys stand for their role; a legacy JWT for the role it names.
        connection.zerfaux_role = role if self._keys.minted(apikey) else self._keys.jwt_role(apikey)  # type: ignore[attr-defined]
        return None

    async def _session(self, ws: ServerConnection) -> None:
        client = _Client(ws, getattr(ws, "zerfaux_role", "anon"))
        self._clients.add(client)
        try:
            async for raw in ws:
                await self._handle(client, json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)

    async def _handle(self, client: _Client, msg: dict[str, Any]) -> None:
        topic, event, ref = str(msg.get("topic")), msg.get("event"), msg.get("ref")
        if topic == "phoenix" and event == "heartbeat":
            await self._send(client, "phoenix", "phx_reply", {"status": "ok", "response": {}}, ref)
        elif event == "phx_join":
            await self._join(client, topic, msg)
        elif event == "phx_leave":
            client.channels.pop(topic, None)
            await self._send(client, topic, "phx_reply", {"status": "ok", "response": {}}, ref)
            await self._send(client, topic, "phx_close", {}, ref)

    async def _join(self, client: _Client, topic: str, msg: dict[str, Any]) -> None:
        self.joins += 1
        payload = msg.get("payload") or {}
        self.join_payloads.append(payload)
        config = payload.get("config") or {}
        bindings = [dict(b, id=next(_binding_ids)) for b in config.get("postgres_changes") or []]
        private = bool(config.get("private"))
        replay = ((config.get("broadcast") or {}).get("replay")) or None
        refusal = await self._refusal(client, topic, payload, private, replay)
        if refusal is not None:
            await client.ws.send(json.dumps({"topic": topic, "event": "phx_reply", "ref": msg.get("ref"),
                                             "join_ref": msg.get("join_ref"),
                                             "payload": {"status": "error", "response": {"reason": refusal}}}))
            return
        channel = _Channel(topic, msg.get("join_ref"), bindings, live=not bindings, private=private)
        client.channels[topic] = channel
        await self._send(client, topic, "phx_reply",
                         {"status": "ok", "response": {"postgres_changes": bindings}}, msg.get("ref"))
        if replay:
            rows = await (await self._reader.execute(
                _REPLAY, (topic.removeprefix("realtime:"), int(replay["since"]), int(replay.get("limit") or 25)))).fetchall()
            for row in rows:
                await self._broadcast(client, channel, row, replayed=True)
        if bindings:
            task = asyncio.create_task(self._confirm(client, channel))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refusal(self, client: _Client, topic: str, payload: dict[str, Any], private: bool,
                       replay: dict[str, Any] | None) -> str | None:
        """Why a join is refused, or None."""
        token = payload.get("access_token")
        role = client.role
        if isinstance(token, str) and not token.startswith("sb_"):
            role = self._keys.jwt_role(token) or ""
            if not role:
                return "InvalidJWTToken: the access_token does not verify"
        if replay is not None:
            limit = replay.get("limit", 25)
            if not private or not isinstance(replay.get("since"), int) or not isinstance(limit, int) or not 0 < limit <= 25:
                return "Replay needs a private channel, an integer since and a limit from 1 to 25"
        if private and not await self._may_read(role, topic.removeprefix("realtime:")):
            return f"Unauthorized: You do not have permissions to read from this Channel topic: {topic.removeprefix('realtime:')}"
        return None

    async def _may_read(self, role: str, topic: str) -> bool:
        """Realtime's check: as the role, insert a message for the topic, read it back, roll back."""
        async with await psycopg.AsyncConnection.connect(self._database_url) as conn:
            try:
                async with conn.transaction(force_rollback=True):
                    await conn.execute("select set_config('realtime.topic', %s, true),"
                                       " set_config('request.jwt.claims', %s, true)", (topic, json.dumps({"role": role})))
                    await conn.execute(f'set local role "{role}"')
                    row = await (await conn.execute(_CAN_READ, {"topic": topic})).fetchone()
                    return row is not None
            except psycopg.Error as exc:
                log.debug("fake realtime: %s may not read %s: %s", role, topic, exc)
                return False

    async def _broadcast(self, client: _Client, channel: _Channel, row: dict[str, Any], replayed: bool = False) -> None:
        meta: dict[str, Any] = {"id": row["id"]}
        if replayed:
            meta["replayed"] = True
        payload = {"type": "broadcast", "event": row["event"], "payload": row["payload"], "meta": meta}
        with contextlib.suppress(ConnectionClosed):
            await self._send(client, channel.topic, "broadcast", payload, None)
            self.broadcast_frames.append({"topic": channel.topic, "event": "broadcast", "payload": payload})

    async def _confirm(self, client: _Client, channel: _Channel) -> None:
        await asyncio.sleep(self.subscribed_delay)
        name = channel.topic.removeprefix("realtime:")
        if self.fail_subscribe:
            payload = {"channel": name, "extension": "postgres_changes", "status": "error",
                       "message": "Unable to subscribe to changes with given parameters."}
        else:
            payload = {"channel": name, "extension": "postgres_changes", "status": "ok",
                       "message": "Subscribed to PostgreSQL"}
        with contextlib.suppress(ConnectionClosed):
            await self._send(client, channel.topic, "system", payload, None)
            channel.live = not self.fail_subscribe

    async def _send(self, client: _Client, topic: str, event: str, payload: Any, ref: str | None) -> None:
        join_ref = client.channels[topic].join_ref if topic in client.channels else None
        await client.ws.send(json.dumps({"topic": topic, "event": event, "payload": payload,
                                         "ref": ref, "join_ref": join_ref}))

    async def _follow(self, listener: psycopg.AsyncConnection[Any]) -> None:
        async with listener:
            async for note in listener.notifies():
                if note.channel == "zerfaux_cancel":
                    await self._change("public", "replication_jobs", note.payload, "UPDATE")
                elif note.channel == "zerfaux_fake_broadcast":
                    await self._deliver(note.payload)
                else:
                    change = json.loads(note.payload)
                    await self._change("zerfaux", "operations", change["id"], change["op"], change["row"])

    async def _deliver(self, message_id: str) -> None:
        row = await (await self._reader.execute(_MESSAGE, (message_id,))).fetchone()
        if row is None:
            return
        for client in list(self._clients):
            for channel in list(client.channels.values()):
                if channel.topic == f"realtime:{row['topic']}" and channel.private == bool(row["private"]):
                    await self._broadcast(client, channel, row)

    async def _change(self, schema: str, table: str, row_id: str, kind: str,
                      record: dict[str, Any] | None = None) -> None:
        if record is None:
            row = await (await self._reader.execute(_ROW[(schema, table)], (row_id,))).fetchone()
            if row is None:
                return
            record = row["record"]
        if (schema, table) not in self._columns:
            cur = await self._reader.execute(_COLUMNS, (f"{schema}.{table}",))
            self._columns[(schema, table)] = list(await cur.fetchall())
        data = {
            "schema": schema, "table": table,
            "commit_timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "type": kind, "columns": self._columns[(schema, table)], "record": record,
            # Without replica identity full the old row carries only its key.
            "old_record": {} if kind == "INSERT" else {"id": record["id"]},
            "errors": None,
        }
        for client in list(self._clients):
            for channel in client.channels.values():
                ids = [b["id"] for b in channel.bindings if _matches(b, schema, table, kind, record)]
                if not channel.live or not ids:
                    continue
                if self.drop_events > 0:
                    self.drop_events -= 1
                    continue
                with contextlib.suppress(ConnectionClosed):
                    await self._send(client, channel.topic, "postgres_changes", {"ids": ids, "data": data}, None)
                    self.events_sent += 1


def _matches(binding: dict[str, Any], schema: str, table: str, kind: str, record: dict[str, Any]) -> bool:
    if binding.get("event") not in ("*", kind) or binding.get("schema") != schema:
        return False
    if binding.get("table") not in (None, "*", table):
        return False
    rule = binding.get("filter")
    if not rule:
        return True
    column, _, test = rule.partition("=")
    op, _, value = test.partition(".")
    if op != "eq":
        raise ValueError(f"this fake supports only eq filters, got {rule!r}")
    actual = record.get(column)
    return bool((json.dumps(actual) if isinstance(actual, bool) else str(actual)) == value)
