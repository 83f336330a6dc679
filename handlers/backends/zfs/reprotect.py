"""Reprotect, failback and commit storage operations (issue 14) on a ZFS host over SSH.

Placeholder bodies: the real ones land in the next commits (docs/recovery.md, "Reprotect and
reverse replication: storage").
"""

from __future__ import annotations

import threading

from handlers.recovery.failover_backends import CommonSnapshot, KeptChanges
from handlers.types import SSHEndpoint


class ReprotectStorage:
    def newest_common_snapshot(self, a: SSHEndpoint, a_ds: str, b: SSHEndpoint, b_ds: str,
                               stop: threading.Event) -> CommonSnapshot | None:
        raise NotImplementedError

    def snapshots_after(self, target: SSHEndpoint, ds: str, snapshot: str, stop: threading.Event) -> tuple[str, ...]:
        raise NotImplementedError

    def keep_changes(self, target: SSHEndpoint, ds: str, common: str, tag: str, run_id: str,
                     stop: threading.Event) -> KeptChanges:
        raise NotImplementedError

    def discard_changes(self, target: SSHEndpoint, ds: str, common: str, stop: threading.Event) -> tuple[str, ...]:
        raise NotImplementedError

    def load_key(self, target: SSHEndpoint, ds: str, key_secret: str, stop: threading.Event) -> bool:
        raise NotImplementedError

    def set_readonly(self, target: SSHEndpoint, ds: str, on: bool, stop: threading.Event) -> bool:
        raise NotImplementedError

    def destroy_snapshot(self, target: SSHEndpoint, snapshot: str, run_id: str, stop: threading.Event) -> bool:
        raise NotImplementedError

    def replace_with_clone(self, target: SSHEndpoint, ds: str, clone: str, tag: str,
                           stop: threading.Event) -> dict[str, str]:
        raise NotImplementedError
