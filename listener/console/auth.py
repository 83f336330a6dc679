"""Who is asking: a Supabase user JWT, from the session cookie or ``Authorization: Bearer``.

A token is verified with the project's JWT secret (HS256) or with its JWKS (RS256, ES256),
picked by the token's own ``alg`` header among the keys configured; ``exp`` is required,
``nbf`` honoured, ``aud`` must be ``authenticated`` and the ``role`` claim too, as Supabase issues
a signed-in user's token. A service_role or anon token is refused: the console acts only as a
person, so the database's row-level security decides what that person sees and does.

The verified claims are what the console hands the database (``request.jwt.claims``), never
anything the console adds or computes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt
from starlette.requests import Request

log = logging.getLogger(__name__)

COOKIE = "zerfaux_console"
AUDIENCE = "authenticated"
LEEWAY_SECONDS = 30  # clock skew between Supabase Auth and this machine
ASYMMETRIC = ("RS256", "ES256")
# After a failed JWKS fetch, tokens that need it are refused at once for this long: anyone can
# send a token naming an unknown key, and each would otherwise wait out its own fetch.
JWKS_RETRY_SECONDS = 10.0


class NotSignedIn(Exception):
    """No usable token; the message says why, in words for the login page."""


class KeysUnavailable(NotSignedIn):
    """The token cannot be checked now (the JWKS does not answer): not the token's fault, so
    its cookie is kept and the page says to try again."""


@dataclass(frozen=True)
class Identity:
    token: str
    claims: Mapping[str, Any]
    via_cookie: bool

    @property
    def user_id(self) -> str:
        return str(self.claims["sub"])

    @property
    def email(self) -> str:
        return str(self.claims.get("email") or self.claims["sub"])

    @property
    def expires_at(self) -> float:
        return float(self.claims["exp"])


class Verifier:
    """Checks tokens against the configured keys. ``jwks_url`` is read through PyJWT's client
    (cached keys, refetched for an unknown ``kid``), in a thread: it blocks."""

    def __init__(self, secret: str | None, jwks_url: str | None) -> None:
        self._secret = secret
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5) if jwks_url else None
        # Its own thread: a JWKS that does not answer must never hold the default executor's
        # threads, which the handlers' blocking backends run on (listener/executor.py), and an
        # unsigned token is enough to ask for a fetch.
        self._jwks_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-jwks") if jwks_url else None
        self._jwks_down_until = 0.0
        # Signs the per-session CSRF token. From the JWT secret when there is one, so every
        # listener behind one address agrees; otherwise per process (a restart asks for a reload).
        seed = secret.encode() if secret else secrets.token_bytes(32)
        self._csrf_key = hmac.new(seed, b"zerfaux-console-csrf", hashlib.sha256).digest()

    @property
    def configured(self) -> bool:
        return bool(self._secret or self._jwks)

    async def verify(self, token: str, *, via_cookie: bool) -> Identity:
        token = token.strip()
        if not token:
            raise NotSignedIn("no token given")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise NotSignedIn("that is not a JWT (three base64url parts separated by dots)") from None
        alg = str(header.get("alg", ""))
        if alg == "HS256" and self._secret:
            key: Any = self._secret
        elif alg in ASYMMETRIC and self._jwks is not None:
            key = await self._jwks_key(header.get("kid"), alg)
        else:
            have = [n for n, on in (("HS256 (ZERFAUX_JWT_SECRET)", self._secret),
                                    ("RS256/ES256 (ZERFAUX_JWKS_URL)", self._jwks)) if on]
            raise NotSignedIn(f"it is signed with {alg or 'no algorithm'}; this console accepts {', '.join(have)}")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=AUDIENCE, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            raise NotSignedIn("it has expired: sign in again for a fresh token") from None
        except jwt.ImmatureSignatureError:
            raise NotSignedIn("it is not valid yet (nbf is in the future)") from None
        except jwt.InvalidAudienceError:
            raise NotSignedIn(f"its audience (aud) is not '{AUDIENCE}': use a signed-in user's token") from None
        except jwt.InvalidSignatureError:
            raise NotSignedIn("its signature does not match this project's key (forged, or another project)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise NotSignedIn(f"it has no '{exc.claim}' claim") from None
        except jwt.PyJWTError as exc:
            raise NotSignedIn(f"it is not valid: {exc}") from None
        if claims.get("role") != AUDIENCE:
            raise NotSignedIn(f"its role is {claims.get('role')!r}, not 'authenticated': the console signs in "
                              "people, never a service or anonymous key")
        try:
            uuid.UUID(str(claims["sub"]))
        except ValueError:
            raise NotSignedIn("its subject (sub) is not a user id") from None
        return Identity(token, claims, via_cookie)

    async def _jwks_key(self, kid: object, alg: str) -> Any:
        if not isinstance(kid, str) or not kid or len(kid) > 200:
            raise NotSignedIn("it names no signing key (kid) of the project's JWKS")
        if time.monotonic() < self._jwks_down_until:
            raise KeysUnavailable("the project's JWKS (ZERFAUX_JWKS_URL) could not be read a moment ago; try again shortly")
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._jwks_thread, self._lookup, kid)
        if found.algorithm_name != alg:
            raise NotSignedIn(f"it says {alg} but its key {kid!r} is for {found.algorithm_name}")
        return found.key

    def _lookup(self, kid: str) -> jwt.PyJWK:
        """On the JWKS thread, one at a time: lookups queued behind a failed fetch fail at once."""
        assert self._jwks is not None
        if time.monotonic() < self._jwks_down_until:
            raise KeysUnavailable("the project's JWKS (ZERFAUX_JWKS_URL) could not be read a moment ago; try again shortly")
        try:
            return self._jwks.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            self._jwks_down_until = time.monotonic() + JWKS_RETRY_SECONDS
            log.warning("console: the JWKS could not be fetched: %s", exc)
            raise KeysUnavailable("the project's JWKS (ZERFAUX_JWKS_URL) could not be read; try again shortly") from None
        except jwt.PyJWTError as exc:  # no such kid, or a JWKS that is not one
            raise NotSignedIn(f"its signing key is not in the project's JWKS ({exc})") from None

    async def identify(self, request: Request) -> Identity:
        """The caller's identity: the Authorization header first (scripts), then the cookie."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise NotSignedIn("the Authorization header must be 'Bearer <jwt>'")
            return await self.verify(token, via_cookie=False)
        cookie = request.cookies.get(COOKIE)
        if cookie is None:
            raise NotSignedIn("not signed in")
        return await self.verify(cookie, via_cookie=True)

    def csrf_token(self, identity: Identity) -> str:
        """Bound to the session's token: a new sign-in gets a new one, and it is worthless
        without the HttpOnly cookie it derives from."""
        return hmac.new(self._csrf_key, identity.token.encode(), hashlib.sha256).hexdigest()[:40]

    def csrf_ok(self, identity: Identity, given: str | None) -> bool:
        if not identity.via_cookie:
            return True  # a bearer header is never sent by a browser on its own
        return given is not None and hmac.compare_digest(given.encode(), self.csrf_token(identity).encode())


def seconds_left(identity: Identity) -> int:
    return max(0, int(identity.expires_at - time.time()))


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


FORM_LIMIT = 64 * 1024


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form (what the console's own forms send), at most FORM_LIMIT bytes; the
    first value of each field. Anything else is an empty form (and fails the CSRF check)."""
    if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
