"""Dataset trees: a recursive group against one raw pipe per dataset, and against a single dataset.

Run as root on a machine with zfs-fuse and openssh-server (Debian):
    .venv/bin/python -m bench.trees [--size-mib 128] [--children 4] [--rounds 2]

The same bytes of incompressible data are written once into a tree (a top dataset and
``--children`` children, one of them with a grandchild: every dataset holds an equal share) and once
into a single dataset. Each round replicates, into fresh target names:

* raw: for every dataset of the tree, parent first, ``zfs send DS@snap | ssh zfs receive -u``
  (fresh handshake each, the same 32 MiB pipe buffer Zerfaux uses), after one ``zfs snapshot -r``;
* Zerfaux, the tree: ``recursive=True`` with the ``ssh`` transport (a fresh backend: a new handshake);
* Zerfaux, the single dataset with the same bytes.

Best of ``--rounds``. Then one more job of each with nothing changed: the control cost per dataset
(listing, holds, verify) with no data. ``RATIO`` (last line) is the tree's throughput by Zerfaux over
the raw per-dataset pipes in the same run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace

from bench.replication import CIPHER, MB, raw_pipe, replicate_bounded, write_random, zfs
from handlers.backends.zfs.real import ZFSReplicationReal
from handlers.replication import ReplicationRequest
from handlers.secrets import SecretResolver
from handlers.types import SSHEndpoint
from tests.support.zfs import Sshd, pool, sshd_running, zfs_fuse_running


def tree_names(top: str, children: int) -> list[str]:
    """The top, its children ``c0..``, and a grandchild under ``c0``: parent before child."""
    kids = [f"{top}/c{i}" for i in range(children)]
    return [top, *kids, f"{kids[0]}/g"]


def request(sshd: Sshd, source: str, target: str, recursive: bool) -> ReplicationRequest:
    endpoint = SSHEndpoint("127.0.0.1", sshd.port, "root", "bench", sshd.host_key)
    return replace(ReplicationRequest(str(uuid.uuid4()), source, target, "ssh", endpoint, None, None, None),
                   recursive=recursive)


def fresh_backend(sshd: Sshd) -> ZFSReplicationReal:
    return ZFSReplicationReal(SecretResolver({"ZERFAUX_SECRET_BENCH": sshd.private_key}), cipher=CIPHER)


def timed_job(sshd: Sshd, source: str, target: str, recursive: bool) -> tuple[float, int]:
    backend = fresh_backend(sshd)
    try:
        start = time.monotonic()
        moved = replicate_bounded(backend, request(sshd, source, target, recursive))
        return time.monotonic() - start, moved
    finally:
        backend.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    size = args.size_mib << 20
    suffix = secrets.token_hex(3)
    with ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="zerfaux-bench-trees-")
        stack.callback(subprocess.run, ["rm", "-rf", work], check=False)
        stack.enter_context(zfs_fuse_running(work))
        src_pool = stack.enter_context(pool(f"zxts{suffix}", work, size * 3 + (512 << 20)))
        dst_pool = stack.enter_context(pool(f"zxtd{suffix}", work, size * (3 * args.rounds + 2) + (512 << 20)))
        sshd = stack.enter_context(sshd_running(work))
        key = os.path.join(sshd.directory, "user_ed25519")
        known = os.path.join(work, "known_hosts")
        with open(known, "w") as fh:
            fh.write(sshd.host_key + "\n")

        top, single = f"{src_pool}/tree", f"{src_pool}/single"
        names = tree_names(top, args.children)
        zfs("create", "-o", f"mountpoint={work}/tree", top)
        for name in names[1:]:
            zfs("create", name)
        share = size // len(names)
        print(f"writing {args.size_mib} MiB: {len(names)} datasets of {share >> 20} MiB, and one dataset ...",
              flush=True)
        for name in names:
            write_random(os.path.join(zfs("get", "-H", "-o", "value", "mountpoint", name).strip(), "disk.vmdk"),
                         share)
        zfs("create", "-o", f"mountpoint={work}/single", single)
        write_random(f"{work}/single/disk.vmdk", share * len(names))
        zfs("snapshot", "-r", f"{top}@raw")

        raw_best = tree_best = single_best = float("inf")
        moved = 0
        for n in range(args.rounds):
            start = time.monotonic()
            for name in names:
                raw_pipe(f"{name}@raw", f"{dst_pool}/raw{n}" + name[len(top):], sshd, key, known)
            raw_best = min(raw_best, time.monotonic() - start)
            seconds, moved = timed_job(sshd, top, f"{dst_pool}/tree{n}", recursive=True)
            tree_best = min(tree_best, seconds)
            single_best = min(single_best, timed_job(sshd, single, f"{dst_pool}/single{n}", recursive=False)[0])
        idle_tree = timed_job(sshd, top, f"{dst_pool}/tree0", recursive=True)[0]
        idle_single = timed_job(sshd, single, f"{dst_pool}/single0", recursive=False)[0]
        rate = moved / MB
        print(f"tree of {len(names)} datasets, {rate:.1f} MB each way, best of {args.rounds}:")
        print(f"  raw per-dataset pipes {raw_best:.2f} s ({rate / raw_best:.1f} MB/s)")
        print(f"  zerfaux tree          {tree_best:.2f} s ({rate / tree_best:.1f} MB/s)")
        print(f"  zerfaux one dataset   {single_best:.2f} s ({rate / single_best:.1f} MB/s), same bytes")
        print(f"nothing changed: tree {idle_tree:.2f} s, one dataset {idle_single:.2f} s "
              f"({(idle_tree - idle_single) / (len(names) - 1):.2f} s per extra dataset)")
        print(f"TREE/SINGLE RATIO {single_best / tree_best:.2f}")
        print(f"RATIO {raw_best / tree_best:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
