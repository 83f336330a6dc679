"""Shared by the benchmarks: scratch databases on the test Postgres, percentiles, output."""

from __future__ import annotations

import os
import statistics
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg

ADMIN_URL = os.environ.get("ZERFAUX_BENCH_DATABASE_URL") or os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"


def scratch_database(prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return name, urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
