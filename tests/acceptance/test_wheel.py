"""The wheel, installed outside the checkout, migrates an empty database and runs a stub job.

The wheel is built from a copy of what the build reads (so nothing is written into the
checkout) with pip, its build backend from PyPI as `pip install .` would fetch it. The fresh
venv borrows the test venv's third-party packages through a path entry (its ``.pth`` files,
among them the editable install of this checkout, are not run that way), and every command
runs from a directory outside the checkout: only the installed wheel can supply ``listener``
and the SQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.support.engine import ROOT
from tests.support.pg import Database

BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "listener", "handlers", "supabase")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_the_installed_wheel_migrates_an_empty_database_and_runs_a_stub_job(empty_db: Database, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in BUILD_INPUTS:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(source)],
         cwd=tmp_path)
    [wheel] = wheels.glob("zerfaux-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python, zerfaux = venv / "bin" / "python", venv / "bin" / "zerfaux"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ZERFAUX_", "DATABASE_URL", "SUPABASE_", "PYTHON"))}
    env.update({"DATABASE_URL": empty_db.url, "ZERFAUX_STUB_SECONDS": "0", "ZERFAUX_SWEEP_SECONDS": "0.5"})
    where = _run([str(python), "-c", "import listener, zerfaux_sql; print(listener.__file__)"], cwd=work, env=env)
    assert where.strip().startswith(str(site)), where  # the wheel's listener, not the checkout's

    out = _run([str(zerfaux), "migrate", "--seed"], cwd=work, env=env)
    shipped = sorted(p.name for p in (ROOT / "supabase" / "migrations").glob("*.sql"))
    assert f"{len(shipped)} migration(s) applied" in out, out
    recorded = [r["version"] for r in empty_db.sql("select version from supabase_migrations.schema_migrations order by 1")]
    assert recorded == [name.split("_", 1)[0] for name in shipped]
    assert empty_db.value("select count(*) from protection_groups where name = 'gold'") == 1  # the seed

    job = empty_db.value("insert into replication_jobs (protection_group_id)"
                         " select id from protection_groups where name = 'gold' returning id")
    out = _run([str(zerfaux), "run", "--until-idle"], cwd=work, env=env, timeout=120)
    row = empty_db.one("select status, snapshot_name, error from replication_jobs where id = %s", (job,))
    assert row["status"] == "completed" and row["snapshot_name"] and row["error"] is None, (row, out)
    assert empty_db.value("select result ->> 'mode' from zerfaux.operations where subject_id = %s", (job,)) == "stub"
