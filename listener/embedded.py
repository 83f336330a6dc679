"""The embedded default: with neither DATABASE_URL nor SUPABASE_URL, a private Postgres under
``.zerfaux/`` (pgserver), shared by every zerfaux process started from the same directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_servers: dict[Path, Any] = {}


def embedded_url(home: Path) -> str:
    """Start (or join) the embedded server and return its connection URL."""
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); harmless here.
        warnings.simplefilter("ignore")
        import pgserver  # imported late: only the embedded default needs it

    pgdata = (home / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if pgdata not in _servers:
        log.info("starting the embedded Postgres in %s", pgdata)
        _servers[pgdata] = pgserver.get_server(str(pgdata), cleanup_mode="stop")  # type: ignore[attr-defined]
    return str(_servers[pgdata].get_uri())
