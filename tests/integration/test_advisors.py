"""Supabase's database advisors as catalog assertions, on the three databases of test_rls.py
(bare, Supabase's defaults before 2026, Supabase since 2026). They query the catalog, so a
function, table or policy any migration adds is judged too.

- 0011 every function of public and zerfaux fixes its search_path;
- 0013 RLS is on for every table the API can reach (public, and zerfaux tables an API role holds
  a privilege on); 0010 no view the API reads runs with its owner's rights;
- 0024 no policy lets every signed-in user write;
- 0028/0029 no SECURITY DEFINER function is executable by anon, and by authenticated only the
  policies' helpers (test_rls.POLICY_HELPERS);
- 0001 every foreign key leads an index.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from listener import sqlfile
from tests.integration.test_rls import POLICY_HELPERS, policy_db  # noqa: F401  (the fixture, reused)
from tests.support.pg import Database

LINTS = sqlfile.load(Path(__file__).with_name("advisors.sql"))
OFFENDERS = ["function_search_path_mutable", "rls_disabled_in_api", "security_definer_view",
             "permissive_write_policy", "unindexed_foreign_keys"]


@pytest.mark.parametrize("lint", OFFENDERS)
def test_no_offender(policy_db: Database, lint: str) -> None:  # noqa: F811
    assert [r["offender"] for r in policy_db.sql(LINTS[lint])] == []


def test_security_definer_functions_reach_the_api_roles_only_as_meant(policy_db: Database) -> None:  # noqa: F811
    found = policy_db.sql(LINTS["security_definer_executable"])
    assert [f"{r['function']} to {r['role']}" for r in found
            if r["role"] == "anon" or r["name"] not in POLICY_HELPERS] == []
    assert found, "no policy helper is executable by authenticated: the policies could not run"


CANARIES = {
    "function_search_path_mutable": "create function public.advisor_canary() returns int language sql as 'select 1'",
    "rls_disabled_in_api": "create table public.advisor_canary (id int primary key)",
    "security_definer_view": "create view public.advisor_canary as select 1 as one;"
                             " grant select on public.advisor_canary to authenticated",
    "permissive_write_policy": "create policy advisor_canary on public.vcenters for insert to authenticated"
                               " with check (true)",
    "unindexed_foreign_keys": "create table zerfaux.advisor_canary (id int primary key,"
                              " group_id uuid references public.protection_groups (id))",
}


@pytest.mark.parametrize("lint", OFFENDERS)
def test_each_lint_finds_its_fault(policy_db: Database, lint: str) -> None:  # noqa: F811
    """The fault each lint is about, made and rolled back: the lint sees it."""
    with psycopg.connect(policy_db.url) as conn:
        conn.execute(CANARIES[lint])  # type: ignore[arg-type]
        offenders = [r[0] for r in conn.execute(LINTS[lint])]  # type: ignore[arg-type]
        conn.rollback()
    assert any("advisor_canary" in o for o in offenders), offenders
