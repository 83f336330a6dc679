"""Values shared by handlers and their backends. Rows arrive as mappings; these are their typed form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]


@dataclass(frozen=True)
class VCenterEndpoint:
    id: str
    name: str
    host: str
    port: int
    username: str
    password_secret: str | None
    verify_tls: bool

    @classmethod
    def from_row(cls, row: Row) -> VCenterEndpoint:
        return cls(
            id=str(row["id"]),
            name=row["name"],
            host=row["host"],
            port=int(row.get("port") or 443),
            username=row.get("username") or "",
            password_secret=row.get("password_secret"),
            verify_tls=bool(row.get("verify_tls", True)),
        )


@dataclass(frozen=True)
class SSHEndpoint:
    host: str
    port: int
    user: str
    key_secret: str | None
    host_key: str | None

    @classmethod
    def target_from_row(cls, row: Row) -> SSHEndpoint:
        return cls(
            host=row["ssh_host"],
            port=int(row.get("ssh_port") or 22),
            user=row.get("ssh_user") or "root",
            key_secret=row.get("ssh_key_secret"),
            host_key=row.get("ssh_host_key"),
        )

    @classmethod
    def source_from_group(cls, row: Row) -> SSHEndpoint | None:
        if not row.get("source_ssh_host"):
            return None
        return cls(
            host=row["source_ssh_host"],
            port=int(row.get("source_ssh_port") or 22),
            user=row.get("source_ssh_user") or "root",
            key_secret=row.get("source_ssh_key_secret"),
            host_key=row.get("source_ssh_host_key"),
        )
