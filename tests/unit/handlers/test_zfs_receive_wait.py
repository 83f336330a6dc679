from __future__ import annotations

from collections.abc import Sequence

import pytest

from handlers.backends.zfs import ops as zfs_ops
from handlers.backends.zfs.exec import Result
from handlers.errors import TransientError

CAPS = zfs_ops.Caps(resume=False, estimate=False, written=False, userrefs=True)
LISTING = "tank/dr/vm@zerfaux_aaaaaaaaaaaa_20260101T000000Z\tguid\t11\ntank/dr/vm@zerfaux_aaaaaaaaaaaa_20260101T000000Z\tcreatetxg\t5\n"


def pgrep(rc: int, out: str = "") -> Result:
    return Result(("pgrep",), rc, out, "")


class Scripted:
    """The target, answering each look (one batch: pgrep, snapshot listing, parent) from a script."""

    label = "root@dr:22"
    cache_key = "dr"

    def __init__(self, *pgreps: Result) -> None:
        self.pgreps = list(pgreps)
        self.looks = 0

    def run(self, argv: Sequence[str], timeout: float = 60) -> Result:
        raise AssertionError("a look at the target is one batch")

    def run_many(self, commands: Sequence[Sequence[str]], timeout: float = 60) -> list[Result]:
        self.looks += 1
        found = self.pgreps.pop(0) if len(self.pgreps) > 1 else self.pgreps[0]
        return [found, Result(tuple(commands[1]), 0, LISTING, ""), Result(tuple(commands[2]), 0, "tank/dr\n", "")]


def test_a_receive_into_the_dataset_is_seen_and_others_are_not() -> None:
    listing = "12 zfs receive -u tank/dr/other\n13 pgrep -a -f zfs rec\n14 /usr/sbin/zfs receive -u -s tank/dr/vm\n"
    assert zfs_ops.parse_receive_running(pgrep(0, listing), "tank/dr/vm") is True
    assert zfs_ops.parse_receive_running(pgrep(0, listing), "tank/dr") is False
    assert zfs_ops.parse_receive_running(pgrep(0, "15 sh -c pgrep -a -f 'zfs rec' ... tank/dr/vm\n"), "tank/dr/vm") is False
    assert zfs_ops.parse_receive_running(pgrep(1), "tank/dr/vm") is False
    assert zfs_ops.parse_receive_running(pgrep(127), "tank/dr/vm") is None


def test_the_target_is_read_once_the_receive_has_exited() -> None:
    running = pgrep(0, "7 zfs receive -u tank/dr/vm\n")
    target = Scripted(running, running, pgrep(1))
    state = zfs_ops.settled_target_state(target, "tank/dr/vm", CAPS, seconds=5)
    assert target.looks == 3
    assert state.receiving is False and state.parent_ok
    assert [s.guid for s in state.snaps or []] == [11]


def test_a_receive_that_never_ends_is_a_transient_error_naming_the_dataset() -> None:
    with pytest.raises(TransientError, match="tank/dr/vm is still running on root@dr:22"):
        zfs_ops.settled_target_state(Scripted(pgrep(0, "7 zfs receive -u tank/dr/vm\n")), "tank/dr/vm", CAPS,
                                     seconds=0.3)
