from __future__ import annotations

from pathlib import Path

from listener import sqlfile
from listener.store_pg import QUERIES


def test_named_queries_are_split_and_comments_dropped(tmp_path: Path) -> None:
    path = tmp_path / "q.sql"
    path.write_text("-- header\n\n-- name: one\n-- why\nselect 1;\n\n-- name: two\nselect 2\n from x;\n")
    assert sqlfile.load(path) == {"one": "select 1", "two": "select 2\n from x"}


def test_the_store_knows_every_engine_call() -> None:
    assert {"claim", "heartbeat", "progress", "complete_many", "fail", "finish_cancelled",
            "release", "prune", "queue_state"} <= set(QUERIES)
