from __future__ import annotations

from pathlib import Path

import pytest

from listener import cli, migrate


def test_the_sql_ships_as_package_zerfaux_sql_mapped_onto_supabase() -> None:
    root = migrate.sql_root()
    checkout = Path(__file__).resolve().parents[3] / "supabase"
    assert {f.name for f in (root / "migrations").iterdir()} == {p.name for p in (checkout / "migrations").glob("*.sql")}
    assert (root / "seed.sql").read_text() == (checkout / "seed.sql").read_text()


def test_zerfaux_migrate_fails_loudly_when_no_migrations_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "migrations").mkdir()
    monkeypatch.setattr(migrate, "sql_root", lambda: tmp_path)
    # Found missing before any connection: the database named here does not exist.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    assert cli.main(["migrate"]) == 4
    err = capsys.readouterr().err
    assert "no migrations found in" in err and "up to date" not in err
