"""``ZFSReplicationReal``: ZFS replication over SSH that never destroys data.

The algorithm is in docs/replication.md. In short: validate every value, connect with pinned
host keys, learn what each ZFS can do (cached per host), resume a partial receive if there is
one, refuse a diverged target, snapshot the source (a retry reuses the job's snapshot), hold the
base, send incrementally from the newest common snapshot through the listener, verify the
target has the snapshot by GUID, release holds, prune only our own snapshots. Here: the
connections; the attempt itself is zfs/attempt.py.
"""

from __future__ import annotations

import shutil
import threading
from contextlib import ExitStack
from functools import partial


from handlers.backends.zfs import ops
from handlers.backends.zfs.attempt import Attempt
from handlers.backends.zfs.connections import SessionPool, SharedConnections, receive_lock
from handlers.backends.zfs.exec import LocalRunner, ParamikoRunner, Runner
from handlers.backends.zfs.retention import Creation, zfs_creation
from handlers.backends.zfs.sides import Sides
from handlers.backends.zfs.ssh import KeyFiles, Peer, sweep_stale_key_dirs
from handlers.backends.zfs.stopping import interrupted
from handlers.backends.zfs.stream import Links, Transfer
from handlers.backends.zfs.tree import TreeAttempt
from handlers.backends.zfs.validate import check_cipher, parse_host_key, validate_request
from handlers.errors import PermanentError
from handlers.replication import ProgressSink, ReplicationOutcome, ReplicationRequest
from handlers.secrets import SecretResolver
from handlers.throttle import THROTTLES, Throttles
from handlers.types import SSHEndpoint


def missing_tools() -> list[str]:
    """Programs the real backend cannot work without (syncoid is checked when a job asks for it)."""
    return [tool for tool in ("ssh",) if shutil.which(tool) is None]


class ZFSReplicationReal:
    def __init__(self, secrets: SecretResolver, cipher: str = "aes128-gcm@openssh.com",
                 creation: Creation = zfs_creation, throttles: Throttles = THROTTLES) -> None:
        self._secrets = secrets
        self._throttles = throttles
        self._cipher = check_cipher(cipher)
        self._creation = creation  # what retention grids read as a snapshot's creation (retention.py)
        self.sessions = SessionPool()
        self.shared = SharedConnections()
        sweep_stale_key_dirs()

    def close(self) -> None:
        """Close the SSH sessions and masters kept between replications (key files live for one call)."""
        self.sessions.close()
        self.shared.close()

    def replicate(self, request: ReplicationRequest, progress: ProgressSink, cancel: threading.Event) -> ReplicationOutcome:
        validate_request(request)  # before anything runs or connects
        if cancel.is_set():
            raise interrupted(cancel, "before the replication started")
        target = self._peer(request.target, "replication_targets.ssh")
        source = self._peer(request.source, "protection_groups.source_ssh") if request.source else None
        with ExitStack() as stack, receive_lock(request.target, request.target_dataset, cancel):
            files = KeyFiles()
            stack.callback(files.close)
            target_client, source_client = self.sessions.checkout_both(target, source, self._cipher)
            clients = [(target, target_client)] + ([(source, source_client)] if source and source_client else [])
            try:
                if source_client is None and shutil.which("zfs") is None:
                    raise PermanentError("protection_groups.source_ssh_host is empty (a local source) "
                                         "but zfs is not installed here")
                links = Links(self._cipher, files, self.shared, target, source, target_client, source_client,
                              self._throttles.bucket(request.target_id) if request.target_id else None)
                outcome = self._attempt(request, links, progress, cancel, self._creation).execute()
            except BaseException:
                for _, client in clients:
                    client.close()  # a session in an unknown state is not lent again
                raise
            for peer, client in clients:
                self.sessions.checkin(peer, self._cipher, client)
            return outcome

    @staticmethod
    def _attempt(request: ReplicationRequest, links: Links, progress: ProgressSink,
                 cancel: threading.Event, creation: Creation) -> Attempt | TreeAttempt:
        tgt: Runner = ParamikoRunner(links.target_client, links.target)
        src: Runner = (ParamikoRunner(links.source_client, links.source) if links.source_client and links.source
                       else LocalRunner())
        src_ds, tgt_ds = request.source_dataset, request.target_dataset
        scaps, tcaps = ops.parallel(partial(ops.capabilities, src, src_ds.split("/")[0]),
                                    partial(ops.capabilities, tgt, tgt_ds.split("/")[0]))
        sides = Sides(src, tgt, src_ds, tgt_ds, scaps, tcaps)
        if request.recursive:  # the dataset and every child: zfs/tree.py
            return TreeAttempt(request, sides, lambda child: Transfer(request.job_id, request.transport, child,
                                                                      links, cancel), progress, cancel, creation)
        return Attempt(request, sides, Transfer(request.job_id, request.transport, sides, links, cancel),
                       progress, cancel, creation)

    def _peer(self, endpoint: SSHEndpoint, field: str) -> Peer:
        key = self._secrets.resolve(endpoint.key_secret, f"{field}_key_secret")
        return Peer(endpoint, parse_host_key(endpoint.host_key, f"{field}_host_key"), key, field)



