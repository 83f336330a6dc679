"""The send-stream counter on hand-made streams: record layout, payloads skipped, both byte orders."""

from __future__ import annotations

import struct

import pytest

from handlers.backends.zfs.stream_count import BEGIN, END, FREE, MAGIC, OBJECT, RECORD, WRITE, WRITE_BYREF, \
    StreamCounter, StreamError


def record(order: str, kind: int, fields: dict[int, tuple[str, int]] | None = None, payloadlen: int = 0) -> bytearray:
    rec = bytearray(RECORD)
    struct.pack_into(order + "II", rec, 0, kind, payloadlen)
    for at, (fmt, value) in (fields or {}).items():
        struct.pack_into(order + fmt, rec, at, value)
    return rec


def stream(order: str) -> bytes:
    parts = [record(order, BEGIN, {8: ("Q", MAGIC)}),
             record(order, OBJECT, {28: ("I", 13)}), b"b" * 16,  # bonus of 13 bytes, padded to 16
             record(order, WRITE, {32: ("Q", 4096)}), b"\xee" * 4096,
             record(order, FREE), record(order, WRITE, {32: ("Q", 512)}), b"\x01" * 512,
             record(order, END)]
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("chunk", [1, 7, 312, 100000])
def test_counts_the_data_of_write_records_in_any_chunking(order: str, chunk: int) -> None:
    data, counter = stream(order), StreamCounter()
    for i in range(0, len(data), chunk):
        counter.feed(data[i:i + chunk])
    assert (counter.data_bytes, counter.records, counter.ended) == (4608, 6, True)


def test_refuses_what_it_cannot_count() -> None:
    with pytest.raises(StreamError, match="BEGIN"):
        StreamCounter().feed(b"\0" * 400)
    deduped = bytes(record("<", BEGIN, {8: ("Q", MAGIC)})) + bytes(record("<", WRITE_BYREF))
    with pytest.raises(StreamError, match="deduplicated"):
        StreamCounter().feed(deduped)
    with pytest.raises(StreamError, match="after the END"):
        StreamCounter().feed(stream("<") + bytes(record("<", FREE)))
