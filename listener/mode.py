"""One mode per database: a database is a 'stub' or a 'real' database, never both.

Stub backends mark jobs completed, write made-up VMs over the inventory and set
``dr_shell_vm_created``; against a production database that is green while nothing is
protected. So the first listener to start records its mode in the database
(``zerfaux.claim_mode``), every later one must match it, and only ``zerfaux mode real|stub``
changes it, on purpose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from listener.store import Store

log = logging.getLogger(__name__)

_SWITCH = {"stub": "ZERFAUX_USE_STUBS=true", "real": "ZERFAUX_USE_STUBS=false"}


class ModeMismatch(RuntimeError):
    """This listener's backends are not the database's mode; the message says what to do."""


def mismatch_message(database: str, where: str) -> str:
    """Why a listener of the other mode does not start against a ``database``-mode database."""
    recorded = "recorded by the first listener that started there, or set with `zerfaux mode`"
    if database == "stub":
        return (
            f"{where} is a stub database: its mode is 'stub' ({recorded}). This listener "
            "runs real backends (ZERFAUX_USE_STUBS=false) and will not start against it. If this "
            "database is meant for real work now, run `zerfaux mode real` against it and start "
            "again (results the stubs wrote stay, marked \"mode\": \"stub\" in "
            "zerfaux.operations.result); to try Zerfaux with stubs instead, set "
            "ZERFAUX_USE_STUBS=true."
        )
    return (
        f"{where} is a real database: its mode is 'real' ({recorded}). This listener would run "
        "stub backends (ZERFAUX_USE_STUBS is true or unset, and stubs are the default), which mark "
        "jobs completed with nothing replicated and write made-up VMs over the real inventory, so "
        "it will not start. Set ZERFAUX_USE_STUBS=false to run the real backends; only if this "
        "database protects nothing real, run `zerfaux mode stub` against it."
    )


async def check_mode(store: Store, mode: str) -> None:
    """Record ``mode`` when the database has none; raise ``ModeMismatch`` when it has another."""
    recorded = await store.claim_mode(mode)
    if recorded != mode:
        raise ModeMismatch(mismatch_message(recorded, store.description))


async def watch_mode(store: Store, mode: str, every: float, changed: Callable[[ModeMismatch], None]) -> None:
    """Re-read the database's mode every ``every`` seconds; once someone changed it away from
    ``mode`` (``zerfaux mode``), call ``changed`` and end: this listener must not write another
    result of the old mode."""
    while True:
        await asyncio.sleep(every)
        try:
            recorded = await store.database_mode()
        except Exception as exc:  # an outage: the store, the sweep and /readyz report it
            log.debug("mode: could not read the database's mode: %s", exc)
            continue
        if recorded is not None and recorded != mode:
            changed(ModeMismatch(
                f"the mode of {store.description} was changed to '{recorded}' while this listener "
                f"ran {mode} backends: it stops (running work finishes or is released for another "
                f"listener); start it again with {_SWITCH[recorded]}, or set the mode back with "
                f"`zerfaux mode {mode}`"
            ))
            return


def describe(mode: str | None) -> str:
    if mode is None:
        return ("not set: the first listener to start records its own (stub by default, real "
                "with ZERFAUX_USE_STUBS=false)")
    other = "real" if mode == "stub" else "stub"
    return (f"{mode}: only listeners with {_SWITCH[mode]} start against this database; "
            f"{other} ones refuse (`zerfaux mode {other}` changes it)")


def change_message(previous: str | None, mode: str) -> str:
    if previous == mode:
        return f"mode: {mode} (unchanged)"
    before = previous or "not set"
    if mode == "real":
        effect = (
            "Listeners with real backends (ZERFAUX_USE_STUBS=false) may start now; stub listeners "
            "refuse to start. Results the stubs wrote stay (\"mode\": \"stub\" in "
            "zerfaux.operations.result): the next real inventory sync replaces stub VMs with the "
            "real ones (marking the made-up ones removed_at), and DR shells marked created by stubs "
            "exist nowhere: set needs_dr_shell again for those VMs."
        )
    else:
        effect = (
            "Listeners with stub backends (ZERFAUX_USE_STUBS=true, the default) may start now and "
            "will write made-up results into this database's rows (jobs completed, inventory, DR "
            "shells); real listeners refuse to start."
        )
    return (f"mode: {before} -> {mode}. {effect} Listeners of the old mode still running stop "
            "within ZERFAUX_SWEEP_SECONDS (what they run finishes within "
            "ZERFAUX_SHUTDOWN_GRACE_SECONDS or is released).")
