"""Supabase-style user JWTs for tests, made here from the RFC 7519 / 7515 rules (HS256), not with the
console's own library: a token the console accepts is one Supabase Auth would have issued.

    token = user_jwt(SECRET, user_id)                       # valid for an hour
    user_jwt(SECRET, user_id, expires_in=-600)              # expired ten minutes ago
    user_jwt("another project's secret", user_id)           # forged
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(claims: dict[str, Any], secret: str, alg: str = "HS256") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    if alg == "none":
        return f"{header}.{body}."
    mac = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(mac)}"


def user_jwt(secret: str, user_id: str, *, expires_in: int = 3600, email: str | None = None,
             role: str = "authenticated", alg: str = "HS256", **extra: Any) -> str:
    """What Supabase Auth issues for a signed-in user (aud and role 'authenticated')."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "http://127.0.0.1/auth/v1", "sub": user_id, "aud": "authenticated", "role": role,
        "email": email or f"{user_id[:8]}@example.test", "iat": min(now, now + expires_in) - 60,
        "exp": now + expires_in,
        "aal": "aal1", "session_id": "00000000-0000-4000-9000-000000000000", **extra,
    }
    return sign(claims, secret, alg)
