"""deploy/prometheus/zerfaux.rules.yml through Prometheus' own promtool (Debian's prometheus
package): the rules load, their unit tests pass, and they name only metrics the listener serves."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

from prometheus_client import generate_latest

from listener.metrics import Metrics
from listener.protection import GroupStatus
from listener.store import QueueState
from tests.support.require import missing

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if found is None:
        missing("promtool", "not on PATH (Debian: apt-get install prometheus; scripts/bootstrap.sh does)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules() -> None:
    done = run("check", "rules", "zerfaux.rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_each_alert_fires_on_its_series_and_not_otherwise() -> None:
    done = run("test", "rules", "zerfaux.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_catches_an_alert_that_does_not_fire(tmp_path: Path) -> None:
    """The unit tests can fail: a rule that never fires is caught."""
    rules = (RULES / "zerfaux.rules.yml").read_text()
    broken = rules.replace("(max by (group) (zerfaux_rpo_violated) == 1)", "(max by (group) (zerfaux_rpo_violated) == 2)")
    assert broken != rules
    (tmp_path / "zerfaux.rules.yml").write_text(broken)
    shutil.copy(RULES / "zerfaux.rules.test.yml", tmp_path)
    done = subprocess.run([promtool(), "test", "rules", "zerfaux.rules.test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ZerfauxRpoViolated" in done.stdout + done.stderr


def test_the_rules_name_only_metrics_the_listener_serves() -> None:
    metrics = Metrics()
    metrics.observe_queue(QueueState(queued=3, runnable=1, running=1, expired=0, next_run_after=None))

    class Sweep:
        name, connected = "sweep", True

    metrics.observe_sources([Sweep()])  # type: ignore[list-item]
    metrics.protection.groups = [GroupStatus(uuid4(), "gold", 15, datetime.now(UTC), 60.0, "ok", None, None,
                                             None, False)]
    metrics.protection.up = True
    served = set(re.findall(r"^(zerfaux_\w+)", generate_latest(metrics.registry).decode(), re.MULTILINE))
    text = (RULES / "zerfaux.rules.yml").read_text()
    named = set(re.findall(r"\b(zerfaux_\w+)", text))
    assert named and named <= served, f"not served: {sorted(named - served)}"

