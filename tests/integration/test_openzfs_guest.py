"""The OpenZFS guest does what docs/openzfs-guest.md and FACTS say: estimate, resume, hold, -u."""

from __future__ import annotations

import secrets
import shlex

import pytest

from tests.support.openzfs import OpenZFSHost

pytestmark = pytest.mark.openzfs

DATA_MB = 16


def make_snapshot(host: OpenZFSHost, mb: int = DATA_MB) -> str:
    """A new dataset under the host's pool holding `mb` MiB of random data, snapshotted."""
    dataset = f"{host.pool}/t{secrets.token_hex(3)}"
    script = (f"zfs create {dataset} && head -c {mb}M /dev/urandom > /{dataset}/data"
              f" && zfs snapshot {dataset}@s1")
    host.run(["sh", "-c", script])
    return f"{dataset}@s1"


def zfs_get(host: OpenZFSHost, prop: str, dataset: str) -> str:
    return host.run(["zfs", "get", "-Hp", "-o", "value", prop, dataset]).stdout.decode().strip()


def test_run_quotes_argv_and_passes_input(openzfs_source: OpenZFSHost) -> None:
    assert openzfs_source.run(["echo", "a b; c", "$HOME"]).stdout == b"a b; c $HOME\n"
    assert openzfs_source.run(["cat"], input=b"piped").stdout == b"piped"
    assert openzfs_source.run(["false"], check=False).returncode == 1


def test_hosts_have_the_shape_the_suite_expects(
    openzfs_source: OpenZFSHost, openzfs_target: OpenZFSHost
) -> None:
    for host in (openzfs_source, openzfs_target):
        assert host.name == "openzfs" and not host.local
        assert host.features == {"resume", "hold", "estimate"}
        assert host.host_key.startswith(f"[127.0.0.1]:{host.ssh_port} ssh-ed25519 ")
        assert "PRIVATE KEY" in host.private_key
    assert openzfs_source.pool != openzfs_target.pool
    pools = openzfs_source.run(["zpool", "list", "-H", "-o", "name"]).stdout.decode().split()
    assert {openzfs_source.pool, openzfs_target.pool} <= set(pools)


def test_send_estimate_is_close_to_the_stream(openzfs_source: OpenZFSHost) -> None:
    snap = make_snapshot(openzfs_source)
    parsable = openzfs_source.run(["zfs", "send", "-nP", snap]).stdout.decode()
    estimate = int(next(line.split()[1] for line in parsable.splitlines() if line.startswith("size")))
    # Never `zfs send > /dev/null`: OpenZFS 2.1 refuses to write to /dev/null on these kernels.
    counted = openzfs_source.run(["sh", "-c", f"zfs send {shlex.quote(snap)} | wc -c"])
    actual = int(counted.stdout.decode())
    assert actual > DATA_MB << 20
    assert abs(estimate - actual) <= actual * 0.10


def test_cut_short_receive_resumes_from_token(
    openzfs_source: OpenZFSHost, openzfs_target: OpenZFSHost
) -> None:
    snap = make_snapshot(openzfs_source)
    target = f"{openzfs_target.pool}/{snap.split('/')[-1].split('@')[0]}"
    half = (DATA_MB << 20) // 2
    cut = openzfs_source.run(
        ["sh", "-c", f"zfs send {snap} | head -c {half} | zfs receive -s -u {target}"], check=False
    )
    assert cut.returncode != 0
    token = zfs_get(openzfs_target, "receive_resume_token", target)
    assert token not in ("", "-")

    openzfs_source.run(["sh", "-c", f"zfs send -t {token} | zfs receive -s -u {target}"])

    assert zfs_get(openzfs_target, "receive_resume_token", target) == "-"
    assert zfs_get(openzfs_target, "guid", f"{target}@s1") == zfs_get(openzfs_source, "guid", snap)


def test_received_dataset_stays_unmounted(
    openzfs_source: OpenZFSHost, openzfs_target: OpenZFSHost
) -> None:
    snap = make_snapshot(openzfs_source, mb=2)
    target = f"{openzfs_target.pool}/{snap.split('/')[-1].split('@')[0]}"
    stream = openzfs_source.run(["zfs", "send", snap]).stdout  # through the host, as a replicator would
    openzfs_target.run(["zfs", "receive", "-s", "-u", target], input=stream)
    assert zfs_get(openzfs_target, "mounted", target) == "no"
    assert zfs_get(openzfs_source, "mounted", snap.split("@")[0]) == "yes"


def test_hold_makes_destroy_fail_until_released(openzfs_source: OpenZFSHost) -> None:
    snap = make_snapshot(openzfs_source, mb=1)
    openzfs_source.run(["zfs", "hold", "zerfaux_test", snap])
    busy = openzfs_source.run(["zfs", "destroy", snap], check=False)
    assert busy.returncode != 0
    assert b"dataset is busy" in busy.stderr
    holds = openzfs_source.run(["zfs", "holds", "-H", snap]).stdout.decode()
    assert "zerfaux_test" in holds

    openzfs_source.run(["zfs", "release", "zerfaux_test", snap])
    openzfs_source.run(["zfs", "destroy", snap])
