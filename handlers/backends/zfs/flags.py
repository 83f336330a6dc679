"""The send flags of a replica chain: chosen at the seed, recorded on the target, kept for its life.

* A source with native encryption is sent raw (``zfs send -w``) or not at all: the DR site stores
  ciphertext and needs no key. Never plaintext (syncoid did by default: sanoid issue 548).
* Raw or not, and ``-L`` or not, are fixed for the life of a chain: mixing raw and non-raw fails
  ("IV set guid mismatch"), and toggling ``-L`` zeroed files (OpenZFS issue 6224). The flags a
  replica was seeded with are in its ``zerfaux:send_flags`` property (``raw`` or ``L,e,c``, or
  ``none``); a job that would change them is refused with what to do.
* ``-e`` and ``-c`` are used whenever both sides have them (they may differ stream to stream).

A target without the property was seeded before Zerfaux recorded flags, or by someone else: it is
a raw chain if it is encrypted, otherwise one without ``-L``.
"""

from __future__ import annotations

from dataclasses import dataclass

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner, check
from handlers.backends.zfs.sides import Sides
from handlers.errors import PermanentError, TransientError

FLAGS_PROPERTY = "zerfaux:send_flags"


@dataclass(frozen=True)
class StreamFlags:
    raw: bool = False
    large_blocks: bool = False
    embedded: bool = False
    compressed: bool = False

    def send_args(self) -> list[str]:
        if self.raw:
            return ["-w"]  # a raw stream carries the blocks as they are on disk: -L -e -c are implied
        return (["-L"] if self.large_blocks else []) + (["-e"] if self.embedded else []) + \
            (["-c"] if self.compressed else [])

    @property
    def letters(self) -> str:
        """The flags as syncoid's --sendoptions wants them ("w", "Lec", "")."""
        return "".join(a[1] for a in self.send_args())

    @property
    def already_compressed(self) -> bool:
        """A raw or ``-c`` stream carries the pool's compressed blocks: compressing again does not pay."""
        return self.raw or self.compressed

    def record(self) -> str:
        if self.raw:
            return "raw"
        words = [w for w, on in (("L", self.large_blocks), ("e", self.embedded), ("c", self.compressed)) if on]
        return ",".join(words) or "none"

    @classmethod
    def parse(cls, value: str) -> StreamFlags:
        words = {w.strip() for w in value.split(",")}
        return cls(raw="raw" in words, large_blocks="L" in words, embedded="e" in words, compressed="c" in words)


@dataclass(frozen=True)
class SourceCrypt:
    encryption: str  # 'off', or the cipher (aes-256-gcm, ...)

    @property
    def encrypted(self) -> bool:
        return self.encryption not in ("off", "")


@dataclass(frozen=True)
class ChainRecord:
    """What the target says about its chain: None when the target does not exist yet."""

    recorded: str | None  # the zerfaux:send_flags value, None when unset
    encryption: str  # the target's own 'encryption' property ('off' where ZFS has no encryption)


def read_source(runner: Runner, dataset: str, caps: ops.Caps) -> SourceCrypt:
    """The source's encryption. Where the ZFS has encryption a failed read is an error, never 'off'."""
    if not caps.raw:
        return SourceCrypt("off")  # this ZFS has no native encryption: the dataset cannot be encrypted
    result = runner.run(ops.get_argv(dataset, "encryption"))
    if not result.ok and "does not exist" not in result.err:
        raise TransientError(f"cannot read the encryption of {dataset} on {runner.label}: {result.err.strip()}")
    return SourceCrypt(ops.parse_value(result) or "off")


def read_target(runner: Runner, dataset: str, caps: ops.Caps) -> ChainRecord:
    props = FLAGS_PROPERTY + (",encryption" if caps.raw else "")
    result = runner.run(["zfs", "get", "-Hp", "-o", "property,value", props, dataset])
    if not result.ok:
        if "does not exist" in result.err:
            return ChainRecord(None, "off")
        check(result, runner.label, f"reading {FLAGS_PROPERTY} of {dataset}")
    values = dict(line.split("\t", 1) for line in result.out.splitlines() if "\t" in line)
    recorded = values.get(FLAGS_PROPERTY, "-").strip()
    return ChainRecord(None if recorded in ("", "-") else recorded, values.get("encryption", "off").strip())


def choose(sides: Sides, source: SourceCrypt, chain: ChainRecord, target_exists: bool) -> StreamFlags:
    """The flags of this job's stream; PermanentError when the chain's flags cannot be kept."""
    s = sides
    if source.encrypted:
        lacking = [r.label for r, c in ((s.src, s.scaps), (s.tgt, s.tcaps)) if not c.raw]
        if lacking:
            raise PermanentError(
                f"protection_groups.source_dataset {s.src_ds} is encrypted ({source.encryption}) and Zerfaux sends "
                f"an encrypted dataset only raw (zfs send -w), never as plaintext, but the ZFS on {', '.join(lacking)} "
                "cannot send or receive raw streams (no send -w or no feature@encryption): upgrade it to OpenZFS 0.8 "
                "or later, or replicate to a target that can"
            )
    wanted = StreamFlags(raw=True) if source.encrypted else StreamFlags(
        large_blocks=s.scaps.large_blocks and s.tcaps.large_blocks,
        embedded=s.scaps.embedded and s.tcaps.embedded,
        compressed=s.scaps.compressed and s.tcaps.compressed)
    if not source.encrypted:
        _note_missing(s, wanted)
    if not target_exists:
        return wanted
    seeded = StreamFlags.parse(chain.recorded) if chain.recorded else \
        StreamFlags(raw=chain.encryption not in ("off", ""))
    shown = chain.recorded or ("raw (encrypted, unrecorded)" if seeded.raw else "none (unrecorded)")
    if seeded.raw != wanted.raw:
        raise PermanentError(_raw_change(s, seeded.raw, shown))
    if wanted.raw:
        return wanted
    if seeded.large_blocks and not wanted.large_blocks:
        raise PermanentError(
            f"replica {s.tgt_ds} was seeded with large blocks (zfs send -L, {FLAGS_PROPERTY}={shown}) but the ZFS "
            "on one side cannot send or receive them now; switching -L off within a chain can zero files "
            "(OpenZFS issue 6224). Keep the flags: give both sides feature@large_blocks back, or replicate into "
            "a new replica (point replication_jobs.target_dataset at a new name)"
        )
    if wanted.large_blocks and not seeded.large_blocks:
        s.note(f"sent without -L: replica {s.tgt_ds} was seeded without large blocks ({FLAGS_PROPERTY}={shown}), "
               "and -L cannot be switched on within a chain (a new replica would get it)")
        wanted = StreamFlags(embedded=wanted.embedded, compressed=wanted.compressed)
    return wanted


def _raw_change(s: Sides, seeded_raw: bool, shown: str) -> str:
    if seeded_raw:
        return (
            f"replica {s.tgt_ds} was seeded raw from an encrypted dataset ({FLAGS_PROPERTY}={shown}), but "
            f"{s.src_ds} on {s.src.label} is not encrypted: a non-raw stream cannot continue a raw chain (IV set "
            "guid mismatch), and Zerfaux never mixes them. Keep the flags: protect the encrypted dataset again, "
            "or replicate into a new replica (point replication_jobs.target_dataset at a new name)"
        )
    return (
        f"{s.src_ds} on {s.src.label} is encrypted, but replica {s.tgt_ds} was seeded from plaintext "
        f"({FLAGS_PROPERTY}={shown}): a raw stream cannot be received on top of it, and Zerfaux never sends an "
        "encrypted dataset as plaintext. Replicate into a new replica (point replication_jobs.target_dataset at "
        "a new name) for a raw chain; the old one can then be destroyed by hand"
    )


def _note_missing(s: Sides, wanted: StreamFlags) -> None:
    missing = [what for what, on in (("large blocks (-L)", wanted.large_blocks), ("embedded data (-e)", wanted.embedded),
                                     ("compressed stream (-c)", wanted.compressed)) if not on]
    if missing:
        where = sorted({r.label for r, c in ((s.src, s.scaps), (s.tgt, s.tcaps))
                        if not (c.large_blocks and c.embedded and c.compressed)})
        s.note(f"{', '.join(missing)} not supported by this ZFS ({', '.join(where)}): sent without")


def record_argv(dataset: str, flags: StreamFlags) -> list[str]:
    return ["zfs", "set", f"{FLAGS_PROPERTY}={flags.record()}", dataset]


def receive_options(flags: StreamFlags) -> list[str]:
    """``zfs receive -o``: the seed carries its record, so no crash can leave a chain unrecorded."""
    return ["-o", f"{FLAGS_PROPERTY}={flags.record()}"]
