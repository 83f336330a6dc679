"""The ``syncoid`` transport: syncoid moves the stream, Zerfaux keeps every decision.

Planning, divergence checks, holds and retention happen before and after, exactly as for the
other transports; syncoid is only asked to send up to our snapshot. It always gets
``--no-rollback`` (its default receive uses ``-F``, which has destroyed users' replicas) and
``--no-sync-snap`` (our snapshot is the one to send), never ``--force-delete``. Bytes come from
``pv -n -b`` (numeric byte counts, one a line) through syncoid's ``--pv-options``.

syncoid has one set of SSH options for both ends, so with the source over SSH the two hosts must
listen on the same port; both keys are offered (``IdentityFile`` twice) and both pinned host
keys are in the one known_hosts file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from handlers.backends.zfs.ssh import KeyFiles, Peer, classify_ssh_failure, host_key_algorithms
from handlers.backends.zfs.stopping import interrupted
from handlers.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 24 * 3600.0


def syncoid_argv(
    source: str, target: str, target_peer: Peer, source_peer: Peer | None, files: KeyFiles,
    cipher: str, resume: bool, send_options: str = "", recv_options: str = "u",
) -> list[str]:
    if source_peer is not None and source_peer.endpoint.port != target_peer.endpoint.port:
        raise PermanentError(
            "the syncoid transport uses one SSH port for both hosts, but protection_groups.source_ssh_port "
            f"({source_peer.endpoint.port}) differs from replication_targets.ssh_port "
            f"({target_peer.endpoint.port}): set replication_targets.transport to ssh or paramiko"
        )
    argv = [
        "syncoid", "--no-sync-snap", "--no-rollback", "--no-stream", "--no-privilege-elevation",
        "--no-clone-handling", "--compress=none", f"--recvoptions={recv_options}", "--pv-options=-n -b -i 0.5",
        f"--sshport={target_peer.endpoint.port}", f"--sshcipher={cipher}",
    ]
    if not resume:
        argv.append("--no-resume")
    if send_options:
        argv.append(f"--sendoptions={send_options}")  # the chain's flags (zfs/flags.py), raw above all
    options = files.ssh_options(target_peer, cipher)
    if source_peer is not None:
        options += [o for o in files.ssh_options(source_peer, cipher) if o.startswith("IdentityFile=")]
    for option in options:
        if option.startswith(("Ciphers=", "LogLevel=")):
            continue  # --sshcipher sets the cipher; syncoid parses ssh's stderr itself
        if option.startswith("HostKeyAlgorithms=") and source_peer is not None:
            # Both host key types must be acceptable when the two hosts use different ones.
            kinds = {target_peer.pinned.key_type, source_peer.pinned.key_type}
            option = "HostKeyAlgorithms=" + ",".join(host_key_algorithms(k) for k in sorted(kinds))
        argv.append(f"--sshoption={option}")
    argv += [source, target]
    return argv


def run_syncoid(
    argv: list[str], target_peer: Peer, on_bytes: Callable[[int], None], cancel: threading.Event,
) -> int:
    """Run syncoid; returns the bytes pv counted (0 when pv is absent)."""
    if shutil.which("syncoid") is None:
        raise PermanentError("the syncoid transport needs syncoid on PATH: apt-get install sanoid")
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True) as proc:
        return_code, text, counted = _watch(proc, on_bytes, cancel)
    if return_code != 0:
        ssh_fault = classify_ssh_failure(text, target_peer)
        if ssh_fault is not None:
            raise ssh_fault
        if "CRITICAL" in text and ("destroy" in text or "diverged" in text or "modified" in text):
            raise PermanentError(f"syncoid refused: {text[-800:]}")
        raise TransientError(f"syncoid exited {return_code}: {text[-800:]}")
    log.debug("syncoid done: %s", text[-400:])
    return counted


def _watch(proc: subprocess.Popen[bytes], on_bytes: Callable[[int], None],
           cancel: threading.Event) -> tuple[int, str, int]:
    """Wait for syncoid, feeding pv's counts to ``on_bytes``; kill its process group on cancel."""
    assert proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    err: list[str] = []
    counted = [0]

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").strip()
            if line.isdigit():  # pv -n -b
                counted[0] = int(line)
                on_bytes(counted[0])
            elif line:
                err.append(line)

    def read_stdout() -> None:
        assert proc.stdout is not None
        out.extend(proc.stdout)

    readers = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        while proc.poll() is None:
            if cancel.wait(0.1):
                raise interrupted(cancel, f"after {counted[0]} bytes")
            if time.monotonic() > deadline:
                raise TransientError(f"syncoid did not finish within {TIMEOUT_SECONDS:.0f} s")
    finally:
        if proc.poll() is None:
            # syncoid runs its pipeline through a shell: end the whole group we started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for reader in readers:
            reader.join(5)
    text = "\n".join(err + [b.decode(errors="replace").strip() for b in out if b.strip()])
    return proc.returncode, text, counted[0]
