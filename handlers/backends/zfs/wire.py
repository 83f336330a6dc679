"""Compression on the wire (``replication_targets.wire_compression``): a pipe stage at each end.

The stream is compressed right after ``zfs send`` on the source and decompressed right before
``zfs receive`` on the target, by the ``zstd`` or ``lz4`` command where both hosts have it, so
the listener's relay (and the SSH link) carries fewer bytes whatever the transport: ``ssh`` and
``paramiko`` both run the stages as part of the remote command (paramiko does no compression of
its own; Python has no zstd or lz4 in the standard library). A stream that is already compressed
(``zfs send -c`` or a raw stream: the pool's compressed blocks) is sent as it is: compressing it
again costs CPU and saves nothing. ``bytes_transferred`` then counts the bytes on the wire.

'auto' picks zstd at level 1 where both hosts have it, else lz4, else none: on this machine's
measurements (``python -m bench.wire``, figures in docs/replication.md, *Compression on the wire*)
zstd -1 shrank a VM image of text and zeros 8.1 times (lz4: 5.1) and still ran at 270 MB/s
(lz4: 360), and on random data both ran faster than ssh carries a stream here (over 500 MB/s).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from handlers.backends.zfs.flags import StreamFlags
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.validate import WIRE_COMPRESSION

CHOICES = WIRE_COMPRESSION

_STAGES = {
    "zstd": (["zstd", "-1", "-q", "-c", "-T1"], ["zstd", "-d", "-q", "-c"]),
    "lz4": (["lz4", "-1", "-q", "-c"], ["lz4", "-d", "-q", "-c"]),
}


@dataclass(frozen=True)
class Wire:
    codec: str  # 'zstd' | 'lz4'

    def sending(self, send: Sequence[str]) -> list[str]:
        return _pipeline([list(send), _STAGES[self.codec][0]])

    def receiving(self, receive: Sequence[str]) -> list[str]:
        return _pipeline([_STAGES[self.codec][1], list(receive)])


def _pipeline(stages: list[list[str]]) -> list[str]:
    # pipefail: a failed `zfs send` must not hide behind the compressor's exit status 0.
    return ["bash", "-o", "pipefail", "-c", " | ".join(shlex.join(stage) for stage in stages)]


def choose(sides: Sides, asked: str, flags: StreamFlags, transport: str) -> Wire | None:
    """The codec for this stream, or None; says in the notes when what was asked is not used."""
    if asked == "off":
        return None
    s = sides
    if flags.already_compressed:
        if asked != "auto":
            s.note(f"wire compression {asked} skipped: the stream is already compressed "
                   f"({'raw' if flags.raw else 'zfs send -c'})")
        return None
    if transport == "syncoid":
        s.note("wire compression is not applied by the syncoid transport (it runs with --compress=none)")
        return None
    both = s.scaps.tools & s.tcaps.tools
    if asked == "auto":
        codec = next((c for c in ("zstd", "lz4") if c in both), None)
        if codec is None:
            s.note("wire compression auto: neither zstd nor lz4 is installed on both hosts: sent uncompressed")
        return Wire(codec) if codec else None
    if asked not in both:
        lacking = [r.label for r, c in ((s.src, s.scaps), (s.tgt, s.tcaps)) if asked not in c.tools]
        s.note(f"wire compression {asked} skipped: {asked} is not installed on {', '.join(lacking)}")
        return None
    return Wire(asked)
