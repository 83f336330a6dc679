from __future__ import annotations

from pathlib import Path

import pytest

from handlers.secrets import SecretResolver


@pytest.mark.parametrize(("written", "value"), [
    (b"hunter2\n", "hunter2"),  # echo hunter2 > file
    (b"hunter2\r\n", "hunter2"),  # written on Windows
    (b"hunter2", "hunter2"),  # printf, or an editor that adds nothing
    (b"hunter2\n\n", "hunter2\n"),  # only one line ending is not part of the secret
    (b" two words \n", " two words "),  # spaces are the password's own
    (b"a\r\nb\n", "a\r\nb"),  # inner line endings are kept as written
    (b"-----BEGIN KEY-----\nabc\n-----END KEY-----\n", "-----BEGIN KEY-----\nabc\n-----END KEY-----"),
])
def test_a_secret_file_loses_one_final_newline_and_nothing_else(tmp_path: Path, written: bytes, value: str) -> None:
    (tmp_path / "db-password").write_bytes(written)
    assert SecretResolver({}, str(tmp_path)).resolve("db-password", "password_secret") == value


def test_the_environment_wins_over_a_file(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("from-file\n")
    resolver = SecretResolver({"ZERFAUX_SECRET_DB_PASSWORD": "from-env"}, str(tmp_path))
    assert resolver.resolve("db-password", "password_secret") == "from-env"
