"""Strict checks on every value that reaches a command line, before any command runs.

Values come from rows anybody with table access can edit, so a dataset named ``-o x`` or
``pool/a;rm -rf /`` must never reach ``zfs`` or a remote shell. Commands are argument lists
and remote ones are quoted with shlex, but we still refuse anything outside these patterns:
quoting is the second line of defence, not the first. A bad value is a ``PermanentError``
naming the column so the operator knows which row to fix.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass

from handlers.backends.zfs.grid import EXAMPLE as GRID_EXAMPLE
from handlers.backends.zfs.grid import grid_error
from handlers.errors import PermanentError
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint

# ZFS allows more (spaces, '%' in some versions); we accept the portable subset only.
_COMPONENT = r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*"
DATASET = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.:\-]*(?:/{_COMPONENT})*$")
SNAPSHOT = re.compile(rf"^{_COMPONENT}$")
HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?)*$")
USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,31}$")
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]{0,63}$")
CIPHER = re.compile(r"^[a-z0-9][a-z0-9@.\-]{0,63}$")
KEY_TYPE = re.compile(r"^(?:ssh-[a-z0-9\-]+|ecdsa-sha2-nistp(?:256|384|521)|sk-[a-z0-9\-@.]+)$")
TRANSPORTS = ("ssh", "paramiko", "syncoid")
WIRE_COMPRESSION = ("auto", "zstd", "lz4", "off")
MAX_NAME = 255


def check_dataset(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise PermanentError(f"{field} is empty: set it to a ZFS dataset such as tank/vmstore")
    if len(value) > MAX_NAME or not DATASET.fullmatch(value) or any(p in (".", "..") for p in value.split("/")):
        raise PermanentError(
            f"{field} {value!r} is not an acceptable ZFS dataset name: use pool/child with letters, "
            "digits and '_', '-', '.', ':' only (no leading '-', no spaces, no shell characters)"
        )
    return value


def check_snapshot(value: str, field: str) -> str:
    if len(value) > MAX_NAME or not SNAPSHOT.fullmatch(value):
        raise PermanentError(f"{field} {value!r} is not an acceptable snapshot name")
    return value


def check_host(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise PermanentError(f"{field} is empty: set it to a host name or IP address")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if len(value) > 253 or not HOSTNAME.fullmatch(value):
        raise PermanentError(
            f"{field} {value!r} is not a host name or IP address (letters, digits, '-' and '.' only)"
        )
    return value


def check_port(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise PermanentError(f"{field} {value!r} is not a TCP port (1-65535)")
    return value


def check_user(value: object, field: str) -> str:
    if not isinstance(value, str) or not USER.fullmatch(value):
        raise PermanentError(f"{field} {value!r} is not an acceptable user name")
    return value


def check_cipher(value: str) -> str:
    if not CIPHER.fullmatch(value):
        raise ValueError(f"SSH cipher {value!r} is not an acceptable cipher name")
    return value


@dataclass(frozen=True)
class PinnedKey:
    """The one host key we accept for a host: ``ssh_host_key`` parsed."""

    key_type: str
    blob: bytes

    @property
    def b64(self) -> str:
        return base64.b64encode(self.blob).decode()


def parse_host_key(line: object, field: str) -> PinnedKey:
    """A known_hosts line (``[host]:port type base64 [comment]``) or just ``type base64``."""
    if not isinstance(line, str) or not line.strip():
        raise PermanentError(
            f"{field} is empty: set it to the host's public key as a known_hosts line "
            "(ssh-keyscan -p PORT HOST prints it); Zerfaux never trusts a key on first use"
        )
    if "\n" in line.strip() or "\r" in line:
        raise PermanentError(f"{field} must be a single known_hosts line")
    parts = line.split()
    if parts[0].startswith("@"):
        raise PermanentError(f"{field}: markers such as {parts[0]} are not supported; give the plain key")
    if not KEY_TYPE.fullmatch(parts[0]):
        parts = parts[1:]  # the first field was the host pattern
    if len(parts) < 2 or not KEY_TYPE.fullmatch(parts[0]):
        raise PermanentError(f"{field} is not a known_hosts line: expected '[host]:port key-type base64'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PermanentError(f"{field}: the key is not valid base64") from exc
    return PinnedKey(parts[0], blob)


def check_endpoint(endpoint: SSHEndpoint, prefix: str) -> PinnedKey:
    """Check an endpoint; ``prefix`` is ``replication_targets.ssh`` or ``protection_groups.source_ssh``."""
    check_host(endpoint.host, f"{prefix}_host")
    check_port(endpoint.port, f"{prefix}_port")
    check_user(endpoint.user, f"{prefix}_user")
    if not endpoint.key_secret:
        raise PermanentError(f"{prefix}_key_secret is empty: set it to the name of the secret holding the private key")
    return parse_host_key(endpoint.host_key, f"{prefix}_host_key")


def validate_request(request: ReplicationRequest) -> None:
    """Raise ``PermanentError`` naming the first bad field; nothing has run yet when it does."""
    if not isinstance(request.job_id, str) or not JOB_ID.fullmatch(request.job_id):
        raise PermanentError(f"replication_jobs.id {request.job_id!r} is not an acceptable job id")
    check_dataset(request.source_dataset, "protection_groups.source_dataset")
    # Left empty on the job, it is made by the trigger from the target's root: name both.
    check_dataset(request.target_dataset,
                  "replication_jobs.target_dataset (replication_targets.target_root + the source's last component)")
    if request.transport not in TRANSPORTS:
        raise PermanentError(
            f"replication_targets.transport {request.transport!r} is unknown: use one of {', '.join(TRANSPORTS)}"
        )
    if request.wire_compression not in WIRE_COMPRESSION:
        raise PermanentError(
            f"replication_targets.wire_compression {request.wire_compression!r} is unknown: use one of "
            f"{', '.join(WIRE_COMPRESSION)}"
        )
    check_endpoint(request.target, "replication_targets.ssh")
    if request.source is not None:
        check_endpoint(request.source, "protection_groups.source_ssh")
    if request.retention_snapshots is not None and request.retention_snapshots < 1:
        raise PermanentError(
            f"protection_groups.retention_snapshots {request.retention_snapshots} must be at least 1 "
            "(or null to keep every snapshot)"
        )
    for column, text in (("retention_grid", request.retention_grid),
                         ("source_retention_grid", request.source_retention_grid)):
        error = grid_error(text)  # the database refuses these; a row written around it stops here
        if error is not None:
            raise PermanentError(f"protection_groups.{column}: {error} (a valid grid: {GRID_EXAMPLE})")
    if request.last_snapshot:
        check_snapshot(request.last_snapshot.rsplit("@", 1)[-1], "replication_jobs.snapshot_name")
