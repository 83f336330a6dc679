"""Assemble a listener from settings: store, handlers, dispatcher, sources, HTTP. Run it until
SIGTERM/SIGINT (or until idle), then stop claiming, finish or release, and close everything."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from handlers import BackendSettings, HandlerSet, build_handlers
from handlers.secrets import SecretResolver
from listener import executor
from listener.config import Settings
from listener.dispatcher import DispatchSettings, Dispatcher
from listener.metrics import Metrics
from listener.mode import ModeMismatch, check_mode, watch_mode
from listener.sources import Source
from listener.sources.notify import NotifySource
from listener.sources.sweep import SweepSource
from listener.store import Store
from listener.store_pg import PostgresStore

log = logging.getLogger(__name__)


def database_url(settings: Settings) -> str | None:
    """The Postgres URL to use: DATABASE_URL, the embedded server, or None (PostgREST only)."""
    if settings.database_url:
        return settings.database_url
    if settings.embedded:
        from listener.embedded import embedded_url

        return embedded_url(settings.home)
    return None


def make_store(settings: Settings) -> Store:
    url = database_url(settings)
    if url is not None:
        return PostgresStore(url, pool_size=settings.concurrency + 4,
                             attempt_retry_seconds=settings.attempt_retry_seconds,
                             retry_window_seconds=settings.retry_window_seconds)
    from listener.store_postgrest import PostgrestStore  # issue 6: SUPABASE_URL only

    assert settings.supabase_url and settings.supabase_key
    return PostgrestStore(settings.supabase_url, settings.supabase_key,
                          attempt_retry_seconds=settings.attempt_retry_seconds,
                          retry_window_seconds=settings.retry_window_seconds)


@dataclass
class Listener:
    settings: Settings
    store: Store
    handlers: HandlerSet
    dispatcher: Dispatcher
    metrics: Metrics
    sources: list[Source] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    def vault_lookup(self) -> Callable[[str], str | None]:
        """A blocking Vault lookup for backend threads, bridged onto the event loop."""

        def lookup(name: str) -> str | None:
            assert self.loop is not None
            return asyncio.run_coroutine_threadsafe(self.store.vault_secret(name), self.loop).result(30)

        return lookup


def build_listener(settings: Settings, store: Store | None = None) -> Listener:
    store = store or make_store(settings)
    metrics = Metrics()
    holder: dict[str, Listener] = {}

    def vault(name: str) -> str | None:
        return holder["listener"].vault_lookup()(name)

    secrets = SecretResolver(os.environ, settings.secrets_dir, vault)
    handlers = build_handlers(
        BackendSettings(
            use_stubs=settings.use_stubs,
            stub_seconds=settings.stub_seconds,
            stub_seconds_jitter=settings.stub_seconds_jitter,
            stub_world=settings.stub_world,
            stub_vms=settings.stub_vms,
            vcenter_ca_bundle=settings.vcenter_ca_bundle,
        ),
        secrets,
    )
    dispatcher = Dispatcher(
        store,
        handlers.by_kind,
        DispatchSettings(
            worker_id=settings.worker_id,
            concurrency=settings.concurrency,
            lease_seconds=settings.lease_seconds,
            idle_seconds=settings.sweep_seconds,
            retry_base_seconds=settings.retry_base_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
        ),
        metrics,
    )
    listener = Listener(settings, store, handlers, dispatcher, metrics)
    holder["listener"] = listener
    url = database_url(settings)  # None with only SUPABASE_URL: no LISTEN, Realtime wakes instead
    if url is not None:
        listener.sources.append(NotifySource(url, dispatcher.wake, dispatcher.poke))
    if settings.supabase_url and settings.supabase_key:
        from listener.sources.realtime import RealtimeSource

        listener.sources.append(
            RealtimeSource(settings.supabase_url, settings.supabase_key, dispatcher.wake, dispatcher.poke,
                           wakeups=settings.realtime_wakeups,
                           broadcast_ready=store.broadcast_ready)
        )
    if settings.webhook_secret and settings.http_port is not None:
        from listener.sources.webhook import WebhookSource

        listener.sources.append(WebhookSource(dispatcher.wake, dispatcher.poke))
    elif settings.webhook_secret:
        log.warning("ZERFAUX_WEBHOOK_SECRET is set but ZERFAUX_HTTP_PORT is not: no webhook endpoint")
    listener.sources.append(
        SweepSource(store, dispatcher.wake, settings.sweep_seconds, settings.retention_days, metrics)
    )
    return listener


async def serve(listener: Listener, until_idle: bool = False) -> None:
    """Run until a signal (or, with ``until_idle``, until nothing is left to do)."""
    listener.loop = asyncio.get_running_loop()
    await listener.store.open()
    try:
        await check_mode(listener.store, listener.handlers.mode)
    except BaseException:
        await asyncio.to_thread(listener.handlers.close)
        await listener.store.close()
        raise
    loop = listener.loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _on_signal, listener, sig)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests): the caller stops the dispatcher itself
    tasks = [asyncio.create_task(source.run(), name=f"source-{source.name}") for source in listener.sources]
    extra = _http_task(listener)
    if extra is not None:
        tasks.append(extra)
    changed: list[ModeMismatch] = []

    def mode_changed(exc: ModeMismatch) -> None:
        log.error("%s", exc)
        changed.append(exc)
        listener.dispatcher.stop()

    tasks.append(asyncio.create_task(
        watch_mode(listener.store, listener.handlers.mode, listener.settings.sweep_seconds, mode_changed),
        name="mode"))
    log.info(
        "listening as %s on %s (%s backends, concurrency %d)",
        listener.settings.worker_id, listener.store.description, listener.handlers.mode,
        listener.settings.concurrency,
    )
    executor.install(loop, listener.settings.concurrency)  # a thread for every slot
    try:
        await listener.dispatcher.run(until_idle=until_idle)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        await asyncio.to_thread(listener.handlers.close)
        executor.uninstall(loop)
        await listener.store.close()
    if changed:
        raise changed[0]


def _on_signal(listener: Listener, sig: signal.Signals) -> None:
    log.info("received %s: no new claims; finishing or releasing running work", sig.name)
    listener.dispatcher.stop()


def _http_task(listener: Listener) -> asyncio.Task[None] | None:
    if listener.settings.http_port is None:
        return None
    try:
        from listener.http import serve_http
    except ImportError:
        log.warning("ZERFAUX_HTTP_PORT is set but the HTTP app is not available in this build")
        return None
    return asyncio.create_task(serve_http(listener), name="http")
