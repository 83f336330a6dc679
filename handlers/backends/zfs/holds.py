"""Holds of one attempt: taken while its stream flows, released after, never another attempt's.

The tag carries the attempt (``zerfaux_<job>_a<attempt>``), so the clean-up of an attempt that
was fenced (its lease lost, its thread still ending) releases only its own holds, never those of
the attempt that took its operation over (always a higher number: a lost lease counts an attempt).
A retry releases what earlier attempts of its job left (killed mid-send, stopped, or failed on a
resumable ZFS): the tags of attempts up to its own, and the tag before attempts had one
(``zerfaux_<job>``). Up to and including its own, because an operation released at shutdown gives
its attempt back: the next one runs under the same number, and only after the released attempt's
backend returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner
from handlers.backends.zfs.plan import Snap, job_prefix
from handlers.replication import snapshot_name

log = logging.getLogger(__name__)

Held = tuple[Runner, str, str]  # where, dataset, snapshot


def job_tag(job_id: str) -> str:
    """``zerfaux_<job>``: the start of every hold tag of the job (and the whole tag before attempts had one)."""
    return job_prefix(snapshot_name(job_id)).rstrip("_")


def attempt_tag(job_id: str, attempt: int) -> str:
    return f"{job_tag(job_id)}_a{attempt}"


def earlier_tags(job_id: str, attempt: int) -> list[str]:
    """The tags this attempt releases on snapshots it found held: never a later attempt's."""
    return [job_tag(job_id)] + [attempt_tag(job_id, n) for n in range(1, attempt + 1)]


class Holds:
    def __init__(self, job_id: str, attempt: int, note: Callable[[str], None]) -> None:
        self.tag = attempt_tag(job_id, attempt)
        self._prefix = job_tag(job_id)
        self._earlier = earlier_tags(job_id, attempt)
        self._note = note
        self._mine: list[Held] = []
        self._adopted: list[Held] = []

    def hold(self, runner: Runner, dataset: str, snap: str) -> None:
        if ops.hold(runner, self.tag, dataset, snap):
            if (runner, dataset, snap) not in self._mine:
                self._mine.append((runner, dataset, snap))
        elif ops.holds_supported(runner):
            self._note(f"zfs hold failed on {runner.label}: {dataset}@{snap} was not held during the send "
                       "(the next job tries again)")
        else:
            self._note(f"hold not supported by this ZFS ({runner.label}): {dataset}@{snap} was not held during the send")

    def adopt(self, runner: Runner, dataset: str, snaps: Sequence[Snap]) -> None:
        """Held snapshots of a retry: the earlier attempts' holds on them are released at the end.

        Which tags a snapshot carries only OpenZFS can list (zfs-fuse's ``zfs holds`` is broken),
        so each earlier tag is released and "no such tag" ignored."""
        for snap in snaps:
            if snap.userrefs > 0 and (runner, dataset, snap.name) not in self._adopted:
                self._adopted.append((runner, dataset, snap.name))

    def keep(self) -> None:
        """A stopped attempt, or one that failed mid-stream on a resumable ZFS: the next attempt of the
        job resumes from these snapshots, and releases the holds (as after a SIGKILL)."""
        self._mine, self._adopted = [], []

    def release(self) -> None:
        mine, self._mine = self._mine, []
        adopted, self._adopted = self._adopted, []
        calls = [partial(ops.release, runner, self.tag, dataset, snap) for runner, dataset, snap in mine]
        calls += [partial(self._release_earlier, runner, dataset, snap) for runner, dataset, snap in adopted]
        if calls:
            ops.parallel(*calls)

    def _release_earlier(self, runner: Runner, dataset: str, snap: str) -> None:
        listed = runner.run(["zfs", "holds", "-H", f"{dataset}@{snap}"])
        if listed.ok:  # OpenZFS: exactly the tags there are
            present = {line.split("\t")[1].strip() for line in listed.out.splitlines() if line.count("\t") >= 2}
            tags = [t for t in self._earlier if t in present]
        else:  # zfs-fuse: every earlier tag, in one round trip
            tags = self._earlier
        if not tags:
            return
        results = runner.run_many([["zfs", "release", tag, f"{dataset}@{snap}"] for tag in tags])
        for tag, result in zip(tags, results):
            if not result.ok and "no such tag" not in result.err:
                log.warning("releasing hold %s on %s@%s at %s failed: %s", tag, dataset, snap, runner.label,
                            result.err.strip())
