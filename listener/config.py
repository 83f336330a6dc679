"""Settings, read once from an environment mapping; a bad value stops start-up with its name."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

from listener.apikeys import server_key_problem


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the fix."""


def _bool(environ: Mapping[str, str], key: str, default: bool) -> bool:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {raw!r}")


def _number(environ: Mapping[str, str], key: str, default: float, minimum: float) -> float:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{key} must be at least {minimum:g}, got {raw!r}")
    return value


def _int(environ: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    value = _number(environ, key, default, minimum)
    if value != int(value):
        raise ConfigError(f"{key} must be a whole number, got {environ.get(key)!r}")
    return int(value)


# libpq's secret keywords, as a keyword/value pair (``password=p``, ``password = 'a b'``, quotes
# escaped with a backslash) or as a URL query parameter (``?password=p&sslmode=require``).
_SECRET_KEYS = "password|sslpassword"
_KEYWORD_SECRET = re.compile(rf"(?i)(?<![\w.])({_SECRET_KEYS})(\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']\S*)")
_QUERY_SECRET = re.compile(rf"(?i)(^|[&;])({_SECRET_KEYS})=[^&;]*")
_URL = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*://")


def redact_url(url: str) -> str:
    """A connection string (URL or libpq ``key=value`` form) with every password hidden, safe
    for logs and errors."""
    if not _URL.match(url):
        return _KEYWORD_SECRET.sub(r"\1\2***", url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        parts = parts._replace(query=_QUERY_SECRET.sub(r"\1\2=***", parts.query))
    return urlunsplit(parts)


RealtimeWakeups = Literal["auto", "broadcast", "changes"]
TRANSACTION_POOLER_PORT = 6543
_KEYWORD_PORT = re.compile(r"(?i)(?<![\w.])port\s*=\s*'?([\d,]+)")


def pooler_problem(url: str) -> str | None:
    """Why ``url`` cannot carry the listener (Supabase's transaction pooler), or None.

    The transaction pooler (Supavisor, port 6543; ``pgbouncer=true`` is Prisma's flag for it)
    hands every transaction to another server connection: LISTEN, session settings and prepared
    statements do not survive. The session pooler (port 5432) and the direct connection keep one
    server connection per client, prepared statements included, so they need nothing special."""
    if _URL.match(url):
        parts = urlsplit(url)
        hosts = parts.netloc.rsplit("@", 1)[-1]
        ports = [h.rsplit(":", 1)[1] for h in hosts.split(",") if ":" in h.rsplit("]", 1)[-1]]
        query = {k.lower(): v for k, v in parse_qs(parts.query).items()}
        ports += query.get("port", [])
        bouncer = any(v.strip().lower() in ("true", "1") for v in query.get("pgbouncer", []))
    else:
        found = _KEYWORD_PORT.search(url)
        ports = found.group(1).split(",") if found else []
        bouncer = False
    fix = ("use the session pooler (the same host on port 5432: postgresql://postgres.<project-ref>:"
           "<password>@aws-0-<region>.pooler.supabase.com:5432/postgres) or the direct connection "
           "(db.<project-ref>.supabase.co:5432); Dashboard > Connect shows both")
    if str(TRANSACTION_POOLER_PORT) in [p.strip() for p in ports]:
        return (f"DATABASE_URL points at the transaction pooler (port {TRANSACTION_POOLER_PORT}), which "
                f"cannot carry LISTEN or the listener's sessions: {fix}")
    if bouncer:
        return f"DATABASE_URL has pgbouncer=true, the setting for a transaction pooler: remove it and {fix}"
    return None


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    supabase_url: str | None
    supabase_key: str | None
    use_stubs: bool
    webhook_secret: str | None
    worker_id: str
    concurrency: int
    lease_seconds: float
    sweep_seconds: float
    stub_seconds: float
    stub_vms: int
    http_port: int | None
    http_host: str
    retention_days: float
    retry_base_seconds: float
    retry_max_seconds: float
    retry_window_seconds: float  # transient failures of one operation are retried this long
    shutdown_grace_seconds: float
    secrets_dir: str | None
    vcenter_ca_bundle: str | None
    home: Path  # where the embedded Postgres lives
    stub_seconds_jitter: float = 0.0
    stub_world: str | None = None  # directory of the stubs' shared outside world (tests, soak)
    realtime_wakeups: RealtimeWakeups = "auto"  # auto | broadcast | changes (listener.sources.realtime)
    jwt_secret: str | None = None  # the console's HS256 key: the project's JWT secret (docs/console.md)
    jwks_url: str | None = None  # the console's RS256/ES256 keys: the project's JWKS (docs/console.md)

    @property
    def attempt_retry_seconds(self) -> float:
        """How long the store may retry a call made for a running attempt (heartbeat, progress,
        complete, fail): half the lease, so no write of an attempt outlives its lease."""
        return self.lease_seconds / 2.0

    @property
    def embedded(self) -> bool:
        return not self.database_url and not self.supabase_url

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        supabase_url = env.get("SUPABASE_URL") or None
        supabase_key = _server_key(env)
        if supabase_url and not supabase_key and not env.get("DATABASE_URL"):
            raise ConfigError(
                "SUPABASE_URL is set but neither SUPABASE_SECRET_KEY nor SUPABASE_SERVICE_ROLE_KEY is: set "
                "the project's secret key (sb_secret_..., Project Settings > API Keys) or its legacy "
                "service_role key"
            )
        if env.get("DATABASE_URL") and (problem := pooler_problem(env["DATABASE_URL"])):
            raise ConfigError(problem)
        wakeups = (env.get("ZERFAUX_REALTIME_WAKEUPS") or "auto").strip().lower()
        if wakeups not in ("auto", "broadcast", "changes"):
            raise ConfigError(f"ZERFAUX_REALTIME_WAKEUPS must be auto, broadcast or changes, got {wakeups!r}")
        port = env.get("ZERFAUX_HTTP_PORT")
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            supabase_url=supabase_url.rstrip("/") if supabase_url else None,
            supabase_key=supabase_key,
            use_stubs=_bool(env, "ZERFAUX_USE_STUBS", True),
            webhook_secret=env.get("ZERFAUX_WEBHOOK_SECRET") or None,
            worker_id=env.get("ZERFAUX_WORKER_ID")
            or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            concurrency=_int(env, "ZERFAUX_CONCURRENCY", 8, 1),
            lease_seconds=_number(env, "ZERFAUX_LEASE_SECONDS", 30.0, 1.0),
            sweep_seconds=_number(env, "ZERFAUX_SWEEP_SECONDS", 5.0, 0.1),
            stub_seconds=_number(env, "ZERFAUX_STUB_SECONDS", 2.0, 0.0),
            stub_vms=_int(env, "ZERFAUX_STUB_VMS", 50, 0),
            http_port=_int(env, "ZERFAUX_HTTP_PORT", 0, 0) if port else None,
            # Supabase must reach the webhook, so every interface unless narrowed.
            http_host=env.get("ZERFAUX_HTTP_HOST") or "0.0.0.0",
            retention_days=_number(env, "ZERFAUX_OPERATIONS_RETENTION_DAYS", 30.0, 0.0),
            retry_base_seconds=_number(env, "ZERFAUX_RETRY_BASE_SECONDS", 2.0, 0.0),
            retry_max_seconds=_number(env, "ZERFAUX_RETRY_MAX_SECONDS", 300.0, 0.0),
            retry_window_seconds=_number(env, "ZERFAUX_RETRY_WINDOW_SECONDS", 3600.0, 0.0),
            shutdown_grace_seconds=_number(env, "ZERFAUX_SHUTDOWN_GRACE_SECONDS", 20.0, 0.0),
            secrets_dir=env.get("ZERFAUX_SECRETS_DIR") or None,
            vcenter_ca_bundle=env.get("ZERFAUX_VCENTER_CA_BUNDLE") or None,
            home=Path(env.get("ZERFAUX_HOME") or ".zerfaux"),
            stub_seconds_jitter=_number(env, "ZERFAUX_STUB_SECONDS_JITTER", 0.0, 0.0),
            stub_world=env.get("ZERFAUX_STUB_WORLD") or None,
            realtime_wakeups=cast(RealtimeWakeups, wakeups),
            jwt_secret=_jwt_secret(env),
            jwks_url=_jwks_url(env),
        )


MIN_JWT_SECRET = 32


def _jwt_secret(env: Mapping[str, str]) -> str | None:
    secret = env.get("ZERFAUX_JWT_SECRET") or None
    if secret is not None and len(secret) < MIN_JWT_SECRET:
        raise ConfigError(
            f"ZERFAUX_JWT_SECRET must be at least {MIN_JWT_SECRET} characters (it is the project's JWT secret: "
            "Project Settings > API > JWT Secret); a short HS256 key can be guessed"
        )
    return secret


def _jwks_url(env: Mapping[str, str]) -> str | None:
    url = (env.get("ZERFAUX_JWKS_URL") or "").strip() or None
    if url is not None and not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(
            f"ZERFAUX_JWKS_URL must be an http(s) URL such as "
            f"https://<project-ref>.supabase.co/auth/v1/.well-known/jwks.json, got {url!r}"
        )
    return url


def _server_key(env: Mapping[str, str]) -> str | None:
    """SUPABASE_SECRET_KEY or SUPABASE_SERVICE_ROLE_KEY (either may hold either kind of key),
    checked: a publishable key or a JWT of another role stops start-up."""
    secret, legacy = env.get("SUPABASE_SECRET_KEY") or None, env.get("SUPABASE_SERVICE_ROLE_KEY") or None
    if secret and legacy and secret != legacy:
        raise ConfigError("SUPABASE_SECRET_KEY and SUPABASE_SERVICE_ROLE_KEY are both set and differ: keep one")
    name, key = ("SUPABASE_SECRET_KEY", secret) if secret else ("SUPABASE_SERVICE_ROLE_KEY", legacy)
    if key is None:
        return None
    key = key.strip()
    if problem := server_key_problem(name, key):
        raise ConfigError(problem)
    return key
