"""A fake project's API keys and the gateway's rules for them (FACTS.md, Supabase in 2026).

Four keys, as a hosted project has them: the legacy ``anon`` and ``service_role`` JWTs (HS256,
signed with the project's JWT secret) and the new ``sb_publishable_…`` and ``sb_secret_…``
keys. The rules both fakes apply:

- ``apikey`` (header, or the socket's ``?apikey=``) must be one of the four, else 401;
- an ``sb_secret_…`` key is refused for a browser (a ``User-Agent`` starting ``Mozilla/``);
- for an ``sb_`` key the gateway mints a short-lived JWT of the key's role (secret:
  ``service_role``, publishable: ``anon``) and the request runs as that role;
- ``Authorization: Bearer <jwt>`` names the role when the JWT verifies, else 401;
- ``Authorization: Bearer sb_…`` is refused here. Supabase's docs say the new keys are not JWTs
  and belong in ``apikey`` only; the real gateway tolerates one equal to ``apikey`` (its own
  SDKs send it so), and this fake is stricter on purpose, to prove we never send one;
- a legacy JWT in ``apikey`` without Authorization runs as ``anon`` (PostgREST's anonymous role);
- Realtime: an ``sb_`` key sent as the join's ``access_token`` is ignored (the socket's key
  decides); a JWT ``access_token`` names the role.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(claims: dict[str, object], secret: str) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def verify_jwt(token: str, secret: str) -> dict[str, object] | None:
    """The claims of an HS256 JWT signed with ``secret`` and not expired, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    mac = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(parts[2]), mac):
            return None
        claims = json.loads(_unb64(parts[1]))
    except ValueError:
        return None
    if not isinstance(claims, dict) or float(claims.get("exp", time.time() + 1)) < time.time():
        return None
    return claims


@dataclass
class ProjectKeys:
    jwt_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    secret_key: str = field(default_factory=lambda: "sb_secret_" + secrets.token_urlsafe(24))
    publishable_key: str = field(default_factory=lambda: "sb_publishable_" + secrets.token_urlsafe(24))

    def jwt(self, role: str, **claims: object) -> str:
        now = int(time.time())
        return sign_jwt({"iss": "supabase", "role": role, "iat": now, "exp": now + 10 * 365 * 86400, **claims},
                        self.jwt_secret)

    @property
    def service_role_jwt(self) -> str:
        return self.jwt("service_role")

    @property
    def anon_jwt(self) -> str:
        return self.jwt("anon")

    def apikey_role(self, apikey: str | None, user_agent: str = "") -> str | None:
        """The role a request runs as when it carries no Authorization; None: refused (401)."""
        if apikey == self.secret_key:
            return None if user_agent.startswith("Mozilla/") else "service_role"
        if apikey == self.publishable_key:
            return "anon"
        if apikey and self.jwt_role(apikey) is not None:
            return "anon"  # a legacy key alone: PostgREST's anonymous role
        return None

    def minted(self, apikey: str) -> bool:
        """Does the gateway mint a JWT for this key (the new keys), or pass the request on?"""
        return apikey in (self.secret_key, self.publishable_key)

    def jwt_role(self, token: str) -> str | None:
        claims = verify_jwt(token, self.jwt_secret)
        role = claims.get("role") if claims else None
        return role if isinstance(role, str) else None

    def request_role(self, apikey: str | None, authorization: str | None, user_agent: str = "") -> str | None:
        """PostgREST through the gateway: the role, or None for 401."""
        base = self.apikey_role(apikey, user_agent)
        if base is None or apikey is None:
            return None
        if authorization is None:
            return "service_role" if apikey == self.secret_key else base
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.startswith("sb_"):
            return None
        return self.jwt_role(token)
