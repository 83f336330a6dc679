"""Count the data a ZFS send stream carries: ``written`` for a ZFS that has no such property.

zfs-fuse 0.7 (pool version 23) has no ``written`` property, no ``zfs diff`` and no ``send -nP``
(FACTS.md). What it can do is send an incremental stream; the stream's DRR_WRITE records carry
every data block that changed between the two snapshots, with its logical length. Summing
those (plus spill and embedded blocks) is what was written, in whole blocks of logical size.

A stream is a sequence of 312-byte ``dmu_replay_record`` headers, some followed by a payload
(the byte order is the sender's, told by the BEGIN record's magic). The field offsets below are
the same in the 2010 format zfs-fuse writes and in OpenZFS 2.x: newer fields were added in the
padding after them. Raw (``-w``), deduplicated (``-D``) and compound (``-R``) streams are not
counted: this is only ever fed ``zfs send -i a b`` of one dataset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RECORD = 312
MAGIC = 0x2F5BACBAC
BEGIN, OBJECT, FREEOBJECTS, WRITE, FREE, END, WRITE_BYREF, SPILL, WRITE_EMBEDDED, OBJECT_RANGE, REDACT = range(11)


class StreamError(ValueError):
    """The bytes are not a send stream this counter understands."""


def _round8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class StreamCounter:
    """Feed chunks in order; ``data_bytes`` is the sum of the data blocks seen so far."""

    data_bytes: int = 0
    records: int = 0
    ended: bool = False
    _order: str = ""
    _buf: bytearray = field(default_factory=bytearray)
    _skip: int = 0  # payload bytes still to pass over

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            need = RECORD - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == RECORD:
                self._record(bytes(self._buf))
                self._buf.clear()

    def _u32(self, rec: bytes, at: int) -> int:
        return int(struct.unpack_from(self._order + "I", rec, at)[0])

    def _u64(self, rec: bytes, at: int) -> int:
        return int(struct.unpack_from(self._order + "Q", rec, at)[0])

    def _record(self, rec: bytes) -> None:
        if not self._order:
            for order in ("<", ">"):
                if struct.unpack_from(order + "I", rec, 0)[0] == BEGIN and \
                        struct.unpack_from(order + "Q", rec, 8)[0] == MAGIC:
                    self._order = order
                    break
            else:
                raise StreamError("the stream does not start with a ZFS BEGIN record")
        if self.ended:
            raise StreamError("data after the END record (a compound stream?)")
        kind, payload = self._u32(rec, 0), self._u32(rec, 4)
        self.records += 1
        if kind == BEGIN:
            self._skip = payload  # an nvlist in newer streams; 0 in zfs-fuse's
        elif kind == OBJECT:
            self._skip = _round8(self._u32(rec, 28))  # drr_bonuslen: the dnode's bonus buffer
        elif kind == WRITE:
            logical = self._u64(rec, 32)  # drr_logical_size
            compressed = self._u64(rec, 96) if rec[50] else 0  # drr_compressiontype, drr_compressed_size
            self.data_bytes += logical
            self._skip = compressed or logical
        elif kind == SPILL:
            length = self._u64(rec, 16)
            self.data_bytes += length
            self._skip = length
        elif kind == WRITE_EMBEDDED:
            self.data_bytes += self._u32(rec, 48)  # drr_lsize
            self._skip = _round8(self._u32(rec, 52))  # drr_psize
        elif kind == END:
            self.ended = True
        elif kind in (FREEOBJECTS, FREE, OBJECT_RANGE, REDACT):
            self._skip = payload
        elif kind == WRITE_BYREF:
            raise StreamError("a deduplicated stream (DRR_WRITE_BYREF) cannot be counted")
        else:
            raise StreamError(f"unknown record type {kind} in the stream")
