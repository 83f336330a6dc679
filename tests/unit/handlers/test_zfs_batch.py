"""The one-round-trip command batch: each command's output, errors and exit status come back apart."""

from __future__ import annotations

import subprocess

from handlers.backends.zfs.exec import batch_script, split_batch


def _run_batch(commands: list[list[str]]) -> list[tuple[int, str, str]] | None:
    mark = "zerfaux-0123456789abcdef"
    done = subprocess.run(["sh", "-c", batch_script(commands, mark)], capture_output=True, text=True, check=False)
    results = split_batch(commands, mark, done.stdout, done.stderr)
    return None if results is None else [(r.rc, r.out, r.err) for r in results]


def test_each_command_gets_its_own_output_errors_and_status() -> None:
    commands = [
        ["printf", "a\\tb\\n"],
        ["sh", "-c", "echo oops >&2; exit 3"],
        ["printf", "no newline"],
        ["true"],
        ["echo", "it's; $(rm -rf /) `x` \"q\""],  # quoting survives: the argument comes back as it went in
    ]
    assert _run_batch(commands) == [
        (0, "a\tb\n", ""),
        (3, "", "oops\n"),
        (0, "no newline", ""),
        (0, "", ""),
        (0, "it's; $(rm -rf /) `x` \"q\"\n", ""),
    ]


def test_a_missing_program_is_exit_127_not_a_broken_batch() -> None:
    results = _run_batch([["zerfaux-no-such-program"], ["echo", "after"]])
    assert results is not None
    assert results[0][0] == 127 and "not found" in results[0][2]
    assert results[1] == (0, "after\n", "")


def test_output_that_does_not_hold_every_result_is_refused() -> None:
    mark = "zerfaux-0123456789abcdef"
    assert split_batch([["a"], ["b"]], mark, f"x\n{mark} 0\n", f"\n{mark}\n") is None
    # A forged separator with another mark is just output.
    assert split_batch([["a"]], mark, "\nzerfaux-ffff 0\n" + f"\n{mark} 0\n", f"\n{mark}\n") is not None
