from __future__ import annotations

from collections.abc import Sequence

import pytest

from handlers.backends import zfs_ops
from handlers.backends.zfs_exec import Result
from handlers.errors import TransientError


class Scripted:
    label = "root@dr:22"
    cache_key = "dr"

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def run(self, argv: Sequence[str], timeout: float = 60) -> Result:
        self.calls += 1
        rc, out = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return Result(tuple(argv), rc, out, "")


def test_a_receive_into_the_dataset_is_seen_and_others_are_not() -> None:
    listing = "12 zfs receive -u tank/dr/other\n13 pgrep -a -f zfs rec\n14 /usr/sbin/zfs receive -u -s tank/dr/vm\n"
    assert zfs_ops.receive_running(Scripted((0, listing)), "tank/dr/vm") is True
    assert zfs_ops.receive_running(Scripted((0, listing)), "tank/dr") is False
    assert zfs_ops.receive_running(Scripted((1, "")), "tank/dr/vm") is False
    assert zfs_ops.receive_running(Scripted((127, "")), "tank/dr/vm") is None


def test_waiting_ends_when_the_receive_exits() -> None:
    runner = Scripted((0, "7 zfs receive -u tank/dr/vm\n"), (0, "7 zfs receive -u tank/dr/vm\n"), (1, ""))
    zfs_ops.wait_for_receive(runner, "tank/dr/vm", seconds=5)
    assert runner.calls == 3


def test_a_receive_that_never_ends_is_a_transient_error_naming_the_dataset() -> None:
    with pytest.raises(TransientError, match="tank/dr/vm is still running on root@dr:22"):
        zfs_ops.wait_for_receive(Scripted((0, "7 zfs receive -u tank/dr/vm\n")), "tank/dr/vm", seconds=0.3)
