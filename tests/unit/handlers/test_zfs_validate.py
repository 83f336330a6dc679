"""Every value that reaches a command line is checked first, and a bad one names its column."""

from __future__ import annotations

import pytest

from handlers.backends.zfs.validate import check_dataset, check_host, parse_host_key, validate_request
from handlers.errors import PermanentError
from handlers.replication import ReplicationRequest
from handlers.types import SSHEndpoint

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1cm4gYWZ0ZXIgcmVhZGluZyB0aGlzIHBsZWFzZQ=="
TARGET = SSHEndpoint("dr.example.net", 22, "root", "dr-key", f"[dr.example.net]:22 {KEY}")


def request(**changes: object) -> ReplicationRequest:
    values: dict[str, object] = dict(
        job_id="5b0c7f0e-3c1d-4e55-9a37-111111111111", source_dataset="tank/vmstore",
        target_dataset="drpool/replicas/vmstore", transport="ssh", target=TARGET, source=None,
        retention_snapshots=5, last_snapshot=None,
    )
    values.update(changes)
    return ReplicationRequest(**values)  # type: ignore[arg-type]


def test_a_good_request_passes() -> None:
    validate_request(request())
    validate_request(request(source=SSHEndpoint("10.0.0.5", 2222, "zfs-sender", "src-key", KEY)))


@pytest.mark.parametrize("bad", [
    "-o mountpoint=/ tank", "tank/vm;reboot", "tank/$(id)", "tank/a b", "tank/`x`", "tank/vm\n", "tank//vm",
    "tank/../etc", "tank/vm@snap", "tank/vm|cat", "", "tank/vm&", "/tank", "tank/", "a" * 300,
])
def test_bad_datasets_name_their_column(bad: str) -> None:
    with pytest.raises(PermanentError, match="protection_groups.source_dataset"):
        validate_request(request(source_dataset=bad))
    with pytest.raises(PermanentError, match="replication_jobs.target_dataset"):
        validate_request(request(target_dataset=bad))


@pytest.mark.parametrize("good", ["tank", "tank/vm-01", "tank/vm_01.disk:a", "Pool1/A/b"])
def test_good_datasets(good: str) -> None:
    assert check_dataset(good, "x") == good


@pytest.mark.parametrize("bad", ["-oProxyCommand=x", "host;x", "a b", "", "host$", "-1.2.3.4", "x..y"])
def test_bad_hosts(bad: str) -> None:
    with pytest.raises(PermanentError, match="replication_targets.ssh_host"):
        validate_request(request(target=SSHEndpoint(bad, 22, "root", "k", KEY)))


@pytest.mark.parametrize("good", ["127.0.0.1", "::1", "fe80::1", "dr-01.example.net", "localhost"])
def test_good_hosts(good: str) -> None:
    assert check_host(good, "x") == good


def test_source_fields_are_named_as_group_columns() -> None:
    with pytest.raises(PermanentError, match="protection_groups.source_ssh_user"):
        validate_request(request(source=SSHEndpoint("src", 22, "-l root", "k", KEY)))
    with pytest.raises(PermanentError, match="protection_groups.source_ssh_port"):
        validate_request(request(source=SSHEndpoint("src", 70000, "root", "k", KEY)))
    with pytest.raises(PermanentError, match="protection_groups.source_ssh_host_key"):
        validate_request(request(source=SSHEndpoint("src", 22, "root", "k", None)))
    with pytest.raises(PermanentError, match="protection_groups.source_ssh_key_secret"):
        validate_request(request(source=SSHEndpoint("src", 22, "root", None, KEY)))


def test_other_fields() -> None:
    with pytest.raises(PermanentError, match="replication_targets.transport"):
        validate_request(request(transport="rsync"))
    with pytest.raises(PermanentError, match="retention_snapshots"):
        validate_request(request(retention_snapshots=0))
    with pytest.raises(PermanentError, match="replication_jobs.id"):
        validate_request(request(job_id="x; rm"))


def test_host_key_forms() -> None:
    assert parse_host_key(KEY, "f").key_type == "ssh-ed25519"
    assert parse_host_key(f"[h]:2222 {KEY} comment", "f").key_type == "ssh-ed25519"
    for bad in (f"@cert-authority * {KEY}", "ssh-ed25519 not-base64!", f"{KEY}\n{KEY}", "hello"):
        with pytest.raises(PermanentError, match="f"):
            parse_host_key(bad, "f")
