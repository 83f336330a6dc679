"""ZFS control commands on one host, and what that host's ZFS can do (detected once, cached).

zfs-fuse 0.7 and OpenZFS 2.x differ in ways that matter for safety (resumable receive, holds,
size estimates, the ``written`` property). We ask each host once, by reading the usage text
its ``zfs`` prints and by probing properties, and keep the answer for the life of the process.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from handlers.backends.zfs import caps as stream_caps
from handlers.backends.zfs.exec import Result, Runner, check
from handlers.backends.zfs.plan import Snap
from handlers.errors import PermanentError, TransientError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caps:
    resume: bool  # receive -s, receive_resume_token, send -t
    estimate: bool  # send -nP
    written: bool  # the 'written' property
    userrefs: bool  # the 'userrefs' property (how many holds)
    get_types: bool = True  # `zfs get -t snapshot` (syncoid needs it to list a remote host's snapshots)
    # The stream (zfs/caps.py): each send flag only where the pool has the feature its receiver needs.
    large_blocks: bool = False  # send -L
    embedded: bool = False  # send -e
    compressed: bool = False  # send -c
    raw: bool = False  # send -w, native encryption
    bookmarks: bool = False  # zfs bookmark, send -i #bookmark
    tools: frozenset[str] = frozenset()  # zstd, lz4, mbuffer on the host's PATH


T = TypeVar("T")


def parallel(*calls: Callable[[], T]) -> list[T]:
    """Run independent commands at once: each remote one costs a session round trip."""
    if len(calls) == 1:
        return [calls[0]()]
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="zfs-ctl") as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


_caps: dict[str, Caps] = {}
_caps_lock = threading.Lock()
_no_hold: set[str] = set()  # hosts whose ZFS answered that it has no holds at all
# What a ZFS without holds answers (an old pool version, a zfs without the subcommand); any other
# failure (a busy pool, a dropped session, a snapshot destroyed meanwhile) is tried again next time.
_HOLDS_UNSUPPORTED = ("unrecognized command", "pool must be upgraded", "operation not supported",
                      "not supported", "invalid option")


def _usage_flags(text: str, command: str) -> set[str]:
    """Option letters in the bracketed groups of ``zfs <command>`` usage lines."""
    flags: set[str] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(command + " "):
            for group in re.findall(r"\[-([A-Za-z]+)\]", stripped):
                flags.update(group)
            if " -t " in stripped:
                flags.add("t")
    return flags


def capabilities(runner: Runner, pool: str) -> Caps:
    with _caps_lock:
        found = _caps.get(runner.cache_key)
    if found is not None:
        return found
    probes = [
        ["zfs", "send"],  # no arguments: prints its usage and exits 2
        ["zfs", "receive"],
        ["zfs", "get", "-H", "-o", "value", "receive_resume_token", pool],
        ["zfs", "get", "-H", "-o", "value", "written", pool],
        ["zfs", "get", "-H", "-o", "value", "userrefs", pool],
        ["zfs", "get", "-H", "-t", "snapshot", "-o", "name", "guid", pool],
        stream_caps.features_argv(pool),
        stream_caps.BOOKMARK_ARGV,
        stream_caps.TOOLS_ARGV,
    ]
    send, recv, token, written, userrefs, get_types, features, bookmark, tools = parallel(
        *(partial(runner.run, p) for p in probes))
    if send.rc == 127:
        raise PermanentError(f"zfs is not installed on {runner.label}")
    send_flags = _usage_flags(send.err + send.out, "send")
    recv_flags = _usage_flags(recv.err + recv.out, "receive")
    pool_features = stream_caps.parse_features(features)
    large_blocks, embedded, compressed, raw = stream_caps.stream_flags(send_flags, pool_features)
    caps = Caps(
        resume=token.ok and "s" in recv_flags and "t" in send_flags,
        estimate={"n", "P"} <= send_flags,
        written=written.ok,
        userrefs=userrefs.ok,
        get_types=get_types.ok,
        large_blocks=large_blocks, embedded=embedded, compressed=compressed, raw=raw,
        bookmarks=stream_caps.parse_bookmark_usage(bookmark) and "bookmarks" in pool_features,
        tools=stream_caps.parse_tools(tools),
    )
    log.info("ZFS on %s: %s", runner.label, caps)
    with _caps_lock:
        _caps[runner.cache_key] = caps
    return caps


def exists_argv(dataset: str) -> list[str]:
    return ["zfs", "list", "-H", "-o", "name", dataset]


def parse_exists(result: Result, where: str, dataset: str) -> bool:
    if result.ok:
        return True
    if "does not exist" in result.err:
        return False
    check(result, where, f"looking up {dataset}")
    return False


def snapshots(runner: Runner, dataset: str, caps: Caps) -> list[Snap] | None:
    """The dataset's snapshots oldest first, or None when the dataset does not exist."""
    return parse_snapshots(runner.run(snapshots_argv(dataset, caps)), runner.label, dataset)


def snapshots_argv(dataset: str, caps: Caps) -> list[str]:
    # ``zfs get -d 1`` because zfs-fuse's ``zfs list`` has no guid column and its ``get`` no ``-t``.
    props = "guid,createtxg,creation,userrefs" if caps.userrefs else "guid,createtxg,creation"
    props += "," + TARGET_PROPERTY
    return ["zfs", "get", "-Hp", "-d", "1", "-o", "name,property,value", props, dataset]


def parse_snapshots(result: Result, where: str, dataset: str) -> list[Snap] | None:
    if not result.ok:
        if "does not exist" in result.err:
            return None
        check(result, where, f"listing snapshots of {dataset}")
    rows: dict[str, dict[str, str]] = {}
    for line in result.out.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].startswith(dataset + "@"):
            continue
        rows.setdefault(parts[0].split("@", 1)[1], {})[parts[1]] = parts[2]
    snaps = []
    for name, values in rows.items():
        refs = values.get("userrefs", "-")
        target = values.get(TARGET_PROPERTY, "-")
        created = values.get("creation", "")
        snaps.append(Snap(name, int(values["guid"]), int(values["createtxg"]), int(refs) if refs.isdigit() else -1,
                          "" if target == "-" else target, int(created) if created.isdigit() else 0))
    return sorted(snaps, key=lambda s: s.txg)


def get_value(runner: Runner, dataset: str, prop: str) -> str | None:
    return parse_value(runner.run(get_argv(dataset, prop)))


def get_argv(dataset: str, prop: str) -> list[str]:
    return ["zfs", "get", "-Hp", "-o", "value", prop, dataset]


def parse_value(result: Result) -> str | None:
    if not result.ok:
        return None
    value = result.out.strip()
    return None if value in ("", "-") else value


def resume_token(runner: Runner, dataset: str, caps: Caps) -> str | None:
    return get_value(runner, dataset, "receive_resume_token") if caps.resume else None


def parse_written(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


@dataclass(frozen=True)
class TargetState:
    """What one look at the target dataset shows, read in one round trip."""

    receiving: bool | None  # a zfs receive into the dataset is running (None: no pgrep there)
    snaps: list[Snap] | None  # None: the dataset does not exist
    parent_ok: bool  # the dataset's parent exists (True when it has none)
    written: int | None  # bytes written since its newest snapshot, where ZFS can say
    token: str | None  # receive_resume_token of a partial receive


def target_state(runner: Runner, dataset: str, caps: Caps) -> TargetState:
    """Receive running?, snapshots, parent, ``written`` and resume token: one batch on the host."""
    parent = dataset.rsplit("/", 1)[0] if "/" in dataset else None
    commands = [RECEIVE_PGREP, snapshots_argv(dataset, caps)]
    if parent:
        commands.append(exists_argv(parent))
    if caps.written:
        commands.append(get_argv(dataset, "written"))
    if caps.resume:
        commands.append(get_argv(dataset, "receive_resume_token"))
    results = iter(runner.run_many(commands))
    receiving = parse_receive_running(next(results), dataset)
    snaps = parse_snapshots(next(results), runner.label, dataset)
    parent_ok = parse_exists(next(results), runner.label, parent) if parent else True
    written_value = parse_written(parse_value(next(results))) if caps.written else None
    token = parse_value(next(results)) if caps.resume else None
    if snaps is None:
        written_value, token = None, None
    return TargetState(receiving, snaps, parent_ok, written_value, token)


def settled_target_state(runner: Runner, dataset: str, caps: Caps, seconds: float = 20.0) -> TargetState:
    """``target_state`` once no receive into the dataset runs; TransientError if one does not end.

    A receive whose sender was killed (a cancel, a listener SIGKILLed mid-send) goes on for a
    moment on the target; until it has exited and rolled back, the dataset's snapshot list is
    not to be trusted, and a second receive must not start.
    """
    deadline = time.monotonic() + seconds
    while True:
        state = target_state(runner, dataset, caps)
        if state.receiving is None:
            time.sleep(1.0)  # no pgrep there: give a killed receive a moment, then look again
            return target_state(runner, dataset, caps)
        if not state.receiving:
            return state
        if time.monotonic() >= deadline:
            raise TransientError(
                f"a zfs receive into {dataset} is still running on {runner.label}: "
                "waiting for it to end before another one starts"
            )
        time.sleep(0.25)


TARGET_PROPERTY = "zerfaux:target"


def target_tag(host: str, port: int, dataset: str) -> str:
    """The ``zerfaux:target`` value of a source snapshot: the replica it was made for."""
    return f"{host}:{port}/{dataset}"


def create_snapshot(runner: Runner, dataset: str, name: str, job_id: str, target: str,
                    recursive: bool = False) -> None:
    # User properties tie the snapshot to its job (for people reading `zfs get all`) and to its
    # replica (source retention counts only the snapshots made for the same target). ``recursive``:
    # one atomic `zfs snapshot -r` of the dataset and every child (a group of a dataset tree).
    check(runner.run(["zfs", "snapshot", *(["-r"] if recursive else []), "-o", f"zerfaux:job={job_id}",
                      "-o", f"{TARGET_PROPERTY}={target}", f"{dataset}@{name}"]),
          runner.label, f"creating snapshot {dataset}@{name}")


def hold(runner: Runner, tag: str, dataset: str, snap: str) -> bool:
    """Hold ``dataset@snap`` with ``tag``; False when this one hold failed (the caller notes it).

    Only a clear "not supported" answer is remembered for the host: any other failure is
    tried again by the next hold.
    """
    if runner.cache_key in _no_hold:
        return False
    result = runner.run(["zfs", "hold", tag, f"{dataset}@{snap}"])
    if result.ok or "tag already exists" in result.err:  # a retry of the same attempt
        return True
    err = result.err.strip()
    log.info("zfs hold %s on %s@%s failed on %s: %s", tag, dataset, snap, runner.label, err)
    if any(word in err.lower() for word in _HOLDS_UNSUPPORTED):
        _no_hold.add(runner.cache_key)
    return False


def holds_supported(runner: Runner) -> bool:
    return runner.cache_key not in _no_hold


def release(runner: Runner, tag: str, dataset: str, snap: str) -> None:
    result = runner.run(["zfs", "release", tag, f"{dataset}@{snap}"])
    if not result.ok and "no such tag" not in result.err:
        log.warning("releasing hold %s on %s@%s at %s failed: %s", tag, dataset, snap, runner.label, result.err.strip())


def estimate(runner: Runner, dataset: str, snap: str, base: str | None, token: str | None,
             flags: Sequence[str] = ()) -> int | None:
    """Stream size from ``zfs send -nP``; None when absent or absurd (zrepl's rule: do not trust those).

    ``flags`` are the stream's (-L -e -c -w): a compressed stream is smaller than a plain one."""
    if token:
        argv = ["zfs", "send", "-nP", "-t", token]
    elif base:
        argv = ["zfs", "send", "-nP", *flags, "-i", f"{dataset}@{base}", f"{dataset}@{snap}"]
    else:
        argv = ["zfs", "send", "-nP", *flags, f"{dataset}@{snap}"]
    result = runner.run(argv)
    return parse_size(result.out + result.err) if result.ok else None


def parse_size(text: str) -> int | None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "size" and parts[1].isdigit():
            size = int(parts[1])
            return size if 0 <= size < 1 << 50 else None
    return None


def parse_token_from_guid(text: str) -> int | None:
    """The ``fromguid`` of a resume token, from ``zfs send -nv -t`` (absent for a full stream)."""
    found = re.search(r"^\s*fromguid = (0x[0-9a-fA-F]+|\d+)\s*$", text, re.MULTILINE)
    return int(found.group(1), 0) if found else None


RECEIVE_PGREP = ["pgrep", "-a", "-f", "zfs rec"]


def parse_receive_running(result: Result, dataset: str) -> bool | None:
    if result.rc == 1:
        return False  # pgrep found nothing
    if not result.ok:
        return None
    for line in result.out.splitlines():
        words = line.split()[1:]
        if len(words) >= 3 and words[0].rsplit("/", 1)[-1] == "zfs" and words[1] in ("receive", "recv") \
                and words[-1] == dataset:
            return True
    return False


def abort_partial(runner: Runner, dataset: str) -> Result:
    return runner.run(["zfs", "receive", "-A", dataset])


def destroy_snapshot(runner: Runner, dataset: str, snap: str) -> Result:
    # One snapshot by full name, never -r/-R: nothing beyond what retention chose can go.
    return runner.run(["zfs", "destroy", f"{dataset}@{snap}"])
