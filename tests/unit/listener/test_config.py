from __future__ import annotations

import pytest

from listener.config import ConfigError, Settings, redact_url


def test_defaults_are_the_embedded_default_in_stub_mode() -> None:
    s = Settings.from_environ({})
    assert s.embedded and s.use_stubs
    assert (s.concurrency, s.lease_seconds, s.sweep_seconds, s.retention_days) == (8, 30.0, 5.0, 30.0)
    assert s.http_port is None and s.webhook_secret is None


def test_database_url_turns_off_the_embedded_default() -> None:
    s = Settings.from_environ({"DATABASE_URL": "postgresql://db/x", "ZERFAUX_USE_STUBS": "false"})
    assert not s.embedded and not s.use_stubs


@pytest.mark.parametrize(("key", "value", "message"), [
    ("ZERFAUX_CONCURRENCY", "0", "ZERFAUX_CONCURRENCY must be at least 1"),
    ("ZERFAUX_CONCURRENCY", "2.5", "ZERFAUX_CONCURRENCY must be a whole number"),
    ("ZERFAUX_LEASE_SECONDS", "soon", "ZERFAUX_LEASE_SECONDS must be a number"),
    ("ZERFAUX_USE_STUBS", "maybe", "ZERFAUX_USE_STUBS must be true or false"),
])
def test_bad_values_name_the_variable(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_environ({key: value})


def test_supabase_url_without_the_key_says_which_key() -> None:
    with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY"):
        Settings.from_environ({"SUPABASE_URL": "https://x.supabase.co"})


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert redact_url("postgresql://db/x") == "postgresql://db/x"


@pytest.mark.parametrize(("conninfo", "shown"), [
    ("host=h password=p dbname=x", "host=h password=*** dbname=x"),
    ("host=h password = p dbname=x", "host=h password = *** dbname=x"),
    ("host=h password='a b c' user=me", "host=h password=*** user=me"),
    (r"password='it\'s a secret' host=h", "password=*** host=h"),
    ("sslpassword=k host=h", "sslpassword=*** host=h"),
    ("PASSWORD=p host=h", "PASSWORD=*** host=h"),
    ("host=h user=password", "host=h user=password"),  # a value, not the keyword
])
def test_redact_url_hides_passwords_in_libpq_keyword_strings(conninfo: str, shown: str) -> None:
    assert redact_url(conninfo) == shown


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://db/x?password=s3cret", "postgresql://db/x?password=***"),
    ("postgresql://me@db/x?sslmode=require&password=s3cret&application_name=z",
     "postgresql://me@db/x?sslmode=require&password=***&application_name=z"),
    ("postgresql://me:a@db/x?password=b", "postgresql://me:***@db/x?password=***"),
    ("postgres://db/x?sslpassword=k", "postgres://db/x?sslpassword=***"),
    ("postgresql://db/x?application_name=password", "postgresql://db/x?application_name=password"),
])
def test_redact_url_hides_password_query_parameters(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_console_keys_are_checked_at_start() -> None:
    from listener.config import ConfigError, Settings

    good = Settings.from_environ({"ZERFAUX_JWT_SECRET": "s" * 32,
                                  "ZERFAUX_JWKS_URL": "https://ref.supabase.co/auth/v1/.well-known/jwks.json"})
    assert good.jwt_secret == "s" * 32 and good.jwks_url and good.jwks_url.endswith("jwks.json")
    with pytest.raises(ConfigError, match="ZERFAUX_JWT_SECRET must be at least 32"):
        Settings.from_environ({"ZERFAUX_JWT_SECRET": "short"})
    with pytest.raises(ConfigError, match="ZERFAUX_JWKS_URL must be an http"):
        Settings.from_environ({"ZERFAUX_JWKS_URL": "ftp://x"})
