"""Planned migration, failover, commit, rollback, reprotect and failback through the real dispatcher (issue 14, Tests).

Every test builds its own world (tests/integration/failover_world.py, about 3 s): three VMs in
two boot priorities whose flat disks live in a zfs-fuse dataset reached over sshd, replicated
to the DR pool; a source and a DR vcsim; the DR shells made by the ``vm.dr_shell`` kind on the
DR datastore ``zfs-dr-01`` (NFS ``127.0.0.1:<replica mountpoint>``). A run is a row inserted as
an admin's SQL would insert it, carried out by the real listener (``zerfaux run --until-idle``
in-process), and checked where a DR team would check it: vcsim's power states and its own power
events (both simulators run on this machine's clock), the VMs' disk backings and NICs, ``zfs get
guid`` on both hosts, and the SHA-256 of the disk files on each side.

Reads of a dataset that will receive a stream are made before the snapshot the stream starts
from, never after (an access time updated on a receiving dataset would be a change the receive
refuses, and the test, not the product, would have made it).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from handlers.recovery.failover_backends import pre_failover_snapshot
from tests.integration.conftest import GROUP
from tests.integration.failover_world import (  # noqa: F401 - failover_world is a fixture
    RECOVERY, FailoverVM, FailoverWorld, digest, failover_world, write_into,
)
from tests.integration.recovery_world import serves_nfs
from tests.support.engine import spawn
from tests.support.vcsim import DR_DS

pytestmark = [pytest.mark.zfs, pytest.mark.vcsim]

MiB = 1024 * 1024
BASE = ["validate"]
A_TO_B = ["pre_failover_snapshot", "load_key"]


def hex8(run_id: str) -> str:
    return run_id.replace("-", "")[:8]


def steps(w: FailoverWorld, run_id: str) -> list[dict[str, Any]]:
    return [dict(s) for s in w.db.sql("select * from recovery_run_steps where run_id = %s order by seq", (run_id,))]


def run_row(w: FailoverWorld, run_id: str) -> dict[str, Any]:
    return dict(w.db.one("select * from recovery_runs where id = %s", (run_id,)))


def summary(w: FailoverWorld, run_id: str) -> list[tuple[Any, ...]]:
    return [(s["name"], s["status"], s["error"]) for s in steps(w, run_id)]


def drive(w: FailoverWorld, run_id: str, *sides: str, timeout: float = 180) -> dict[str, Any]:
    """The listener until idle, with Tools played at ``sides``; returns the run's row."""
    with w.harness(*sides):
        asyncio.run(w.drain(timeout=timeout))
    return run_row(w, run_id)


def vm_of(w: FailoverWorld, step: dict[str, Any]) -> FailoverVM:
    return next(v for v in w.vms if v.protected_id == str(step["protected_vm_id"]))


def report(w: FailoverWorld, run_id: str) -> str:
    proc = spawn(w.db.url, "report", "run", run_id)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def ops(w: FailoverWorld) -> int:
    return int(w.db.value("select count(*) from zerfaux.operations where kind = 'recovery.run'"))


def ordered(names: list[str], *groups: str) -> None:
    """Every step named ``groups[i]`` comes before every step named ``groups[i + 1]``."""
    for first, then in zip(groups, groups[1:]):
        a = [i for i, n in enumerate(names) if n == first]
        b = [i for i, n in enumerate(names) if n == then]
        assert a and b and max(a) < min(b), (first, then, names)


def finished(w: FailoverWorld, rows: list[dict[str, Any]], allowed: tuple[str, ...] = ("done", "skipped")) -> None:
    """Every step ended in ``allowed``; ``export`` a warning exactly when no NFS server runs on the DR host."""
    served = serves_nfs(w.target_host)
    bad = [(s["name"], s["status"], s["error"]) for s in rows
           if s["status"] not in allowed and not (s["name"] == "export" and s["status"] == "warning" and not served)]
    assert not bad, bad
    for s in rows:
        if s["name"] == "export" and s["status"] == "warning":
            assert "exportfs" in s["error"] or "NFS server" in s["error"], s


def mount_path(w: FailoverWorld, side: str, dataset: str) -> Path:
    host = w.source_host if side == "source" else w.target_host
    return Path(w.mountpoint(host, dataset))


def ensure_mounted(w: FailoverWorld, side: str, dataset: str) -> Path:
    """Mount ``dataset`` to read it (a kept or superseded dataset need not be); its path."""
    host = w.source_host if side == "source" else w.target_host
    if w.zfs_get(side, "mounted", dataset) != "yes":
        host.run(["zfs", "mount", dataset])
    return mount_path(w, side, dataset)


def readonly(w: FailoverWorld, side: str, dataset: str) -> bool:
    """Whether ``dataset`` refuses writes. Mounted, a write is tried: zfs-fuse reports a mounted
    dataset's readonly as "off temporary" even once readonly=on has made the mount refuse writes."""
    if w.zfs_get(side, "mounted", dataset) != "yes":
        return w.zfs_get(side, "readonly", dataset) == "on"
    probe = mount_path(w, side, dataset) / ".zerfaux-itest-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as exc:
        assert exc.errno == errno.EROFS, exc
        return True
    os.close(fd)
    probe.unlink()
    return False


def assert_on_dr(w: FailoverWorld, datastore: str) -> None:
    """Every DR VM powered on, its one disk the protected VM's file on ``datastore``, its NIC on the recovery network."""
    for v in w.vms:
        assert w.power(v, "dr")[0] == "poweredOn", v.name
        assert w.disk_files(v, "dr") == [f"[{datastore}] {v.name}/{v.name}.vmdk"], (v.name, w.disk_files(v, "dr"))
        assert w.nic_networks(v, "dr") == [RECOVERY[v.plan.network]], (v.name, w.nic_networks(v, "dr"))


# ---- planned migration ----------------------------------------------------------------------------


def test_planned_migration_shuts_down_in_reverse_order_before_any_dr_vm_boots_and_loses_nothing(
        failover_world: Any) -> None:
    w: FailoverWorld = failover_world()
    # The source moves on after the last point: the final delta must carry it to the DR site.
    for v in w.vms:
        write_into(w.source_dir / v.flat, os.urandom(256 * 1024), offset=64 * 1024)
    live = w.source_hashes()  # read before the run's snapshots: nothing the VMs (off in vcsim) change
    assert live != w.point_hashes[w.points[-1]]

    run_id = w.run("planned_migration")
    assert w.group()["state"] == "recovering"
    started = time.monotonic()
    run = drive(w, run_id)
    took = time.monotonic() - started
    got = steps(w, run_id)
    assert run["status"] == "completed", (run["error"], summary(w, run_id))
    finished(w, got)

    names = [s["name"] for s in got]
    assert names[0] == "validate" and names[-1] == "finish", names
    ordered(names, "validate", "replicate", "shutdown_source", "replicate_final", "pre_failover_snapshot",
            "make_writable", "present_datastore", "attach_disks", "set_networks", "power_on")
    assert names.count("shutdown_source") == names.count("attach_disks") == names.count("power_on") == 3
    # Shut down by priority, highest number first; powered on lowest first.
    down = [vm_of(w, s).plan.priority for s in got if s["name"] == "shutdown_source"]
    up = [vm_of(w, s).plan.priority for s in got if s["name"] in ("power_on", "wait_ready")]
    assert down == sorted(down, reverse=True) and up == sorted(up), (down, up)

    # No VM in two places, by both vCenters' own power events.
    src = {v.name: w.power(v, "source") for v in w.vms}
    dr = {v.name: w.power(v, "dr") for v in w.vms}
    assert all(s[0] == "poweredOff" and s[2] is not None for s in src.values()), src
    assert all(d[0] == "poweredOn" and d[1] is not None for d in dr.values()), dr
    assert max(s[2] for s in src.values()) < min(d[1] for d in dr.values()), (src, dr)  # type: ignore[type-var]
    p1, p2 = w.by_priority(1), w.by_priority(2)
    assert max(src[v.name][2] for v in p2) <= min(src[v.name][2] for v in p1), src  # type: ignore[type-var]
    assert max(dr[v.name][1] for v in p1) < min(dr[v.name][1] for v in p2), dr  # type: ignore[type-var]
    for s in got:
        if s["name"] == "power_on":
            assert s["detail"].get("source_state") == "poweredOff" and s["detail"].get("source_changed_at"), s

    # The final snapshot: same GUID on both hosts, recorded as the run's point.
    final = (run["report"] or {}).get("final_point") or {}
    snap = final.get("snapshot_name")
    assert snap and snap not in w.points, final
    assert w.guids("source")[snap] == w.guids("dr")[snap] == int(final["guid"])
    point = w.db.one("select * from recovery_points where id = %s", (run["recovery_point_id"],))
    assert (point["snapshot_name"], str(point["guid"])) == (snap, str(final["guid"]))
    assert pre_failover_snapshot(run_id) in w.guids("dr")

    # The DR VMs run on the replica, presented as the DR datastore, on disks that hash like the source's.
    (store,) = w.datastore(DR_DS)
    assert (store.info.nas.remoteHost, store.info.nas.remotePath) == (w.target_host.ssh_host, str(w.replica_dir))
    assert (w.zfs_get("dr", "mounted", w.replica), w.zfs_get("dr", "readonly", w.replica)) == ("yes", "off")
    assert w.replica_hashes() == live
    assert_on_dr(w, DR_DS)

    group = w.group()
    assert (group["state"], group["direction"]) == ("failed_over", "forward")
    assert run["data_loss_seconds"] == 0 and run["rto_seconds"] and run["rto_seconds"] > 0
    assert took < 120, took
    text = report(w, run_id)
    for needle in ("planned_migration", "shutdown_source", "replicate_final", "power_on", *(v.name for v in w.vms)):
        assert needle in text, (needle, text)

    # Failed over: a forward replication job is refused by the database.
    with pytest.raises(psycopg.Error, match="replication_jobs_group_state"):
        w.db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))


# ---- failover with the source site gone -------------------------------------------------------------


def fenced(got: list[dict[str, Any]]) -> None:
    """The source vCenter is down: every fence_source step says it could not fence, as a warning."""
    fence = [s for s in got if s["name"] == "fence_source"]
    assert len(fence) == 3, fence
    for s in fence:
        assert s["status"] == "warning" and s["detail"].get("fenced") is False and s["error"], s


def test_failover_to_the_newest_point_with_the_source_vcenter_down_then_commit(failover_world: Any) -> None:
    w: FailoverWorld = failover_world(points=2)
    newest = w.points[-1]
    write_into(w.source_dir / w.vms[0].flat, os.urandom(128 * 1024))  # never replicated: lost with the site
    w.source_sim.stop()
    guids_before = w.guids("dr")

    run_id = w.run("failover")
    run = run_row(w, run_id)
    assert str(run["recovery_point_id"]) == w.point_id(newest)  # null means the newest on the target
    run = drive(w, run_id, "dr")
    got = steps(w, run_id)
    assert run["status"] == "awaiting_commit", (run["error"], summary(w, run_id))
    assert run["completed_at"] is None and w.group()["state"] == "awaiting_commit"
    fenced(got)
    finished(w, [s for s in got if s["name"] != "fence_source"])
    names = [s["name"] for s in got]
    ordered(names, "validate", "fence_source", "pre_failover_snapshot", "make_writable", "present_datastore",
            "attach_disks", "power_on")
    assert [s["status"] for s in got if s["name"] == "clone_point"] in ([], ["skipped"])

    # Before anything wrote to the replica: its pre-failover snapshot, marked with the run.
    pre = pre_failover_snapshot(run_id)
    after = w.guids("dr")
    assert pre in after and {k: after[k] for k in guids_before} == guids_before
    assert w.zfs_get("dr", "zerfaux:recovery_run", f"{w.replica}@{pre}") == run_id
    assert w.replica_hashes() == w.point_hashes[newest]
    assert_on_dr(w, DR_DS)
    loss = float(run["data_loss_seconds"])
    created = w.db.value("select created_at from recovery_points where id = %s", (run["recovery_point_id"],))
    assert abs(loss - (run["started_at"] - created).total_seconds()) < 0.01 and loss > 0, (loss, created)

    printed = report(w, run_id)
    assert "failover" in printed and "fence_source" in printed and "awaiting_commit" in printed, printed

    commit_id = w.run("commit")
    commit = drive(w, commit_id, "dr")
    assert commit["status"] == "completed", (commit["error"], summary(w, commit_id))
    assert "commit" in report(w, commit_id)
    assert [(s["name"], s["status"]) for s in steps(w, commit_id)] == [
        ("validate", "done"), ("replace_replica", "skipped"), ("finish", "done")]
    assert str(commit["acts_on_run_id"]) == run_id and run_row(w, run_id)["status"] == "completed"
    assert w.group()["state"] == "failed_over"
    assert all(w.power(v, "dr")[0] == "poweredOn" for v in w.vms)
    assert {k: w.guids("dr")[k] for k in after} == after

    # No snapshot in common with the original site (its snapshots destroyed by hand): a reprotect
    # refuses in validate, saying how to reseed, and changes nothing on either host.
    for snap in w.guids("source"):
        w.source_host.run(["zfs", "destroy", f"{w.source}@{snap}"])
    dr_before = w.guids("dr")
    rp_id = w.run("reprotect")
    rp = drive(w, rp_id, "dr")
    assert rp["status"] == "failed" and "share no snapshot" in (rp["error"] or ""), rp["error"]
    assert "zfs send" in rp["error"], rp["error"]
    assert [s["status"] for s in steps(w, rp_id)][1:] == ["pending"] * (len(steps(w, rp_id)) - 1), summary(w, rp_id)
    assert (w.guids("source"), w.guids("dr")) == ({}, dr_before)
    assert w.group()["state"] == "failed_over"


def test_failover_to_an_older_point_runs_on_a_clone_and_keeps_every_newer_snapshot_then_commit(
        failover_world: Any) -> None:
    w: FailoverWorld = failover_world(points=3)
    older = w.points[0]
    w.source_sim.stop()
    guids_before = w.guids("dr")

    run_id = w.run("failover", recovery_point_id=w.point_id(older))
    run = drive(w, run_id, "dr")
    got = steps(w, run_id)
    assert run["status"] == "awaiting_commit", (run["error"], summary(w, run_id))
    fenced(got)
    by_name = {s["name"]: s for s in got}
    assert by_name["pre_failover_snapshot"]["status"] == "skipped"
    assert by_name.get("make_writable", {"status": "skipped"})["status"] == "skipped"
    assert by_name["clone_point"]["status"] == "done"

    clone, store = f"{w.target_root}/zerfaux-failover-{hex8(run_id)}", f"zerfaux-failover-{hex8(run_id)}"
    assert w.zfs_get("dr", "origin", clone) == f"{w.replica}@{older}"
    assert w.guids("dr") == guids_before  # nothing rolled back, destroyed or added on the replica
    assert w.point_hashes[older] != w.point_hashes[w.points[-1]]
    assert w.hashes(mount_path(w, "dr", clone)) == w.point_hashes[older]
    assert_on_dr(w, store)
    (ds,) = w.datastore(store)
    assert ds.info.nas.remotePath == str(mount_path(w, "dr", clone))

    # Commit: the clone becomes the replica; the superseded one keeps every newer snapshot.
    commit_id = w.run("commit")
    commit = drive(w, commit_id, "dr")
    assert commit["status"] == "completed", (commit["error"], summary(w, commit_id))
    assert {s["name"]: s["status"] for s in steps(w, commit_id)}["replace_replica"] == "done"
    assert w.group()["state"] == "failed_over"
    superseded = f"{w.replica}_zerfaux_superseded_{hex8(run_id)}"
    kept = {**w.guids("dr"), **w.guids("dr", superseded)}
    assert {k: kept[k] for k in guids_before} == guids_before, (kept, guids_before)
    assert w.zfs_get("dr", "origin", w.replica) in ("-", "")
    assert all(w.power(v, "dr")[0] == "poweredOn" for v in w.vms)
    assert w.hashes(mount_path(w, "dr", w.replica)) == w.point_hashes[older]


def test_rollback_discards_only_what_the_dr_vms_wrote_and_forward_replication_resumes(failover_world: Any) -> None:
    w: FailoverWorld = failover_world()
    point = w.points[-1]
    w.source_sim.stop()
    run_id = w.run("failover")
    run = drive(w, run_id, "dr")
    assert run["status"] == "awaiting_commit", (run["error"], summary(w, run_id))
    guids_failed_over = w.guids("dr")

    # What the DR VMs write while the failover waits: all of one disk (1 MiB), half of another.
    wrote = MiB + MiB // 2
    write_into(w.replica_dir / w.vms[0].flat, os.urandom(MiB))
    write_into(w.replica_dir / w.vms[1].flat, os.urandom(MiB // 2), offset=MiB // 4)
    assert w.replica_hashes() != w.point_hashes[point]

    rb_id = w.run("rollback")
    rb = drive(w, rb_id, "dr")
    got = steps(w, rb_id)
    assert rb["status"] == "completed", (rb["error"], summary(w, rb_id))
    finished(w, got)
    names = [s["name"] for s in got]
    ordered(names, "validate", "power_off", "detach_disks", "rollback_replica", "set_readonly", "finish")
    assert str(rb["acts_on_run_id"]) == run_id
    undone = run_row(w, run_id)
    assert undone["status"] == "completed" and (undone["report"] or {}).get("rolled_back_by") == rb_id

    for v in w.vms:  # DR VMs off, their disks detached, the files still there
        assert w.power(v, "dr")[0] == "poweredOff" and w.disk_files(v, "dr") == [], v.name
        assert all((w.replica_dir / f).is_file() for f in v.files)
    # The replica as it was at the point: the pre-failover snapshot (nothing beyond it) is gone.
    assert w.replica_hashes() == w.point_hashes[point]
    after = w.guids("dr")
    assert pre_failover_snapshot(run_id) not in after and max(after, key=lambda s: s) >= point
    assert {k: v for k, v in guids_failed_over.items() if k != pre_failover_snapshot(run_id)} == after
    assert readonly(w, "dr", w.replica)
    # The run says what it discarded: the DR VMs' writes, in whole blocks.
    discarded = (rb["report"] or {}).get("discarded") or {}
    assert wrote <= discarded.get("bytes", -1) < wrote + 128 * 1024, rb["report"]
    printed = report(w, rb_id)
    assert "rollback" in printed and "rollback_replica" in printed and "discarded" in printed, printed
    group = w.group()
    assert (group["state"], group["direction"]) == ("protected", "forward")

    # Replication resumes: incremental from the point, accepted by the replica.
    write_into(w.source_dir / w.vms[1].flat, os.urandom(64 * 1024))
    job = w.replicate()
    assert job["status"] == "completed", job["error"]
    assert job["base_snapshot"] == point
    assert w.guids("source")[job["snapshot_name"]] == w.guids("dr")[job["snapshot_name"]]


# ---- reprotect and failback -----------------------------------------------------------------------


def reverse_bytes(step: dict[str, Any]) -> int:
    detail = step["detail"] or {}
    for key in ("bytes_transferred", "bytes", "sent_bytes"):
        if isinstance(detail.get(key), int):
            return int(detail[key])
    raise AssertionError(f"replicate_reverse records no byte count: {detail}")


def test_reprotect_after_a_planned_migration_sends_what_the_dr_vms_wrote_and_failback_returns_home(
        failover_world: Any) -> None:
    w: FailoverWorld = failover_world(disk_bytes=8 * MiB)
    size = int(w.zfs_get("source", "referenced", w.source))
    mig_id = w.run("planned_migration")
    mig = drive(w, mig_id)
    assert mig["status"] == "completed", (mig["error"], summary(w, mig_id))

    # The DR VMs write N MiB.
    n = 3 * MiB
    dr_vm = w.vms[1]
    write_into(w.replica_dir / dr_vm.flat, os.urandom(n), offset=2 * MiB)
    dr_live = w.replica_hashes()

    rp_id = w.run("reprotect")
    rp = drive(w, rp_id)
    got = steps(w, rp_id)
    assert rp["status"] == "completed", (rp["error"], summary(w, rp_id))
    by_name = {s["name"]: s for s in got}
    assert [s["name"] for s in got] == ["validate", "check_source_changes", "keep_source_changes",
                                        "replicate_reverse", "finish"], summary(w, rp_id)
    assert by_name["keep_source_changes"]["status"] == "skipped"  # the source had nothing beyond the final snapshot
    sent = reverse_bytes(by_name["replicate_reverse"])
    assert n <= sent < n + MiB and sent < size / 4, (sent, n, size)
    group = w.group()
    assert (group["state"], group["direction"]) == ("protected", "reverse")
    assert w.source_hashes() == dr_live
    assert readonly(w, "source", w.source)  # the new direction's target
    common = set(w.guids("source")) & set(w.guids("dr"))
    assert all(w.guids("source")[s] == w.guids("dr")[s] for s in common)

    # A scheduled-style job now runs reverse, DR → original site, incrementally.
    write_into(w.replica_dir / dr_vm.flat, os.urandom(MiB), offset=0)
    job = w.replicate()
    assert job["status"] == "completed", job["error"]
    assert MiB <= (job["bytes_transferred"] or 0) < 2 * MiB, job["bytes_transferred"]
    back_home = w.point_hashes[job["snapshot_name"]]

    # Failback: a planned migration while reverse, then reprotect to forward.
    fb_id = w.run("planned_migration")
    fb = drive(w, fb_id)
    fb_steps = steps(w, fb_id)
    assert fb["status"] == "completed", (fb["error"], summary(w, fb_id))
    fb_by = {}
    for s in fb_steps:
        fb_by.setdefault(s["name"], []).append(s)
    assert {s["status"] for s in fb_by["present_datastore"]} == {"skipped"}
    assert {s["status"] for s in fb_by["attach_disks"]} == {"skipped"}
    src = {v.name: w.power(v, "source") for v in w.vms}
    dr = {v.name: w.power(v, "dr") for v in w.vms}
    assert all(d[0] == "poweredOff" for d in dr.values()) and all(s[0] == "poweredOn" for s in src.values()), (src, dr)
    assert max(d[2] for d in dr.values()) < min(s[1] for s in src.values()), (src, dr)  # type: ignore[type-var]
    for v in w.vms:  # the original VMs, on their own datastore and networks, on the DR site's data
        assert w.disk_files(v, "source") == [f"[zfs-protect-01] {v.name}/{v.name}.vmdk"]
        assert w.nic_networks(v, "source") == [v.plan.network], (v.name, w.nic_networks(v, "source"))
    final = fb["report"]["final_point"]["snapshot_name"]
    assert w.guids("source")[final] == w.guids("dr")[final]
    assert w.group()["state"] == "failed_over" and w.group()["direction"] == "reverse"
    assert w.source_hashes() == back_home

    home_id = w.run("reprotect")
    home = drive(w, home_id)
    assert home["status"] == "completed", (home["error"], summary(w, home_id))
    group = w.group()
    assert (group["state"], group["direction"]) == ("protected", "forward")
    assert all(w.power(v, "source")[0] == "poweredOn" for v in w.vms)
    # And forward replication goes on from there.
    write_into(w.source_dir / w.vms[0].flat, os.urandom(64 * 1024))
    job = w.replicate()
    assert job["status"] == "completed", job["error"]
    assert w.guids("source")[job["snapshot_name"]] == w.guids("dr")[job["snapshot_name"]]


@pytest.mark.parametrize("discard", [False, True], ids=["keep", "discard_source_changes"])
def test_reprotect_after_an_unplanned_failover_keeps_the_original_sites_changes_unless_told(
        failover_world: Any, discard: bool) -> None:
    w: FailoverWorld = failover_world()
    point = w.points[-1]
    # The original site wrote after the last replication, then went down.
    extra = os.urandom(512 * 1024)
    lost_vm = w.vms[2]
    (w.source_dir / lost_vm.name / "after-the-point.bin").write_bytes(b"\0" * len(extra))
    write_into(w.source_dir / lost_vm.name / "after-the-point.bin", extra)
    write_into(w.source_dir / lost_vm.flat, extra[:256 * 1024])
    source_then = w.source_hashes()
    w.source_sim.stop()

    fo_id = w.run("failover")
    fo = drive(w, fo_id, "dr")
    assert fo["status"] == "awaiting_commit", (fo["error"], summary(w, fo_id))
    commit_id = w.run("commit")
    assert drive(w, commit_id, "dr")["status"] == "completed", summary(w, commit_id)
    write_into(w.replica_dir / w.vms[0].flat, os.urandom(MiB))  # the DR site writes too
    dr_live = w.replica_hashes()

    rp_id = w.run("reprotect", options={"discard_source_changes": True} if discard else {})
    rp = drive(w, rp_id, "dr")
    got = {s["name"]: s for s in steps(w, rp_id)}
    assert rp["status"] == "completed", (rp["error"], summary(w, rp_id))
    assert got["check_source_changes"]["status"] == "done"
    assert got["keep_source_changes"]["status"] == "done"
    group = w.group()
    assert (group["state"], group["direction"]) == ("protected", "reverse")
    assert w.source_hashes() == dr_live  # the original site now holds the DR site's data
    text = json.dumps(rp["report"])
    kept_name = f"{w.source}_zerfaux_kept_{hex8(rp_id)}"
    datasets = w.source_host.run(["zfs", "list", "-H", "-o", "name"]).stdout.decode().split()
    if discard:
        assert kept_name not in datasets and "discard" in text, (datasets, rp["report"])
        assert not (w.source_dir / lost_vm.name / "after-the-point.bin").exists()
        return
    # Kept where the report says: the renamed dataset, its last state held; the bytes readable there.
    kept = (rp["report"] or {}).get("kept") or {}
    assert (kept.get("kept_dataset"), kept.get("kept_snapshot")) == (
        kept_name, f"{kept_name}@zerfaux_kept_{hex8(rp_id)}"), rp["report"]
    assert kept_name in datasets, datasets
    printed = report(w, rp_id)
    assert "reprotect" in printed and kept_name in printed, printed
    assert mount_path(w, "source", kept_name) != w.source_dir  # not hidden under (or over) the live dataset
    where = ensure_mounted(w, "source", kept_name)
    assert digest((where / lost_vm.name / "after-the-point.bin").read_bytes()) == digest(extra)
    assert w.hashes(where) == source_then
    assert int(w.zfs_get("source", "userrefs", kept["kept_snapshot"])) >= 1
    refused = w.source_host.run(["zfs", "destroy", kept["kept_snapshot"]], check=False)
    assert refused.returncode != 0, "the kept snapshot could be destroyed: it is not held"
    # The common snapshot stays with one of the two (keep_changes promotes the clone), its GUID the replica's.
    both = {**w.guids("source", kept_name), **w.guids("source")}
    assert both[point] == w.guids("dr")[point]


# ---- refusals ---------------------------------------------------------------------------------------


def snapshot_of_the_world(w: FailoverWorld) -> dict[str, Any]:
    return {"ops": ops(w), "runs": w.db.value("select count(*) from recovery_runs"),
            "source": w.guids("source"), "dr": w.guids("dr"),
            "power": {side: {v.name: w.power(v, side) for v in w.vms} for side in ("source", "dr")},
            "state": (w.group()["state"], w.group()["direction"])}


def test_refusals_start_nothing(failover_world: Any) -> None:
    w: FailoverWorld = failover_world()
    db = w.db
    before = snapshot_of_the_world(w)

    # Wrong state: commit, rollback, reprotect of a protected group; named rule and state.
    for kind in ("commit", "rollback", "reprotect"):
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="recovery_runs_state") as refused:
            w.run(kind)
        assert "protected" in str(refused.value), refused.value
    # planned_migration and failover only from 'protected'.
    db.sql("update protection_groups set state = 'failed_over' where id = %s", (GROUP,))
    for kind in ("planned_migration", "failover"):
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="recovery_runs_state"):
            w.run(kind)
    db.sql("update protection_groups set state = 'protected' where id = %s", (GROUP,))
    # Options the kind does not know, or of the wrong type.
    with pytest.raises(psycopg.errors.CheckViolation, match="recovery_runs_options"):
        w.run("planned_migration", options={"skip_source": True})
    with pytest.raises(psycopg.errors.CheckViolation, match="force_power_off"):
        w.run("failover", options={"force_power_off": "yes"})
    # A planned migration names no point: it makes its own.
    with pytest.raises(psycopg.Error, match="recovery_point"):
        w.run("planned_migration", recovery_point_id=w.point_id(w.points[-1]))
    assert snapshot_of_the_world(w) == before

    # A non-admin (an operator of the group) asks: refused by the database.
    operator = "00000000-0000-4000-8000-0000000000e2"
    db.sql("insert into zerfaux.operators (user_id, role, protection_group_id) values (%s, 'operator', %s)"
           " on conflict do nothing", (operator, GROUP))
    for kind in ("planned_migration", "failover"):
        with psycopg.connect(db.url) as conn:
            conn.execute("set local role authenticated")
            conn.execute("select set_config('request.jwt.claims', %s, true)",
                         (json.dumps({"role": "authenticated", "sub": operator}),))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("insert into recovery_runs (protection_group_id, kind) values (%s, %s)", (GROUP, kind))
    assert snapshot_of_the_world(w) == before

    # A second run while one is pending: refused naming the rule; the first, cancelled while pending, never starts.
    first = w.run("planned_migration")
    assert w.group()["state"] == "recovering"
    for kind in ("failover", "planned_migration", "test"):
        with pytest.raises(psycopg.Error, match="recovery_runs_one_run_per_group"):
            w.run(kind)
    with pytest.raises(psycopg.Error, match="replication_jobs_group_state"):
        db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    db.sql("update recovery_runs set cancel_requested = true where id = %s", (first,))
    assert run_row(w, first)["status"] == "cancelled"
    asyncio.run(w.drain(timeout=60))
    assert run_row(w, first)["status"] == "cancelled"
    after = snapshot_of_the_world(w)
    assert after["ops"] == before["ops"] + 1 and after["runs"] == before["runs"] + 1
    assert {k: after[k] for k in ("source", "dr", "power", "state")} == \
        {k: before[k] for k in ("source", "dr", "power", "state")}

    # A group without source_ssh_host cannot be reprotected: the plan refuses it, nothing done.
    db.sql("update protection_groups set state = 'failed_over', source_ssh_host = null where id = %s", (GROUP,))
    rp_id = w.run("reprotect")
    rp = drive(w, rp_id)
    assert rp["status"] == "failed" and "protection_groups.source_ssh_host" in (rp["error"] or ""), rp["error"]
    assert all(s["status"] in ("pending", "skipped", "failed") for s in steps(w, rp_id) if s["name"] != "validate")
    final = snapshot_of_the_world(w)
    assert (final["source"], final["dr"], final["power"]) == (before["source"], before["dr"], before["power"])
    assert w.group()["state"] == "failed_over"

