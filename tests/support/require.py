"""A test whose service is missing skips on a laptop and FAILS under CI (ZERFAUX_REQUIRE_REAL=1)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def require_real() -> bool:
    return os.environ.get("ZERFAUX_REQUIRE_REAL") == "1"


def missing(service: str, why: str) -> NoReturn:
    message = f"{service} is not available: {why}"
    if require_real():
        pytest.fail(message + " (ZERFAUX_REQUIRE_REAL=1: a missing service fails the run)")
    pytest.skip(message)
