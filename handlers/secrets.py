"""Resolve a secret NAME (as stored in a row) to its value.

Order: the environment (``ZERFAUX_SECRET_<NAME>``), a file ``$ZERFAUX_SECRETS_DIR/<name>``,
then Supabase Vault through a lookup the engine injects. Values never reach logs or rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from handlers.errors import PermanentError

VaultLookup = Callable[[str], "str | None"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def env_key(name: str) -> str:
    return "ZERFAUX_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _without_final_newline(text: str) -> str:
    """``echo secret > file`` (and most editors) end the file with a newline that is not part of
    the secret; only that one line ending goes, so a key file keeps its inner lines and a
    password its spaces."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


class SecretResolver:
    def __init__(
        self,
        environ: Mapping[str, str],
        secrets_dir: str | None = None,
        vault: VaultLookup | None = None,
    ) -> None:
        self._environ = environ
        self._dir = Path(secrets_dir) if secrets_dir else None
        self._vault = vault

    def resolve(self, name: str | None, field: str) -> str:
        """The value of secret ``name``; ``field`` names the column that held it, for errors."""
        if not name:
            raise PermanentError(f"{field} is empty: set it to the name of a secret")
        if not _NAME.match(name):
            raise PermanentError(
                f"{field} {name!r} is not a valid secret name: use letters, digits, '_', '-', '.'"
            )
        value = self._environ.get(env_key(name))
        if value:
            return value
        if self._dir is not None:
            path = self._dir / name
            if path.is_file():
                # newline="": the value as written, no line-ending translation inside it.
                with path.open(encoding="utf-8", newline="") as fh:
                    return _without_final_newline(fh.read())
        if self._vault is not None:
            found = self._vault(name)
            if found:
                return found
        where = f"{env_key(name)} in the environment"
        if self._dir is not None:
            where += f", a file {self._dir / name}"
        if self._vault is not None:
            where += ", or a Vault secret of that name"
        raise PermanentError(f"secret {name!r} (from {field}) was not found: set {where}")
