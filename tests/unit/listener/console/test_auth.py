"""Token checks without a server: which tokens sign in, and what the refusal says."""

from __future__ import annotations

import time

import jwt
import pytest

from listener.console.auth import NotSignedIn, Verifier

SECRET = "unit-secret-" + "z" * 30
USER = "6f1c2b7e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"


def token(**claims: object) -> str:
    now = int(time.time())
    body = {"sub": USER, "aud": "authenticated", "role": "authenticated", "exp": now + 60, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


async def test_a_users_token_signs_in() -> None:
    who = await Verifier(SECRET, None).verify(token(), via_cookie=True)
    assert who.user_id == USER and who.claims["role"] == "authenticated"


# Times relative to the moment the test runs, not to collection: the whole suite is collected
# first, and this file may run half an hour later.
@pytest.mark.parametrize(("claims", "words"), [
    ({"exp": -300}, "expired"),
    ({"nbf": +300}, "not valid yet"),
    ({"aud": "other"}, "audience"),
    ({"role": "service_role"}, "role"),
    ({"sub": "not-a-uuid"}, "subject"),
])
async def test_tokens_that_do_not_sign_in(claims: dict[str, object], words: str) -> None:
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v for k, v in claims.items()}
    with pytest.raises(NotSignedIn, match=words):
        await Verifier(SECRET, None).verify(token(**claims), via_cookie=True)


async def test_another_key_is_a_forgery_and_an_unconfigured_algorithm_is_named() -> None:
    forged = jwt.encode({"sub": USER, "aud": "authenticated", "role": "authenticated",
                         "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    with pytest.raises(NotSignedIn, match="signature"):
        await Verifier(SECRET, None).verify(forged, via_cookie=True)
    with pytest.raises(NotSignedIn, match="HS256"):
        await Verifier(None, "http://127.0.0.1:9/jwks.json").verify(token(), via_cookie=True)


async def test_the_csrf_token_is_bound_to_the_session() -> None:
    v = Verifier(SECRET, None)
    a, b = await v.verify(token(), via_cookie=True), await v.verify(token(email="x"), via_cookie=True)
    assert v.csrf_ok(a, v.csrf_token(a)) and not v.csrf_ok(a, v.csrf_token(b)) and not v.csrf_ok(a, None)
    bearer = await v.verify(token(), via_cookie=False)
    assert v.csrf_ok(bearer, None)
