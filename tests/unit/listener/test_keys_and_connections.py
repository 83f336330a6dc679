"""Start-up refuses a key that cannot serve the listener and a URL on the transaction pooler."""

from __future__ import annotations

import base64
import json

import pytest

from listener.apikeys import is_api_key, jwt_role
from listener.config import ConfigError, Settings


def unsigned_jwt(role: str) -> str:
    def part(obj: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'iss': 'supabase', 'role': role})}.c2ln"


URL = "https://abc.supabase.co"


@pytest.mark.parametrize("name", ["SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY"])
@pytest.mark.parametrize("key", ["sb_secret_abc123", unsigned_jwt("service_role")])
def test_either_variable_takes_a_secret_key_or_a_service_role_jwt(name: str, key: str) -> None:
    assert Settings.from_environ({"SUPABASE_URL": URL, name: key}).supabase_key == key


def test_a_publishable_key_is_refused_saying_to_use_the_secret_key() -> None:
    with pytest.raises(ConfigError, match=r"SUPABASE_SERVICE_ROLE_KEY holds a publishable key.*sb_secret_"):
        Settings.from_environ({"SUPABASE_URL": URL, "SUPABASE_SERVICE_ROLE_KEY": "sb_publishable_xyz"})


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_a_jwt_of_another_role_is_refused(role: str) -> None:
    with pytest.raises(ConfigError, match=f"SUPABASE_SECRET_KEY holds a JWT of role '{role}', not service_role"):
        Settings.from_environ({"SUPABASE_URL": URL, "SUPABASE_SECRET_KEY": unsigned_jwt(role)})


def test_a_key_of_no_known_form_is_refused() -> None:
    with pytest.raises(ConfigError, match="neither a secret key"):
        Settings.from_environ({"SUPABASE_URL": URL, "SUPABASE_SECRET_KEY": "hunter2"})


def test_two_different_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="both set and differ"):
        Settings.from_environ({"SUPABASE_URL": URL, "SUPABASE_SECRET_KEY": "sb_secret_a",
                               "SUPABASE_SERVICE_ROLE_KEY": unsigned_jwt("service_role")})


def test_key_forms() -> None:
    assert is_api_key("sb_secret_x") and not is_api_key(unsigned_jwt("service_role"))
    assert jwt_role(unsigned_jwt("anon")) == "anon" and jwt_role("sb_secret_x") is None and jwt_role("a.b.c") is None


@pytest.mark.parametrize("url", [
    "postgresql://postgres.ref:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
    "postgres://postgres.ref:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres?sslmode=require",
    "host=aws-0-eu-central-1.pooler.supabase.com port=6543 dbname=postgres user=postgres.ref",
    "postgresql:///postgres?host=pooler.example&port=6543",
])
def test_the_transaction_pooler_is_refused_naming_the_urls_to_use(url: str) -> None:
    with pytest.raises(ConfigError, match=r"transaction pooler \(port 6543\).*session pooler.*:5432.*direct connection"):
        Settings.from_environ({"DATABASE_URL": url})


def test_pgbouncer_true_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pgbouncer=true.*remove it.*port 5432"):
        Settings.from_environ({"DATABASE_URL": "postgresql://u:p@aws-0-x.pooler.supabase.com:5432/postgres?pgbouncer=true"})


@pytest.mark.parametrize("url", [
    "postgresql://postgres.ref:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",  # session pooler
    "postgresql://postgres:pw@db.ref.supabase.co:5432/postgres",  # direct
    "postgresql://postgres:6543@db.ref.supabase.co/postgres",  # 6543 as a password is not a port
])
def test_the_session_pooler_and_the_direct_connection_are_accepted(url: str) -> None:
    assert Settings.from_environ({"DATABASE_URL": url}).database_url == url


def test_realtime_wakeups_setting() -> None:
    assert Settings.from_environ({}).realtime_wakeups == "auto"
    assert Settings.from_environ({"ZERFAUX_REALTIME_WAKEUPS": "Changes"}).realtime_wakeups == "changes"
    with pytest.raises(ConfigError, match="ZERFAUX_REALTIME_WAKEUPS must be auto, broadcast or changes"):
        Settings.from_environ({"ZERFAUX_REALTIME_WAKEUPS": "both"})
