"""Load named queries (``-- name: x`` sections) from a .sql file, once."""

from __future__ import annotations

import re
from pathlib import Path

_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def load(path: Path) -> dict[str, str]:
    text = path.read_text()
    parts = _HEADER.split(text)
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries
