"""Retention grids on real ZFS (zfs-fuse with the target over sshd; OpenZFS in the QEMU guest, where
the clone check reads the ``clones`` property): what each side keeps after a job.

ZFS cannot date a snapshot in the past, so the snapshots of a timeline are made now and the
backend is handed a ``creation`` function (its constructor's ``creation``, which production
leaves as the ZFS ``creation`` property) giving them the ages the test chose. Everything else is
real: the snapshots, the holds, the clones, the sends, the destroys, and what ``zfs get guid``
shows on each side afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from handlers.backends.zfs.ops import target_tag
from handlers.backends.zfs.plan import Snap
from handlers.backends.zfs.real import ZFSReplicationReal
from tests.integration.test_zfs_backend import names, replicate, request  # noqa: F401  (fixture)
from tests.support.platforms import FUSE_LOCAL, FUSE_SSH, OPENZFS, Platform, guids, write
from tests.support.zfs import secret_env

pytestmark = pytest.mark.zfs

H = 3600


def timeline(p: Platform, src: str, dst: str, ages: dict[str, float]) -> dict[str, str]:
    """Our snapshots on the source, oldest first, ``ages`` hours old to the grid; all sent to the
    target (as earlier jobs would have), with a foreign snapshot among them. Returns label -> name."""
    tag = target_tag(p.target.ssh_host, p.target.ssh_port, dst)
    made: dict[str, str] = {}
    for i, label in enumerate(ages):
        if i == 2:
            p.source.run(["zfs", "snapshot", f"{src}@operator-daily"])  # not ours: never pruned
        write(p.source, src, f"f{i}", 64 * 1024)
        name = f"zerfaux_t{uuid.uuid4().hex[:8]}{i:02d}_20270101T0000{i:02d}Z"
        p.source.run(["zfs", "snapshot", "-o", f"zerfaux:target={tag}", f"{src}@{name}"])
        made[label] = name
    first, last = made[next(iter(ages))], made[list(ages)[-1]]
    p.target.run(["zfs", "receive", "-u", dst], input=p.source.run(["zfs", "send", f"{src}@{first}"]).stdout)
    p.target.run(["zfs", "receive", "-u", dst],
                 input=p.source.run(["zfs", "send", "-I", f"{src}@{first}", f"{src}@{last}"]).stdout)
    return made


def dated(made: dict[str, str], ages: dict[str, float], others: Callable[[Snap], int]) -> Callable[[Snap], int]:
    now = int(time.time())
    when = {made[label]: now - int(hours * H) for label, hours in ages.items()}
    return lambda snap: when.get(snap.name, others(snap))


@pytest.fixture
def cleanup(platform: Platform) -> Iterator[list[tuple[str, ...]]]:
    """Holds to release and clones to destroy whatever the test did (a held snapshot stops destroy -R)."""
    undo: list[tuple[str, ...]] = []
    yield undo
    for host, *argv in reversed(undo):
        (platform.source if host == "source" else platform.target).run(list(argv), check=False)


@pytest.mark.parametrize("platform", [FUSE_LOCAL, FUSE_SSH, OPENZFS], indirect=True)
def test_a_grid_prunes_each_side_by_its_own_grid_and_spares_what_it_must(
        platform: Platform, names: tuple[str, str], cleanup: list[tuple[str, ...]]) -> None:  # noqa: F811
    p, (src, dst) = platform, names
    # Target grid: ages (0,1h] all; (1h,2h]; (2h,3h]; (3h,27h]; (27h,51h]; beyond 51h pruned.
    # Source grid: (0,1h] all; (1h,25h]; beyond 25h pruned.
    ages = {"80h": 80, "70h-held": 70, "40h": 40, "35h-cloned": 35, "20h": 20, "10h": 10,
            "2.5h": 2.5, "1.5h": 1.5, "1.2h": 1.2, "0.5h": 0.5, "0.2h": 0.2}
    made = timeline(p, src, dst, ages)
    for host, dataset in (("source", src), ("target", dst)):
        side = p.source if host == "source" else p.target
        side.run(["zfs", "hold", "keep-me", f"{dataset}@{made['70h-held']}"])
        cleanup.append((host, "zfs", "release", "keep-me", f"{dataset}@{made['70h-held']}"))
        clone = f"{side.pool}/clone{uuid.uuid4().hex[:8]}"
        side.run(["zfs", "clone", "-o", "mountpoint=none", f"{dataset}@{made['35h-cloned']}", clone])
        cleanup.append((host, "zfs", "destroy", clone))
    backend = ZFSReplicationReal(secret_env(p.target, p.source), creation=dated(made, ages, lambda s: s.creation))
    try:
        write(p.source, src, "last", 64 * 1024)
        req = replace(request(str(uuid.uuid4()), src, dst, p, retention=1),
                      retention_grid="1x1h(keep=all) | 2x1h | 2x1d", source_retention_grid="1x1h(keep=all) | 1x1d")
        outcome = replicate(backend, req)
    finally:
        backend.close()
    job = outcome.snapshot_name
    # Spared before any destroy was tried (ZFS itself would refuse a held or cloned one: that is not
    # what keeps them here).
    assert not any("could not destroy" in n or "retention skipped" in n for n in outcome.notes), outcome.notes
    on_target = set(guids(p.target, dst))
    on_source = set(guids(p.source, src))
    keep_target = {"70h-held", "40h", "35h-cloned", "20h", "2.5h", "1.5h", "0.5h", "0.2h"}
    keep_source = {"70h-held", "35h-cloned", "20h", "0.5h", "0.2h"}
    assert on_target == {made[k] for k in keep_target} | {job, "operator-daily"}
    assert on_source == {made[k] for k in keep_source} | {job, "operator-daily"}
    assert set(outcome.pruned_target) == {made[k] for k in ages} - {made[k] for k in keep_target}
    assert set(outcome.pruned_source) == {made[k] for k in ages} - {made[k] for k in keep_source}
    # The recovery points are the target's snapshots of ours, by GUID, plus the source's not there.
    target_guids, source_guids = guids(p.target, dst), guids(p.source, src)
    listed = {pt.snapshot_name: pt for pt in outcome.recovery_points}
    assert set(listed) == (on_target | on_source) - {"operator-daily"}
    for name, point in listed.items():
        assert point.on_target == (name in target_guids) and point.on_source == (name in source_guids)
        assert int(point.guid) == (target_guids.get(name) or source_guids[name])
    assert listed[job].bytes == outcome.bytes_transferred and listed[made["20h"]].bytes is None


@pytest.mark.parametrize("platform", [FUSE_LOCAL, FUSE_SSH], indirect=True)
def test_the_newest_common_snapshot_stays_even_when_the_grid_would_drop_it(
        platform: Platform, names: tuple[str, str]) -> None:  # noqa: F811
    p, (src, dst) = platform, names
    ages = {"0.5h": 0.5, "0.2h": 0.2}
    made = timeline(p, src, dst, ages)
    # The job's own snapshot (after the send, the newest common one) is dated a year back, so
    # no interval of the grid holds it: only the rule that it is never pruned keeps it.
    backend = ZFSReplicationReal(secret_env(p.target, p.source),
                                 creation=dated(made, ages, lambda s: s.creation - 365 * 24 * H))
    try:
        req = replace(request(str(uuid.uuid4()), src, dst, p, retention=1),
                      retention_grid="1x1h(keep=all)", source_retention_grid="1x1h(keep=all)")
        outcome = replicate(backend, req)
    finally:
        backend.close()
    for host, dataset in ((p.source, src), (p.target, dst)):
        assert set(guids(host, dataset)) == {made["0.5h"], made["0.2h"], outcome.snapshot_name}
    assert guids(p.target, dst)[outcome.snapshot_name] == guids(p.source, src)[outcome.snapshot_name]
    assert outcome.pruned_source == () and outcome.pruned_target == ()
