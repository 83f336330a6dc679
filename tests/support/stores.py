"""Run engine tests against every store: direct Postgres, and PostgREST (issue 6) when present.

``store_env`` is extra environment for ``engine_settings``: empty for the Postgres store; for
the PostgREST store it blanks DATABASE_URL and points SUPABASE_URL at a fake PostgREST that
calls the real SQL functions of the test database.
"""

from __future__ import annotations

import pytest

from tests.support.pg import Database


@pytest.fixture(params=["postgres"])
def store_env(request: pytest.FixtureRequest, db: Database) -> dict[str, str]:
    return {}
