"""The project's server key: a legacy ``service_role`` JWT or a new ``sb_secret_…`` key.

Supabase's API keys (FACTS.md, Supabase in 2026): ``sb_publishable_…`` stands for ``anon`` and
``sb_secret_…`` for ``service_role``; both go in the ``apikey`` header (the Realtime socket's
``?apikey=``), where the API gateway mints a short-lived JWT of their role. They are not JWTs:
never ``Authorization: Bearer`` and never a Realtime ``access_token``. The legacy keys are
long-lived JWTs whose ``role`` claim says what they are, sent both as ``apikey`` and as the
bearer token. Only the role is read here; the signature is the gateway's to check.
"""

from __future__ import annotations

import base64
import json

SECRET_PREFIX = "sb_secret_"
PUBLISHABLE_PREFIX = "sb_publishable_"


def is_api_key(key: str) -> bool:
    """A new-style key (``sb_…``), which travels only as ``apikey``."""
    return key.startswith("sb_")


def jwt_role(key: str) -> str | None:
    """The ``role`` claim of a JWT, unverified; None when ``key`` is not a JWT."""
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    role = claims.get("role") if isinstance(claims, dict) else None
    return role if isinstance(role, str) else None


def server_key_problem(name: str, key: str) -> str | None:
    """Why ``key`` (from variable ``name``) cannot be the listener's server key, or None."""
    where = "Project Settings > API Keys in the Supabase dashboard"
    if key.startswith(SECRET_PREFIX):
        return None
    if key.startswith(PUBLISHABLE_PREFIX):
        return (f"{name} holds a publishable key (sb_publishable_...), which acts as anon and can "
                f"claim nothing: use a secret key (sb_secret_..., {where}) or the legacy service_role key")
    if is_api_key(key):
        return f"{name} holds an unknown sb_ key: use a secret key (sb_secret_..., {where})"
    role = jwt_role(key)
    if role is None:
        return (f"{name} is neither a secret key (sb_secret_...) nor a legacy service_role JWT: "
                f"copy the secret key from {where}")
    if role != "service_role":
        return (f"{name} holds a JWT of role {role!r}, not service_role: use a secret key "
                f"(sb_secret_..., {where}) or the legacy service_role key")
    return None
