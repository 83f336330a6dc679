"""Stream decisions without ZFS: the chain's flags, wire compression, cursors as bases, capability parsing."""

from __future__ import annotations

from typing import Any, cast

import pytest

from handlers.backends.zfs import caps, wire
from handlers.backends.zfs.bookmarks import cursor_prefix, ref, with_cursors
from handlers.backends.zfs.exec import Result, Runner
from handlers.backends.zfs.flags import ChainRecord, SourceCrypt, StreamFlags, choose
from handlers.backends.zfs.ops import Caps
from handlers.backends.zfs.plan import Snap, plan
from handlers.backends.zfs.sides import Sides
from handlers.errors import PermanentError

OPENZFS = Caps(resume=True, estimate=True, written=True, userrefs=True, large_blocks=True, embedded=True,
               compressed=True, raw=True, bookmarks=True, tools=frozenset({"zstd", "lz4"}))
FUSE = Caps(resume=False, estimate=False, written=False, userrefs=True, tools=frozenset({"zstd"}))


class Host:
    def __init__(self, label: str) -> None:
        self.label, self.cache_key = label, label


def sides(scaps: Caps, tcaps: Caps) -> Sides:
    return Sides(cast(Runner, Host("src")), cast(Runner, Host("dr")), "tank/vm", "dr/vm", scaps, tcaps)


PLAIN, ENCRYPTED = SourceCrypt("off"), SourceCrypt("aes-256-gcm")
NEW = ChainRecord(None, "off")


def test_openzfs_both_sides_get_large_embedded_compressed() -> None:
    flags = choose(sides(OPENZFS, OPENZFS), PLAIN, NEW, target_exists=False)
    assert flags.send_args() == ["-L", "-e", "-c"] and flags.record() == "L,e,c"


def test_zfs_fuse_falls_back_and_says_so() -> None:
    s = sides(OPENZFS, FUSE)
    assert choose(s, PLAIN, NEW, target_exists=False).send_args() == []
    assert any("not supported by this ZFS (dr)" in n for n in s.notes), s.notes


def test_encrypted_is_raw_or_refused() -> None:
    assert choose(sides(OPENZFS, OPENZFS), ENCRYPTED, NEW, False).send_args() == ["-w"]
    with pytest.raises(PermanentError, match=r"never as plaintext.*ZFS on dr"):
        choose(sides(OPENZFS, FUSE), ENCRYPTED, NEW, False)


@pytest.mark.parametrize("source,chain,words", [
    (PLAIN, ChainRecord("raw", "aes-256-gcm"), "seeded raw"),
    (PLAIN, ChainRecord(None, "aes-256-gcm"), "seeded raw"),  # unrecorded, but encrypted: a raw chain
    (ENCRYPTED, ChainRecord("L,e,c", "off"), "seeded from plaintext"),
])
def test_raw_never_changes_within_a_chain(source: SourceCrypt, chain: ChainRecord, words: str) -> None:
    with pytest.raises(PermanentError, match=words) as refused:
        choose(sides(OPENZFS, OPENZFS), source, chain, target_exists=True)
    assert "new replica" in str(refused.value)


def test_large_blocks_never_change_within_a_chain() -> None:
    no_l = Caps(**{**OPENZFS.__dict__, "large_blocks": False})
    with pytest.raises(PermanentError, match="issue 6224"):
        choose(sides(OPENZFS, no_l), PLAIN, ChainRecord("L,e,c", "off"), target_exists=True)
    s = sides(OPENZFS, OPENZFS)
    kept = choose(s, PLAIN, ChainRecord("none", "off"), target_exists=True)
    assert kept.send_args() == ["-e", "-c"] and any("sent without -L" in n for n in s.notes)


def test_flags_round_trip_their_record() -> None:
    for flags in (StreamFlags(raw=True), StreamFlags(True, True, True, True), StreamFlags(large_blocks=True),
                  StreamFlags()):
        assert StreamFlags.parse(flags.record()).send_args() == flags.send_args()


def test_wire_skips_compressed_streams_and_picks_zstd() -> None:
    s = sides(OPENZFS, OPENZFS)
    assert wire.choose(s, "auto", StreamFlags(compressed=True), "ssh") is None
    assert wire.choose(s, "zstd", StreamFlags(raw=True), "ssh") is None
    assert any("already compressed (raw)" in n for n in s.notes)
    assert wire.choose(s, "auto", StreamFlags(), "paramiko") == wire.Wire("zstd")
    fuse = sides(FUSE, FUSE)
    assert wire.choose(fuse, "lz4", StreamFlags(), "ssh") is None
    assert any("lz4 is not installed on src, dr" in n for n in fuse.notes)
    assert wire.choose(fuse, "off", StreamFlags(), "ssh") is None


def test_wire_stages_keep_the_sender_failure() -> None:
    argv = wire.Wire("lz4").sending(["zfs", "send", "tank/vm@a b"])
    assert argv[:3] == ["bash", "-o", "pipefail"] and argv[-1] == "zfs send 'tank/vm@a b' | lz4 -1 -q -c"


def test_a_cursor_is_a_base_when_its_snapshot_is_gone() -> None:
    a = Snap("zerfaux_aaaaaaaaaaaa_20260101T000000Z", 11, 10)
    new = Snap("zerfaux_bbbbbbbbbbbb_20260102T000000Z", 22, 20)
    cursor = Snap("#" + cursor_prefix("dr:22/dr/vm") + a.name, 11, 10)
    decided = plan(with_cursors([new], [cursor]), [Snap(a.name, 11, 99)], new, "dr/vm")
    assert decided.action == "incremental" and decided.base_name == cursor.name
    assert ref("tank/vm", cursor.name) == "tank/vm" + cursor.name
    # The snapshot itself wins over its bookmark while it exists.
    assert with_cursors([a, new], [cursor]) == [a, new]


def result(out: str = "", err: str = "", rc: int = 0) -> Result:
    return Result((), rc, out, err)


def test_capability_parsing() -> None:
    features = caps.parse_features(result("feature@large_blocks\tenabled\nfeature@bookmarks\tactive\n"
                                          "feature@encryption\tdisabled\n"))
    assert features == {"large_blocks", "bookmarks"}
    assert caps.parse_features(result(err="bad property list", rc=2)) == frozenset()
    assert caps.stream_flags({"L", "c", "w", "e"}, features) == (True, False, False, False)
    assert caps.parse_bookmark_usage(result(err="usage:\n\tbookmark <snapshot|bookmark> <newbookmark>\n", rc=2))
    assert not caps.parse_bookmark_usage(result(err="unrecognized command 'bookmark'\n", rc=2))
    assert caps.parse_tools(result("zstd\nmbuffer\nother\n")) == {"zstd", "mbuffer"}


def test_caps_defaults_keep_old_constructors_working() -> None:
    old: Any = Caps(resume=True, estimate=True, written=True, userrefs=True)
    assert not (old.raw or old.bookmarks or old.large_blocks) and old.tools == frozenset()
