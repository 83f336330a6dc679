"""``request_for``: which host and dataset send, which receive, and which retention applies (no I/O)."""

from __future__ import annotations

import pytest

from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.points import listing
from handlers.errors import PermanentError
from handlers.replication import build_request, request_for
from handlers.types import SSHEndpoint

TARGET = {"id": "t1", "name": "dr", "ssh_host": "dr.example", "ssh_port": 2222, "ssh_user": "zdr",
          "ssh_key_secret": "dr-key", "ssh_host_key": "dr.example ssh-ed25519 AAAA", "target_root": "tank/dr",
          "transport": "ssh", "bandwidth_limit_mbps": 100}
GROUP = {"id": "g1", "name": "erp", "source_dataset": "prod/erp", "replica_name": "erp-1234abcd",
         "source_ssh_host": "prod.example", "source_ssh_port": 22, "source_ssh_user": "zp",
         "source_ssh_key_secret": "prod-key", "source_ssh_host_key": "prod.example ssh-ed25519 BBBB",
         "retention_snapshots": 5, "retention_grid": "24x1h", "source_retention_grid": "2x1h"}
PRIMARY = SSHEndpoint("prod.example", 22, "zp", "prod-key", "prod.example ssh-ed25519 BBBB")
DR = SSHEndpoint("dr.example", 2222, "zdr", "dr-key", "dr.example ssh-ed25519 AAAA")


def test_forward_is_todays_request() -> None:
    job = {"id": "j1", "source_dataset": "prod/erp", "target_dataset": "tank/dr/erp-1234abcd"}
    built = build_request({"job": job, "group": GROUP, "target": TARGET, "last_snapshot": "zerfaux_x"})
    direct = request_for(GROUP, TARGET, job_id="j1", direction="forward", job=job, last_snapshot="zerfaux_x")
    assert built == direct
    assert (built.source, built.source_dataset, built.target, built.target_dataset) == (
        PRIMARY, "prod/erp", DR, "tank/dr/erp-1234abcd")
    assert (built.source_retention_grid, built.retention_grid, built.retention_snapshots) == ("2x1h", "24x1h", 5)
    assert built.direction == "forward" and built.bandwidth_limit_mbps == 100 and built.target_id == "t1"


def test_reverse_sends_the_replica_back_to_the_primary_and_swaps_retention() -> None:
    job = {"id": "j2", "source_dataset": "prod/erp", "target_dataset": "tank/dr/erp-1234abcd"}
    req = build_request({"job": job, "group": {**GROUP, "direction": "reverse"}, "target": TARGET})
    assert (req.source, req.source_dataset, req.target, req.target_dataset) == (
        DR, "tank/dr/erp-1234abcd", PRIMARY, "prod/erp")
    # The DR side keeps its grid while it sends; the primary keeps its own while it receives.
    assert (req.source_retention_grid, req.retention_grid) == ("24x1h", "2x1h")
    assert req.direction == "reverse" and req.target_id == "t1" and req.transport == "ssh"


def test_without_a_job_the_replica_is_named_as_the_trigger_names_it() -> None:
    req = request_for(GROUP, TARGET, job_id="j3", direction="reverse")
    assert req.source_dataset == "tank/dr/erp-1234abcd" and req.target_dataset == "prod/erp"
    no_name = {k: v for k, v in GROUP.items() if k != "replica_name"}
    assert request_for(no_name, TARGET, job_id="j3", direction="forward").target_dataset == "tank/dr/erp"


def test_keep_all_prunes_nothing_either_way() -> None:
    for direction in ("forward", "reverse"):
        req = request_for(GROUP, TARGET, job_id="j4", direction=direction, keep_all=True)
        assert (req.retention_snapshots, req.retention_grid, req.source_retention_grid) == (None, None, None)


def test_a_reverse_job_needs_the_source_over_ssh() -> None:
    local = {**GROUP, "source_ssh_host": None, "direction": "reverse"}
    with pytest.raises(PermanentError, match="protection_groups.source_ssh_host"):
        build_request({"job": {"id": "j5"}, "group": local, "target": TARGET})
    assert build_request({"job": {"id": "j5"}, "group": {**local, "direction": "forward"},
                          "target": TARGET}).source is None


def test_bad_direction_and_missing_datasets_name_the_column() -> None:
    with pytest.raises(PermanentError, match="protection_groups.direction"):
        request_for(GROUP, TARGET, job_id="j6", direction="sideways")
    with pytest.raises(PermanentError, match="protection_groups.source_dataset"):
        request_for({**GROUP, "source_dataset": None}, TARGET, job_id="j6", direction="reverse")
    with pytest.raises(PermanentError, match="replication_targets.target_root"):
        request_for(GROUP, {**TARGET, "target_root": None}, job_id="j6", direction="reverse")


def test_a_reverse_listing_counts_the_replicas_received_snapshots() -> None:
    # On the DR replica (the reverse source) the snapshots received from the primary carry no
    # zerfaux:target; a reverse job's listing must still see them as ours there.
    old = Snap("zerfaux_000000000001_20270101T000000Z", 11, txg=5, creation=1_800_000_000)
    new = Snap("zerfaux_000000000002_20270101T010000Z", 12, txg=6, target="prod:22/prod/erp",
               creation=1_800_003_600)
    points = listing([old, new], [new], "prod:22/prod/erp", new, 10, any_tag=True)
    assert [(p.snapshot_name, p.on_source, p.on_target) for p in points] == [
        (old.name, True, False), (new.name, True, True)]
    assert [p.snapshot_name for p in listing([old, new], [new], "prod:22/prod/erp", new, 10)] == [new.name]
