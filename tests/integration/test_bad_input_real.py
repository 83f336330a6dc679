"""Bad input at every boundary that reaches a SOAP call or a shell, through the real dispatcher
(ZERFAUX_USE_STUBS=false) against vcsim and zfs-fuse (issue 7, scenario 3).

Each odd value either arrives exactly (the DR VM's name in vcsim, its disk paths) or fails the
operation at once (attempt 1, not retried) with an error naming the column to fix, and changes
nothing else: no other row lost, no VM created, no process started, no dataset or snapshot made.
Figures: docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
from pyVmomi import vim

from tests.integration.conftest import DR, GROUP, PRIMARY, TARGET, operations
from tests.support.engine import drain, engine_settings
from tests.support.pg import Database
from tests.support.vcsim import PLACEHOLDER_DS, SOURCE_DS, Simulator
from tests.support.zfs import mountpoint
from tests.support.zfshost import ZFSHost


@dataclass
class Real:
    db: Database
    env: dict[str, str]

    async def drain(self) -> None:
        await drain(engine_settings(self.db.url, **self.env), timeout=180)


def _point_at(db: Database, secrets: Path, sims: list[tuple[str, Simulator]]) -> None:
    for vc_id, sim in sims:
        (secrets / f"{sim.name}-password").write_text(sim.password)
        db.sql("update vcenters set host = %s, port = %s, username = %s, password_secret = %s,"
               " verify_tls = true where id = %s",
               (sim.host, sim.port, sim.username, f"{sim.name}-password", vc_id))
    db.sql("update replication_targets set placeholder_datastore = %s", (PLACEHOLDER_DS,))


@pytest.fixture
def vc(world: Database, vcsim_source: Simulator, vcsim_dr: Simulator, tmp_path: Path) -> Real:
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    bundle = tmp_path / "ca.pem"
    bundle.write_text(Path(vcsim_source.cert_file).read_text() + Path(vcsim_dr.cert_file).read_text())
    _point_at(world, secrets, [(PRIMARY, vcsim_source), (DR, vcsim_dr)])
    return Real(world, {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets),
                        "ZERFAUX_VCENTER_CA_BUNDLE": str(bundle)})


def _vm(db: Database, name: str, disks: Any, moref: str | None = None) -> Any:
    return db.value(
        "insert into vcenter_vms (vcenter_id, moref, name, datastore, num_cpu, memory_mb, disks)"
        " values (%s, %s, %s, %s, 1, 256, %s::jsonb) returning id",
        (PRIMARY, moref or f"vm-{uuid.uuid4().hex[:10]}", name, SOURCE_DS, json.dumps(disks)),
    )


def _disk(path: str) -> list[dict[str, Any]]:
    return [{"file": path, "capacity": 0, "datastore": SOURCE_DS, "controller": "pvscsi"}]


def _protect(db: Database, vm_id: Any, **flags: bool) -> str:
    return str(db.value(
        "insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion, needs_dr_shell)"
        " values (%s, %s, %s, %s) returning id",
        (GROUP, vm_id, flags.get("vmotion", False), flags.get("dr_shell", False)),
    ))


def _by_subject(db: Database, kind: str) -> dict[str, dict[str, Any]]:
    return {str(o["subject_id"]): o for o in operations(db, kind)}


def _vm_names(sim: Simulator) -> list[str]:
    return sorted(vm.name for vm in sim.find(vim.VirtualMachine))


async def test_dr_shell_names_and_disk_paths_arrive_exactly_or_fail_naming_the_field(
    vc: Real, vcsim_dr: Simulator
) -> None:
    tag = uuid.uuid4().hex[:6]
    # VM name -> the DR VM's name vcsim must hold ('/', '\\', a bare '%' escaped as vCenter does).
    exact = {
        f"q\"uo'te {tag}": f"q\"uo'te {tag}-dr",
        f"a<b>&c;$(x) {tag}": f"a<b>&c;$(x) {tag}-dr",
        f"nön-äscii ☃ 名前 {tag}": f"nön-äscii ☃ 名前 {tag}-dr",
        f"sl/ash\\ 100% {tag}": f"sl%2fash%5c 100%25 {tag}-dr",
    }
    # VM name or disks -> words the error must hold (each names the field to fix).
    refused: dict[str, tuple[str, Any, str]] = {
        "newline": (f"new\nline {tag}", None, "control character U+000A"),
        "10,000 characters": ("x" * 10_000, None, "over vSphere's 80"),
        "disk path climbing out": (f"climb {tag}", _disk(f"[{SOURCE_DS}] ../../etc/{tag}.vmdk"), "'..'"),
        "disk path with newline": (f"nl-disk {tag}", _disk(f"[{SOURCE_DS}] a\nb/{tag}.vmdk"),
                                   "vcenter_vms.disks[0].file"),
        "disks not an array": (f"obj {tag}", {"file": "x"}, "vcenter_vms.disks must be a JSON array"),
        "disk without file": (f"nofile {tag}", [{"capacity": 1}], "vcenter_vms.disks[0] has no 'file'"),
        "disk capacity not a number": (f"cap {tag}", [{"file": f"[{SOURCE_DS}] d/d.vmdk", "capacity": "big"}],
                                       "vcenter_vms.disks[0].capacity"),
        "5,000 disks (a huge jsonb)": (f"huge {tag}", [_disk(f"[{SOURCE_DS}] h{i}/d.vmdk")[0] for i in range(5000)],
                                       "5000 disks do not fit"),
    }
    shells: dict[str, str] = {}
    for name in exact:
        directory = f"r-{uuid.uuid4().hex[:8]}"
        vcsim_dr.add_replica(directory)
        shells[name] = _protect(vc.db, _vm(vc.db, name, _disk(f"[{SOURCE_DS}] {directory}/disk.vmdk")), dr_shell=True)
    # A disk path with spaces, quotes, '&', '<', ']' and non-ASCII arrives exactly too.
    odd_dir = f"d ir]&<x>\"q'ö-{tag}"
    (odd_path,) = vcsim_dr.add_replica(odd_dir, stem="dïsk")
    odd = _protect(vc.db, _vm(vc.db, f"odd-disk-{tag}", _disk(f"[{SOURCE_DS}] {odd_dir}/dïsk.vmdk")), dr_shell=True)
    bad = {case: _protect(vc.db, _vm(vc.db, name, disks if disks is not None else _disk(f"[{SOURCE_DS}] r/d.vmdk")),
                          dr_shell=True)
           for case, (name, disks, _) in refused.items()}
    before = _vm_names(vcsim_dr)
    protected_before = vc.db.value("select count(*) from protected_vms")

    await vc.drain()

    ops = _by_subject(vc.db, "vm.dr_shell")
    for name, pvm in [*shells.items(), (f"odd-disk-{tag}", odd)]:
        op = ops[pvm]
        assert (op["status"], op["attempts"]) == ("succeeded", 1), (name, op["last_error"])
        row = vc.db.one("select * from protected_vms where id = %s", (pvm,))
        assert row["dr_shell_vm_created"] and not row["needs_dr_shell"] and row["last_error"] is None
        if name in exact:
            assert vcsim_dr.vm(row["dr_shell_vm_id"]).name == exact[name]
            assert vcsim_dr.count_vms_named(exact[name]) == 1
        else:
            assert vcsim_dr.vm_disk_files(row["dr_shell_vm_id"]) == [odd_path]
    for case, pvm in bad.items():
        op, words = ops[pvm], refused[case][2]
        assert (op["status"], op["attempts"]) == ("failed", 1), (case, op["last_error"])
        assert words in op["last_error"] and "vcenter_vms." in op["last_error"], (case, op["last_error"])
        assert len(op["last_error"]) < 1000, case  # a 10,000-character value is not echoed whole
        row = vc.db.one("select * from protected_vms where id = %s", (pvm,))
        assert row["last_error"] == op["last_error"] and not row["dr_shell_vm_created"]
    after = _vm_names(vcsim_dr)
    assert sorted(set(after) - set(before)) == sorted([*exact.values(), f"odd-disk-{tag}-dr"])
    assert len(after) == len(before) + len(exact) + 1  # the refused ones created nothing
    assert vc.db.value("select count(*) from protected_vms") == protected_before
    assert vc.db.value("select count(*) from zerfaux.operations where status in ('queued', 'running')") == 0


async def test_storage_vmotion_refuses_odd_morefs_and_datastores_naming_the_field(
    vc: Real, vcsim_source: Simulator
) -> None:
    real_vm = next(vm for vm in vcsim_source.find(vim.VirtualMachine) if vm.name.startswith("DC0_H0_"))
    placed = vcsim_source.vm_datastores(real_vm._moId)
    cases = {
        # pyVmomi writes a moref into the envelope unescaped: this one would be XML injection.
        "moref with markup": ('vm-1"</_this><x>&', SOURCE_DS, "vcenter_vms.moref"),
        "10,000-character moref": ("v" * 10_000, SOURCE_DS, "vcenter_vms.moref"),
        "datastore with quotes, '&' and non-ASCII": (real_vm._moId, "ds \"q\" & <ö>", "protection_groups.protection_datastore"),
    }
    subjects = {}
    for case, (moref, datastore, _) in cases.items():
        group = vc.db.value(
            "insert into protection_groups select (jsonb_populate_record(null::protection_groups,"
            " to_jsonb(g) || jsonb_build_object('id', gen_random_uuid(), 'name', %s::text,"
            " 'protection_datastore', %s::text))).* from protection_groups g where id = %s returning id",
            (f"g-{uuid.uuid4().hex[:8]}", datastore, GROUP))
        vm_id = _vm(vc.db, f"mv-{uuid.uuid4().hex[:6]}", _disk("[nfs-01] a/a.vmdk"), moref=moref)
        subjects[case] = str(vc.db.value(
            "insert into protected_vms (protection_group_id, vm_id, needs_storage_vmotion)"
            " values (%s, %s, true) returning id", (group, vm_id)))
    vms_before = _vm_names(vcsim_source)

    await vc.drain()

    ops = _by_subject(vc.db, "vm.storage_vmotion")
    for case, pvm in subjects.items():
        op, field = ops[pvm], cases[case][2]
        assert (op["status"], op["attempts"]) == ("failed", 1), (case, op["last_error"])
        assert field in op["last_error"] and len(op["last_error"]) < 1000, (case, op["last_error"])
        assert vc.db.value("select needs_storage_vmotion from protected_vms where id = %s", (pvm,)) is True
    assert vcsim_source.vm_datastores(real_vm._moId) == placed  # nothing moved
    assert _vm_names(vcsim_source) == vms_before


# --- replication: dataset names and SSH fields with shell metacharacters ----------------------

@pytest.fixture
def zfs_rows(world: Database, zfs_source: ZFSHost, zfs_target: ZFSHost, tmp_path: Path) -> Iterator[Real]:
    if not zfs_source.local:
        pytest.skip("a source on the listener's machine is needed")
    tag = uuid.uuid4().hex[:8]
    source, root = f"{zfs_source.pool}/bad{tag}", f"{zfs_target.pool}/baddr{tag}"
    zfs_source.run(["zfs", "create", "-o", f"mountpoint={mountpoint('bad-' + tag)}", source])
    zfs_target.run(["zfs", "create", "-p", "-o", "mountpoint=none", root])
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "dr-key").write_text(zfs_target.private_key)
    (secrets / "dr-key").chmod(0o600)
    world.sql("update replication_targets set ssh_host = %s, ssh_port = %s, ssh_user = %s, ssh_key_secret = 'dr-key',"
              " ssh_host_key = %s, target_root = %s, transport = 'ssh', max_concurrent = 8 where id = %s",
              (zfs_target.ssh_host, zfs_target.ssh_port, zfs_target.ssh_user, zfs_target.host_key, root, TARGET))
    world.sql("update protection_groups set source_dataset = %s, rpo_minutes = null where id = %s", (source, GROUP))
    yield Real(world, {"ZERFAUX_USE_STUBS": "false", "ZERFAUX_SECRETS_DIR": str(secrets)})
    zfs_source.run(["zfs", "destroy", "-r", source], check=False)
    zfs_target.run(["zfs", "destroy", "-r", root], check=False)


def _everything(host: ZFSHost) -> list[str]:
    done = host.run(["zfs", "list", "-H", "-o", "name", "-t", "all", "-r", host.pool])
    return sorted(done.stdout.decode().split())


async def test_shell_metacharacters_in_datasets_and_ssh_fields_reach_no_shell(
    zfs_rows: Real, zfs_source: ZFSHost, zfs_target: ZFSHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    inject = f"touch {marker}"
    pool = zfs_source.pool
    # (which row, its column, the value) -> the column the error must name
    cases: list[tuple[str, str, str, str]] = [
        ("group", "source_dataset", f"{pool}/a;{inject}", "protection_groups.source_dataset"),
        ("group", "source_dataset", f"{pool}/$({inject})", "protection_groups.source_dataset"),
        ("group", "source_dataset", f"{pool}/`{inject}`", "protection_groups.source_dataset"),
        ("group", "source_dataset", f"{pool}/a|{inject}", "protection_groups.source_dataset"),
        ("group", "source_dataset", f"{pool}/a\n{inject}", "protection_groups.source_dataset"),
        ("group", "source_dataset", "-o mountpoint=/ x", "protection_groups.source_dataset"),
        ("target", "target_root", f"{zfs_target.pool}/x&&{inject}", "replication_targets.target_root"),
        ("target", "target_root", f"{zfs_target.pool}/x > /tmp/y", "replication_targets.target_root"),
        ("target", "ssh_host", f"-oProxyCommand={inject}", "replication_targets.ssh_host"),
        ("target", "ssh_user", "root;id>x", "replication_targets.ssh_user"),  # the column allows 64
        ("target", "ssh_host_key", f"ssh-ed25519 AAAA$({inject})", "replication_targets.ssh_host_key"),
    ]
    jobs: dict[str, tuple[str, str]] = {}
    for row, column, bad, field in cases:
        target = TARGET
        if row == "target":
            target = zfs_rows.db.value(
                "insert into replication_targets select (jsonb_populate_record(null::replication_targets,"
                " to_jsonb(t) || jsonb_build_object('id', gen_random_uuid(), 'name', %s::text, %s::text, %s::text)"
                ")).* from replication_targets t where id = %s returning id",
                (f"t-{uuid.uuid4().hex[:8]}", column, bad, TARGET))
        overrides = {"source_dataset": bad} if row == "group" else {}
        group = zfs_rows.db.value(
            "insert into protection_groups select (jsonb_populate_record(null::protection_groups,"
            " to_jsonb(g) || jsonb_build_object('id', gen_random_uuid(), 'name', %s::text,"
            " 'replication_target_id', %s::uuid) || %s::jsonb)).* from protection_groups g where id = %s returning id",
            (f"g-{uuid.uuid4().hex[:8]}", target, json.dumps(overrides), GROUP))
        job = zfs_rows.db.value("insert into replication_jobs (protection_group_id) values (%s) returning id", (group,))
        jobs[str(job)] = (f"{row}.{column}={bad[:40]!r}", field)
    jobs_before = zfs_rows.db.value("select count(*) from replication_jobs")
    source_before, target_before = _everything(zfs_source), _everything(zfs_target)
    started: list[object] = []
    real_popen_init = subprocess.Popen.__init__

    def spy_popen(self: Any, *args: Any, **kwargs: Any) -> None:
        started.append(args[0] if args else kwargs.get("args"))
        real_popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", spy_popen)
    monkeypatch.setattr(paramiko.SSHClient, "connect", lambda *a, **k: started.append(("ssh", a[1:])))

    await zfs_rows.drain()  # in-process, so the spies see every process and connection

    monkeypatch.undo()
    for job, (case, field) in jobs.items():
        row = zfs_rows.db.one("select status, attempts, error from replication_jobs where id = %s", (job,))
        assert (row["status"], row["attempts"]) == ("failed", 1), (case, row["error"])
        assert field in row["error"] and len(row["error"]) < 1000, (case, row["error"])
    assert started == [], started  # no zfs, ssh or syncoid process, no SSH connection
    assert not marker.exists()
    assert (_everything(zfs_source), _everything(zfs_target)) == (source_before, target_before)
    assert zfs_rows.db.value("select count(*) from replication_jobs") == jobs_before
    assert zfs_rows.db.value("select count(*) from zerfaux.operations where status in ('queued', 'running')") == 0
