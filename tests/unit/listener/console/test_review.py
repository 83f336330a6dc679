"""Unit checks of the console review's fixes: odd numbers in a step's detail, the CSRF origin
check behind a proxy, the JWKS pause after a failed fetch, a first open racing itself."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from starlette.requests import Request

from listener.console.actions import same_origin
from listener.console.auth import NotSignedIn, Verifier
from listener.console.render import duration


@pytest.mark.parametrize("value", [None, "a while", {"x": 1}, [1], math.nan, math.inf, "", -5])
def test_duration_of_anything_odd_is_a_dash(value: Any) -> None:
    assert duration(value) == "—"


def test_duration_still_reads_numbers_and_numeric_text() -> None:
    assert (duration(49), duration(49.4), duration("80"), duration(3600), duration(90061)) == (
        "49s", "49s", "1m 20s", "1h", "1d 1h")


def _request(headers: dict[str, str], scheme: str = "http") -> Request:
    return Request({"type": "http", "method": "POST", "scheme": scheme, "path": "/", "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                    "server": ("127.0.0.1", 8080)})


@pytest.mark.parametrize("headers,ok", [
    ({"host": "dr.example"}, True),  # no Origin: the token decides
    ({"host": "dr.example", "origin": "https://dr.example"}, True),  # TLS ended by a proxy
    ({"host": "dr.example", "origin": "http://dr.example"}, True),
    ({"host": "DR.example", "origin": "https://dr.EXAMPLE"}, True),
    ({"host": "10.0.0.5:8080", "x-forwarded-host": "dr.example", "origin": "https://dr.example"}, True),
    ({"host": "dr.example", "origin": "https://evil.example"}, False),
    ({"host": "dr.example", "origin": "https://dr.example.evil.example"}, False),
    ({"host": "dr.example", "origin": "https://dr.example:444"}, False),
    ({"host": "dr.example", "origin": "null"}, False),
    ({"host": "dr.example", "origin": "file://dr.example"}, False),
    ({"host": "dr.example", "origin": ""}, False),
])
def test_same_origin_compares_hosts(headers: dict[str, str], ok: bool) -> None:
    assert same_origin(_request(headers)) is ok


def test_a_failed_jwks_fetch_pauses_lookups_instead_of_repeating_them() -> None:
    import jwt

    verifier = Verifier(None, "http://127.0.0.1:9/jwks.json")  # nothing listens on port 9
    calls: list[str] = []

    def failing(kid: str) -> Any:
        calls.append(kid)
        raise jwt.PyJWKClientConnectionError("connection refused")

    assert verifier._jwks is not None
    verifier._jwks.get_signing_key = failing  # type: ignore[method-assign]

    async def three() -> list[str]:
        out = []
        for kid in ("a", "b", "c"):
            with pytest.raises(NotSignedIn) as caught:
                await verifier._jwks_key(kid, "RS256")
            out.append(str(caught.value))
        return out

    words = asyncio.run(three())
    assert calls == ["a"] and all("JWKS" in w for w in words)
    with pytest.raises(NotSignedIn, match="names no signing key"):
        asyncio.run(verifier._jwks_key(None, "RS256"))
