"""One pyVmomi session per vCenter, shared by every operation, and the translation of its faults.

pyVmomi blocks; the handlers call these backends through ``asyncio.to_thread``, so several
threads may use one session at once. pyVmomi's SOAP stub keeps a locked pool of HTTP
connections, so sharing a ``ServiceInstance`` between threads is safe; what needs our own lock is
logging in, so two threads do not open two sessions for one vCenter.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartStubAdapter
from pyVmomi import vim, vmodl

from handlers.errors import HandlerError, PermanentError, TransientError
from handlers.secrets import SecretResolver
from handlers.types import VCenterEndpoint

log = logging.getLogger(__name__)

CA_BUNDLE_ENV = "ZERFAUX_VCENTER_CA_BUNDLE"
T = TypeVar("T")

# Faults a later attempt can get past: the vCenter or a host is busy, restarting or slow.
_TRANSIENT_FAULTS: tuple[type[BaseException], ...] = (
    vim.fault.Timedout,
    vim.fault.TaskInProgress,
    vim.fault.ResourceInUse,
    vim.fault.NotAuthenticated,
    vmodl.fault.HostCommunication,
    vmodl.fault.SystemError,
    vmodl.fault.RequestCanceled,
)


def name_list(names: Sequence[str], limit: int = 12) -> str:
    """``'a', 'b' and 40 more``: what exists, short enough for an error column."""
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def fault_text(fault: BaseException) -> str:
    """The words of a vim/vmodl fault: its ``msg`` when the server sent one, else its type."""
    msg = getattr(fault, "msg", None) or ""
    kind = type(fault).__name__
    if not msg:
        for item in getattr(fault, "faultMessage", None) or []:
            msg = getattr(item, "message", "") or msg
    return f"{kind}: {msg}" if msg else kind


def where(endpoint: VCenterEndpoint) -> str:
    return f"vCenter {endpoint.name!r} ({endpoint.host}:{endpoint.port})"


@contextmanager
def translate(endpoint: VCenterEndpoint) -> Iterator[None]:
    """Turn what pyVmomi, ssl and sockets raise into ``PermanentError`` / ``TransientError``."""
    try:
        yield
    except HandlerError:
        raise
    except vim.fault.HostConnectFault as exc:
        # pyVmomi's login wraps a socket or TLS error in HostConnectFault; judge the cause.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, Exception) and not isinstance(cause, vmodl.MethodFault):
            with translate(endpoint):
                raise cause from exc
        raise TransientError(f"{where(endpoint)} cannot be reached: {fault_text(exc)}") from exc
    except vim.fault.InvalidLogin as exc:
        raise PermanentError(
            f"authentication failed for {endpoint.username}@{endpoint.host}:{endpoint.port} "
            f"({endpoint.name!r}): check vcenters.username and the secret named by "
            f"vcenters.password_secret ({endpoint.password_secret!r})"
        ) from exc
    except vmodl.fault.ManagedObjectNotFound as exc:
        obj = getattr(exc, "obj", None)
        ref = getattr(obj, "_moId", None) or "an object"
        raise PermanentError(
            f"{ref} no longer exists at {where(endpoint)}: sync the vCenter (vcenters.sync_requested_at) "
            "and fix the reference"
        ) from exc
    except vim.fault.FileNotFound as exc:
        raise PermanentError(
            f"file {getattr(exc, 'file', '') or '?'} not found at {where(endpoint)}: "
            "replicate the VM's disks to the DR datastore first"
        ) from exc
    except _TRANSIENT_FAULTS as exc:
        raise TransientError(f"{where(endpoint)} is busy or unavailable: {fault_text(exc)}") from exc
    except (vim.fault.VimFault, vmodl.MethodFault) as exc:
        raise PermanentError(f"{where(endpoint)} refused the request: {fault_text(exc)}") from exc
    except ssl.SSLCertVerificationError as exc:
        reason = getattr(exc, "verify_message", None) or str(exc)
        raise PermanentError(
            f"TLS verification of {where(endpoint)} failed ({reason}): give the CA that "
            f"signed its certificate in {CA_BUNDLE_ENV} (a PEM bundle), or set vcenters.verify_tls = "
            "false for this vCenter to skip verification"
        ) from exc
    except (TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise TransientError(f"{where(endpoint)} cannot be reached: {reason}") from exc


class CachedServiceInstance(vim.ServiceInstance):  # type: ignore[misc,name-defined]
    """A ``ServiceInstance`` whose ``content`` is fetched once per session, not on every use.

    pyVmomi's ``si.content`` is a ``RetrieveServiceContent`` round trip each time it is read; the
    ServiceContent (the managers' references, the root folder) does not change during a session,
    and a new login (``VCenterSessions.run`` after ``NotAuthenticated``) makes a new instance.
    ``memo`` keeps short-lived lookups for the session.
    """

    @property
    def content(self) -> Any:
        cached = self.__dict__.get("_zf_content")
        if cached is None:
            cached = vim.ServiceInstance.content.fget(self)  # type: ignore[attr-defined]
            object.__setattr__(self, "_zf_content", cached)
        return cached

    def memo(self, key: Any, max_age: float, make: Callable[[], T]) -> T:
        """``make()``'s answer for ``key``, kept ``max_age`` seconds. Threads asking for the same key
        at once wait for one ``make()`` rather than each making its own; an error is not kept."""
        with _MEMO_GUARD:
            memo = self.__dict__.get("_zf_memo")
            if memo is None:
                memo = {}
                object.__setattr__(self, "_zf_memo", memo)
            locks = self.__dict__.get("_zf_locks")
            if locks is None:
                locks = {}
                object.__setattr__(self, "_zf_locks", locks)
            lock = locks.setdefault(key, threading.Lock())
        with lock:
            hit = memo.get(key)
            if hit is not None and time.monotonic() - hit[0] <= max_age:
                return hit[1]  # type: ignore[no-any-return]
            value = make()
            memo[key] = (time.monotonic(), value)
            return value


_MEMO_GUARD = threading.Lock()


@dataclass
class _Session:
    key: tuple[str, int, str, bool]  # what the session was opened with; a change opens a new one
    si: Any  # vim.ServiceInstance


class VCenterSessions:
    """Logged-in sessions, one per vCenter row, reused until ``close()``.

    ``ca_bundle`` (else ``ZERFAUX_VCENTER_CA_BUNDLE``) is a PEM file of extra trusted CAs, used
    beside the system's; ``verify_tls = false`` on a vCenter row skips verification for it alone.
    ``timeout`` bounds each SOAP request in seconds.
    """

    def __init__(
        self,
        secrets: SecretResolver,
        ca_bundle: str | None = None,
        timeout: float = 60.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self._secrets = secrets
        self._ca_bundle = ca_bundle or env.get(CA_BUNDLE_ENV) or None
        self._timeout = timeout
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def run(self, endpoint: VCenterEndpoint, work: Callable[[Any], T]) -> T:
        """``work(service_instance)`` on this vCenter's session, faults translated.

        A session the server forgot (``NotAuthenticated``: expired, vCenter restarted) is
        replaced by a new login and ``work`` runs once more, so ``work`` must be safe to repeat.
        """
        with translate(endpoint):
            si = self._session(endpoint)
            try:
                return work(si)
            except vim.fault.NotAuthenticated:
                log.info("session to %s expired; logging in again", where(endpoint))
                self._forget(endpoint.id, si)
                si._stub.DropConnections()  # the server forgot it: nothing to log out of
                return work(self._session(endpoint))

    def close(self) -> None:
        with self._guard:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            try:
                Disconnect(session.si)
            except Exception:  # closing must never fail the shutdown
                log.debug("logout failed", exc_info=True)

    def _session(self, endpoint: VCenterEndpoint) -> Any:
        key = (endpoint.host, endpoint.port, endpoint.username, endpoint.verify_tls)
        with self._guard:
            lock = self._locks.setdefault(endpoint.id, threading.Lock())
        with lock:
            current = self._sessions.get(endpoint.id)
            if current is not None and current.key == key:
                return current.si
            if current is not None:  # the row changed host, user or TLS mode
                self._forget(endpoint.id, current.si)
                Disconnect(current.si)
            si = self._login(endpoint)
            with self._guard:
                self._sessions[endpoint.id] = _Session(key, si)
            return si

    def _forget(self, vcenter_id: str, si: Any) -> None:
        with self._guard:
            current = self._sessions.get(vcenter_id)
            if current is not None and current.si is si:
                del self._sessions[vcenter_id]

    def _login(self, endpoint: VCenterEndpoint) -> Any:
        password = self._secrets.resolve(endpoint.password_secret, "vcenters.password_secret")
        log.debug("logging in to %s as %s", where(endpoint), endpoint.username)
        # SmartConnect is exactly these steps (version negotiation, stub, Login), but when the
        # login fails it keeps the stub's socket open with no way to close it, and it stores
        # the session in a process-wide global. Doing them here fixes both.
        self._answers_in_time(endpoint)
        try:
            stub = SmartStubAdapter(
                host=endpoint.host,
                port=endpoint.port,
                sslContext=self._ssl_context(endpoint),
                httpConnectionTimeout=self._timeout,
            )
        except Exception as exc:
            if type(exc) is not Exception:  # sockets, TLS: translate() knows those
                raise
            # pyVmomi's bare Exception: no vimServiceVersions.xml (a vCenter still starting, a
            # proxy's error page, or not a vCenter at all).
            raise TransientError(
                f"{where(endpoint)} did not answer as a vSphere API endpoint ({exc}): check "
                "vcenters.host and vcenters.port, or wait for the vCenter to finish starting"
            ) from exc
        si: Any = CachedServiceInstance("ServiceInstance", stub)
        try:
            si.content.sessionManager.Login(endpoint.username, password, None)
        except BaseException:
            stub.DropConnections()
            raise
        return si

    def _answers_in_time(self, endpoint: VCenterEndpoint) -> None:
        """Ask for the version list once, bounded by the timeout, before pyVmomi does.

        pyVmomi's version negotiation opens its connection with no timeout: a vCenter that
        accepts connections and then answers nothing (hung, stopped, a black-holing middlebox)
        would hold the worker forever. Other failures are left to pyVmomi's own attempt, so
        they are worded as before.
        """
        conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=self._timeout,
                                           context=self._ssl_context(endpoint))
        try:
            conn.request("GET", "/sdk/vimServiceVersions.xml")
            conn.getresponse().read()
        except TimeoutError:
            raise TransientError(
                f"{where(endpoint)} accepted the connection but did not answer within {self._timeout:g} s "
                "(a hung or overloaded vCenter, or a firewall dropping replies): the next attempt will try again"
            ) from None
        except (OSError, http.client.HTTPException):
            pass  # refused, TLS, a proxy's page: pyVmomi's attempt below says it in words
        finally:
            conn.close()

    def _ssl_context(self, endpoint: VCenterEndpoint) -> ssl.SSLContext:
        # Always hand pyVmomi a context: given none, it silently skips verification for
        # localhost and 127.0.0.1, which would hide a wrong verify_tls setting in tests.
        if not endpoint.verify_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        context = ssl.create_default_context()
        if self._ca_bundle:
            try:
                context.load_verify_locations(cafile=self._ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise PermanentError(
                    f"the vCenter CA bundle {self._ca_bundle!r} ({CA_BUNDLE_ENV}) cannot be read as "
                    f"PEM certificates: {exc}"
                ) from exc
        return context
