"""What a host's ZFS and shell can do for the stream: send flags, pool features, bookmarks, tools.

Read by ``ops.capabilities`` (once per host, cached) from three more probes in its batch: the
pool's feature flags, ``zfs bookmark``'s usage, and ``command -v`` for the wire tools. A flag
counts only when the usage text offers it *and* the pool has the feature a receiver needs for it
(FACTS: ``-L`` needs ``large_blocks``, ``-e`` ``embedded_data``, ``-w`` ``encryption``, bookmarks
``bookmarks``): a ZFS that prints ``-L`` on a pool without the feature cannot receive it.
zfs-fuse 0.7 has none of them (no feature flags at all, pool version 23).
"""

from __future__ import annotations

from handlers.backends.zfs.exec import Result

FEATURES = ("large_blocks", "embedded_data", "encryption", "bookmarks", "lz4_compress")
TOOLS = ("zstd", "lz4", "mbuffer")


def features_argv(pool: str) -> list[str]:
    return ["zpool", "get", "-H", "-o", "property,value", ",".join(f"feature@{f}" for f in FEATURES), pool]


def parse_features(result: Result) -> frozenset[str]:
    """Features enabled or active on the pool (empty where ``zpool get`` knows no feature flags)."""
    if not result.ok:
        return frozenset()
    found = set()
    for line in result.out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].startswith("feature@") and parts[1].strip() in ("enabled", "active"):
            found.add(parts[0][len("feature@"):])
    return frozenset(found)


BOOKMARK_ARGV = ["zfs", "bookmark"]  # no arguments: OpenZFS prints its usage; zfs-fuse: unrecognized command


def parse_bookmark_usage(result: Result) -> bool:
    text = (result.out + result.err).lower()
    return "bookmark <" in text or "bookmark <snapshot" in text


TOOLS_ARGV = ["sh", "-c", "for t in " + " ".join(TOOLS) + "; do command -v $t >/dev/null 2>&1 && echo $t; done; true"]


def parse_tools(result: Result) -> frozenset[str]:
    if not result.ok:
        return frozenset()
    return frozenset(word for word in result.out.split() if word in TOOLS)


def stream_flags(send_flags: set[str], features: frozenset[str]) -> tuple[bool, bool, bool, bool]:
    """(-L, -e, -c, -w): each flag offered by ``zfs send`` and backed by the pool's feature."""
    return ("L" in send_flags and "large_blocks" in features,
            "e" in send_flags and "embedded_data" in features,
            "c" in send_flags and "lz4_compress" in features,
            "w" in send_flags and "encryption" in features)
