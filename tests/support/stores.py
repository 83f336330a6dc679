"""Run engine tests against every store: direct Postgres, and PostgREST (issue 6).

``store_env`` is extra environment for ``engine_settings``: empty for the Postgres store; for
the PostgREST store it blanks DATABASE_URL and points SUPABASE_URL at a fake Supabase project
(tests/fakes/supabase.py: PostgREST calling the real SQL functions of the test database, and
Realtime fed by its real changes), so the listener runs exactly as it would with only the
project URL and the service-role key.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.pg import Database


@pytest.fixture(params=["postgres", "postgrest"])
def store_env(request: pytest.FixtureRequest, db: Database) -> Iterator[dict[str, str]]:
    if request.param == "postgres":
        yield {}
        return
    from tests.fakes.supabase import FakeSupabase

    with FakeSupabase(db.url) as fake:
        yield {"DATABASE_URL": "", "SUPABASE_URL": fake.url, "SUPABASE_SERVICE_ROLE_KEY": fake.key}
