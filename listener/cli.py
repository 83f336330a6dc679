"""``zerfaux``: migrate · run [--until-idle] · demo · status · mode [real|stub] · report rpo · report run <id> · webhook install|uninstall."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from handlers import BackendUnavailable
from listener.config import ConfigError, Settings, redact_url
from listener.migrate import MigrationError, migrate, seed
from listener.mode import ModeMismatch
from listener.store import StoreUnavailable

log = logging.getLogger("zerfaux")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("pgserver", "psycopg.pool", "httpx", "websockets", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _prepare(settings: Settings, apply_seed: bool) -> str | None:
    """Apply migrations (and the seed on the embedded default); return the Postgres URL."""
    from listener.service import database_url

    url = database_url(settings)
    if url is None:
        return None
    import psycopg

    try:
        applied = migrate(url)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StoreUnavailable(f"cannot connect to {redact_url(url)}: {reason}") from exc
    if applied:
        log.info("applied %d migration(s)", len(applied))
    if apply_seed:
        seed(url)
    return url


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from listener.service import database_url

    url = database_url(settings)
    if url is None:
        print("zerfaux migrate needs DATABASE_URL (or the embedded default); with only "
              "SUPABASE_URL, apply supabase/migrations with `supabase db push`", file=sys.stderr)
        return 2
    applied = migrate(url)
    if args.seed:
        seed(url)
    print(f"{len(applied)} migration(s) applied" + (": " + ", ".join(m.path.name for m in applied) if applied else "; up to date"))
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from listener.service import build_listener, serve

    url = _prepare(settings, apply_seed=settings.embedded or os.environ.get("ZERFAUX_SEED") == "true")
    listener = build_listener(settings)
    if settings.embedded and url and not args.until_idle:
        from listener.demo import print_try_it

        print_try_it(url, settings.use_stubs)
    # What is loaded by now (pyVmomi's type tables, the console's templates, the backends) lives
    # as long as the process: out of the collector's sight, a full collection in the middle of
    # a request no longer walks it (the console's groups page had a p99 twice its p50).
    gc.freeze()
    asyncio.run(serve(listener, until_idle=args.until_idle))
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from listener.demo import run_demo

    url = _prepare(settings, apply_seed=True)
    if url is None:
        print("zerfaux demo needs DATABASE_URL or the embedded default", file=sys.stderr)
        return 2
    return run_demo(settings, url, timeout=args.timeout)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from listener.status import print_status

    _prepare(settings, apply_seed=False)
    return print_status(settings)


def cmd_mode(settings: Settings, args: argparse.Namespace) -> int:
    from listener.mode import change_message, describe
    from listener.service import make_store

    _prepare(settings, apply_seed=False)

    async def run() -> str:
        store = make_store(settings)
        await store.open()
        try:
            if args.mode is None:
                return f"mode: {describe(await store.database_mode())}"
            return change_message(await store.set_mode(args.mode), args.mode)
        finally:
            await store.close()

    print(asyncio.run(run()))
    return 0


def cmd_webhook(settings: Settings, args: argparse.Namespace) -> int:
    from listener.webhooks import WebhookInstallError, install, plan, uninstall

    if not settings.database_url:
        print("zerfaux webhook needs DATABASE_URL (direct or session pooler): the webhooks are triggers, "
              "which no API call creates; or make them in the dashboard as docs/deploy-supabase.md shows",
              file=sys.stderr)
        return 2
    try:
        if args.action == "uninstall":
            removed = uninstall(settings.database_url)
            print("removed: " + ", ".join(f"{n} on {t}" for n, t in removed) if removed else "no Zerfaux webhooks were installed")
            return 0
        if not settings.webhook_secret:
            print("zerfaux webhook install needs ZERFAUX_WEBHOOK_SECRET, the same secret the listener is given "
                  "(for example: openssl rand -hex 32)", file=sys.stderr)
            return 2
        target = plan(args.url, args.timeout_ms)
        print(target.describe())
        created = install(settings.database_url, settings.webhook_secret, target)
    except WebhookInstallError as exc:
        print(f"zerfaux: {exc}", file=sys.stderr)
        return 2
    print("created: " + ", ".join(f"{n} on {t}" for n, t in created))
    return 0


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from listener.report import print_rpo_report
    from listener.run_report import print_run_report

    _prepare(settings, apply_seed=False)
    if args.report == "rpo":
        return print_rpo_report(settings, args.days, args.until, args.json)
    if args.report == "run":
        return print_run_report(settings, args.run_id, args.json)
    raise AssertionError(f"unknown report {args.report}")


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = 0.0
    if not 0 < days <= 3660:
        raise argparse.ArgumentTypeError(f"--days must be a number of days above 0 (at most 3660), not {text!r}")
    return days


def _stamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--until must be an ISO 8601 time such as 2026-12-01T00:00:00+00:00, not {text!r}") from None


def _run_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the run id must be a recovery_runs.id (a UUID), not {text!r}") from None


def _report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="reports: rpo, run")
    reports = p.add_subparsers(dest="report", required=True)
    r = reports.add_parser("rpo", help="per group: share of time within RPO, worst RPO, violations")
    r.add_argument("--days", type=_days, default=30.0, help="length of the window in days (default 30)")
    r.add_argument("--until", type=_stamp, default=None,
                   help="end of the window, ISO 8601 (default now; without a zone: UTC)")
    r.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    r = reports.add_parser("run", help="one recovery run: steps with times, per-VM boot and ready times, RTO, "
                                       "warnings (for an auditor)")
    r.add_argument("run_id", type=_run_id, metavar="ID", help="the recovery_runs.id")
    r.add_argument("--json", action="store_true", help="zerfaux.run_report's JSON instead of text")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zerfaux", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="apply pending supabase/migrations")
    p.add_argument("--seed", action="store_true", help="also load supabase/seed.sql")
    p = sub.add_parser("run", help="run the listener until SIGTERM")
    p.add_argument("--until-idle", action="store_true", help="drain what is runnable, then exit 0")
    p = sub.add_parser("demo", help="ask for each kind of work and watch it converge")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    sub.add_parser("status", help="groups' RPO, queue depth, workers, recent operations")
    p = sub.add_parser("mode", help="show or set the database's mode (stub or real)")
    p.add_argument("mode", nargs="?", choices=("real", "stub"),
                   help="set it: only listeners of this mode start against the database")
    p = sub.add_parser("webhook", help="install or remove the Supabase database webhooks that wake listeners")
    actions = p.add_subparsers(dest="action", required=True)
    w = actions.add_parser("install", help="create the webhook triggers (needs DATABASE_URL, ZERFAUX_WEBHOOK_SECRET)")
    w.add_argument("--url", required=True, help="the listener's public URL, ending in /webhooks/supabase")
    w.add_argument("--timeout-ms", type=int, default=5000, help="pg_net's request timeout (default 5000; its own is 1000)")
    actions.add_parser("uninstall", help="drop the webhook triggers")
    _report_parser(sub)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    commands = {"migrate": cmd_migrate, "run": cmd_run, "demo": cmd_demo, "status": cmd_status, "mode": cmd_mode,
                "webhook": cmd_webhook, "report": cmd_report}
    try:
        settings = Settings.from_environ()
        return commands[args.command](settings, args)
    except ConfigError as exc:
        print(f"zerfaux: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"zerfaux: {exc}", file=sys.stderr)
        return 3
    except MigrationError as exc:
        print(f"zerfaux: {exc}", file=sys.stderr)
        return 4
    except BackendUnavailable as exc:
        print(f"zerfaux: {exc}", file=sys.stderr)
        return 5
    except ModeMismatch as exc:
        print(f"zerfaux: {exc}", file=sys.stderr)
        return 6
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
