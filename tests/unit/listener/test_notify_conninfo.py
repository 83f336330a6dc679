from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from listener.sources.notify import with_keepalives


def test_the_listen_connection_gets_keepalives_and_a_user_timeout() -> None:
    params = conninfo_to_dict(with_keepalives("postgresql://me@db:5432/x"))
    assert params["keepalives"] == "1" and params["keepalives_idle"] == "10"
    assert params["tcp_user_timeout"] == "15000" and params["connect_timeout"] == "10"
    assert (params["host"], params["dbname"], params["user"]) == ("db", "x", "me")


def test_settings_the_connection_string_chooses_are_kept() -> None:
    params = conninfo_to_dict(with_keepalives("host=db dbname=x keepalives_idle=60 connect_timeout=3"))
    assert params["keepalives_idle"] == "60" and params["connect_timeout"] == "3"
    assert params["keepalives_count"] == "3"
