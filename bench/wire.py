"""Wire compression and mbuffer as pipe stages: cost (MB/s through compress | decompress) and gain (ratio).

``python -m bench.wire [--mib 64]``. Two inputs made here: a VM image of text and zeros (log-like
lines and runs of zero blocks, what a guest's disk mostly holds) and random bytes (media, or an
already compressed guest). Each codec runs exactly as zfs/wire.py runs it (``zstd -1 -T1`` /
``lz4 -1``, then ``-d``), between ``cat`` and ``wc -c``; the baseline is the same pipeline with
no stage. For a link of L MB/s the stream moves at min(pipeline MB/s, L x ratio): printed for
200 Mbit/s (25 MB/s) and for this machine's loopback ssh (about 300 MB/s, FACTS). mbuffer has
no latency to hide here: only its cost is measured. The last line is ``RATIO``: the lz4
pipeline's throughput on random data against the bare pipeline (what 'auto' costs at worst).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import time

MiB = 1 << 20
LINKS = {"200 Mbit/s": 25.0, "loopback ssh": 300.0}
STAGES = {
    "none": [],
    "lz4": ["lz4 -1 -q -c", "lz4 -d -q -c"],
    "zstd": ["zstd -1 -q -c -T1", "zstd -d -q -c"],
    "mbuffer": ["mbuffer -q -s 128k -m 16M"],
}


def text_and_zeros(path: str, mib: int) -> None:
    rng = random.Random(7)
    words = ["kernel", "eth0", "systemd", "GET", "/api/v1/orders", "200", "404", "user", "session", "disk",
             "INFO", "WARN", "ERROR", "connection", "timeout", "backup", "vmware-tools", "nginx"]
    with open(path, "wb") as fh:
        for block in range(mib):
            if block % 2:
                fh.write(bytes(MiB))
                continue
            lines = []
            size = 0
            while size < MiB:
                line = f"2026-11-{rng.randint(1, 30):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} " + \
                    " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + f" id={rng.randint(0, 99999)}\n"
                lines.append(line)
                size += len(line)
            fh.write("".join(lines).encode()[:MiB])


def run(path: str, stages: list[str]) -> tuple[float, int]:
    """Seconds through ``cat path | stages... | wc -c``, and the bytes after the first stage (the wire)."""
    first = stages[:1]
    wire = subprocess.run(["bash", "-c", " | ".join([f"cat {path}", *first, "wc -c"])],
                          capture_output=True, check=True)
    started = time.monotonic()
    subprocess.run(["bash", "-o", "pipefail", "-c", " | ".join([f"cat {path}", *stages, "wc -c"])],
                   capture_output=True, check=True)
    return time.monotonic() - started, int(wire.stdout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zerfaux-bench-wire-") as tmp:
        inputs = {"text+zeros": os.path.join(tmp, "image"), "random": os.path.join(tmp, "random")}
        text_and_zeros(inputs["text+zeros"], args.mib)
        with open(inputs["random"], "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(MiB))
        speeds: dict[tuple[str, str], float] = {}
        for data, path in inputs.items():
            size = os.path.getsize(path)
            for name, stages in STAGES.items():
                seconds, wire = min(run(path, stages) for _ in range(args.rounds))
                ratio = size / wire if wire else 0.0
                speed = size / MiB / seconds
                speeds[(data, name)] = speed
                links = ", ".join(f"{link} -> {min(speed, rate * ratio):.0f} MB/s" for link, rate in LINKS.items())
                print(f"{data:10s} {name:8s} ratio {ratio:6.2f}  pipeline {speed:7.0f} MB/s  ({links})")
    ratio = speeds[("random", "lz4")] / speeds[("random", "none")]
    print(f"RATIO {ratio:.3f} lz4 pipeline throughput on random data vs the bare pipeline, "
          f"{args.mib} MiB, best of {args.rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
