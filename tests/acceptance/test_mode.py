"""`zerfaux mode` and the start-up check, through the real CLI in a subprocess."""

from __future__ import annotations

import signal
import subprocess

from tests.integration.conftest import GROUP
from tests.support.engine import spawn
from tests.support.pg import Database


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout}s:\n{out}") from None
    return proc.returncode, out


def test_a_real_listener_refuses_a_database_stubs_used_until_zerfaux_mode_real(seeded_db: Database) -> None:
    db = seeded_db
    code, out = finish(spawn(db.url, "mode"))
    assert code == 0 and "mode: not set" in out, out

    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    code, out = finish(spawn(db.url, "run", "--until-idle"))  # the embedded default's stubs
    assert code == 0, out
    assert db.value("select result ->> 'mode' from zerfaux.operations where kind = 'replication.run'") == "stub"

    db.sql("insert into replication_jobs (protection_group_id) values (%s)", (GROUP,))
    code, out = finish(spawn(db.url, "run", "--until-idle", env={"ZERFAUX_USE_STUBS": "false"}))
    assert code == 6, out
    assert "stub database" in out and "ZERFAUX_USE_STUBS" in out and "zerfaux mode real" in out, out
    assert db.value("select status from replication_jobs order by created_at desc limit 1") == "pending"

    code, out = finish(spawn(db.url, "mode"))
    assert code == 0 and out.strip().startswith("mode: stub"), out
    code, out = finish(spawn(db.url, "mode", "real"))
    assert code == 0 and "mode: stub -> real" in out and "stub listeners refuse" in out, out
    assert db.value("select zerfaux.database_mode()") == "real"

    # Now the real listener starts (the seed's hosts are made up: give it no job to try on them).
    db.sql("delete from replication_jobs where status = 'pending'")
    code, out = finish(spawn(db.url, "run", "--until-idle", env={"ZERFAUX_USE_STUBS": "false"}))
    assert code == 0, out
    assert "(real backends" in out, out
    # ... and a stub listener is the one refused.
    code, out = finish(spawn(db.url, "run", "--until-idle"))
    assert code == 6 and "real database" in out and "ZERFAUX_USE_STUBS=false" in out, out


def test_zerfaux_mode_refuses_a_word_that_is_not_a_mode(db: Database) -> None:
    code, out = finish(spawn(db.url, "mode", "prod"))
    assert code == 2 and "invalid choice: 'prod'" in out, out
    assert db.value("select zerfaux.database_mode()") is None


def test_zerfaux_demo_on_a_real_database_stops_at_once_with_the_reason(db: Database) -> None:
    db.sql("select zerfaux.set_mode('real')")
    # Each step would wait 600 s for a listener that never started; the refusal comes first.
    code, out = finish(spawn(db.url, "demo", "--timeout", "600"), timeout=90)
    assert code == 6 and "real database" in out and "zerfaux mode stub" in out, out
    assert db.value("select count(*) from zerfaux.operations where status = 'succeeded'") == 0
