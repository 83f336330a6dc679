"""SOAP calls per VM of each vCenter step of a planned migration, Zerfaux's backends against the plain script.

    .venv/bin/python bench/migration_calls.py

A small failover world (tests/integration/failover_world.py: 2 VMs), no delay; each of Zerfaux's
per-VM vCenter calls is made once on one VM through the real backends (``FailoverComputeReal``
on ``VCenterSessions``) and the SOAP methods it sends are counted (pyVmomi's
``SoapStubAdapter.InvokeMethod``); then the plain script's calls for the same step
(bench/migration.py). At 20 ms per call, each call is 20 ms of the step's time.
"""

from __future__ import annotations

import collections
import os
import secrets
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyVim.task import WaitForTask  # noqa: E402
from pyVmomi import SoapAdapter, vim  # noqa: E402

from bench.common import drop_database, scratch_database  # noqa: E402
from bench.migration_script import wait_property  # noqa: E402
from bench.migration_world import collect  # noqa: E402
from handlers.backends.vcenter.failover import FailoverComputeReal  # noqa: E402
from handlers.backends.vcenter.session import VCenterSessions  # noqa: E402
from handlers.recovery.backends import RecoveryNic  # noqa: E402
from handlers.secrets import SecretResolver  # noqa: E402
from handlers.types import VCenterEndpoint  # noqa: E402
from listener.migrate import migrate, seed  # noqa: E402
from tests.integration.conftest import DR, PRIMARY  # noqa: E402
from tests.integration.failover_world import RECOVERY, build_failover_world, plan_of  # noqa: E402
from tests.support import zfs as zfs_support  # noqa: E402
from tests.support.pg import Database  # noqa: E402
from tests.support.vcsim import Simulator, build_vcsim, start_simulator  # noqa: E402

_calls = threading.local()


@contextmanager
def counted() -> Iterator[list[str]]:
    """The SOAP methods this thread sends inside the block, in order."""
    names: list[str] = []
    _calls.names = names
    try:
        yield names
    finally:
        _calls.names = None


def _install() -> None:
    original = SoapAdapter.SoapStubAdapter.InvokeMethod

    def invoke(self: Any, mo: Any, info: Any, args: Any, *rest: Any, **kw: Any) -> Any:
        names = getattr(_calls, "names", None)
        if names is not None:
            names.append(info.wsdlName)
        return original(self, mo, info, args, *rest, **kw)

    SoapAdapter.SoapStubAdapter.InvokeMethod = invoke  # type: ignore[method-assign]


def show(label: str, zerfaux: list[str], script: list[str]) -> None:
    def fmt(names: list[str]) -> str:
        return ", ".join(f"{n}×{c}" if c > 1 else n for n, c in collections.Counter(names).items())

    print(f"{label:16s} zerfaux {len(zerfaux):3d}: {fmt(zerfaux)}")
    print(f"{'':16s} script  {len(script):3d}: {fmt(script)}")


def main() -> None:
    _install()
    binary = build_vcsim()
    with ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="zerfaux-bench-calls-")
        stack.callback(os.system, f"rm -rf {work}")
        zfs_support._MOUNTS[:] = [os.path.join(work, "mnt")]
        stack.enter_context(zfs_support.zfs_fuse_running(work))
        suffix = secrets.token_hex(3)
        src_pool = stack.enter_context(zfs_support.pool(f"zxcs{suffix}", work))
        dst_pool = stack.enter_context(zfs_support.pool(f"zxcd{suffix}", work))
        sshd = stack.enter_context(zfs_support.sshd_running(work))
        name, url = scratch_database("zf_bench_calls")
        stack.callback(drop_database, name)
        migrate(url)
        seed(url)

        def start(sim_name: str, **kwargs: Any) -> Simulator:
            return start_simulator(binary, sim_name, Path(work), **kwargs)

        db = Database(name, url)
        gen = build_failover_world(db, zfs_support._host(sshd, src_pool), zfs_support._host(sshd, dst_pool), start,
                                   Path(work), plan=plan_of(2, 1))
        fw = next(gen)
        stack.callback(lambda: next(gen, None))
        sessions = VCenterSessions(SecretResolver({}, str(fw.secrets)), ca_bundle=str(fw.bundle))
        stack.callback(sessions.close)
        compute = FailoverComputeReal(sessions)
        a = VCenterEndpoint.from_row(db.one("select * from vcenters where id = %s", (PRIMARY,)))
        b = VCenterEndpoint.from_row(db.one("select * from vcenters where id = %s", (DR,)))
        stop = threading.Event()
        vm, other = fw.vms
        nics = [RecoveryNic(RECOVERY[vm.plan.network], vm.plan.network)]
        compute.power_state(b, vm.shell, stop)  # log in first: not a step's cost
        compute.power_state(a, vm.moref, stop)
        src, dr = fw.source_sim.si(), fw.dr_sim.si()
        src.content, dr.content  # noqa: B018 - the script's sessions have their content already

        def pair(label: str, ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
            with counted() as z:
                ours()
            with counted() as s:
                theirs()
            show(label, z, s)

        pair("power_state", lambda: compute.power_state(a, vm.moref, stop),
             lambda: collect(src, vim.VirtualMachine, ["name", "runtime.powerState", "guest.toolsRunningStatus"]))
        pair("shutdown_vm", lambda: compute.shutdown_vm(a, vm.moref, 300.0, True, stop),
             lambda: (lambda o: (o.ShutdownGuest(), wait_property(src, o, "runtime.powerState", "poweredOff")))(
                 vim.VirtualMachine(other.moref, src._stub)))
        disks = []  # the shell was made with its disk: attach finds it (as in the benchmark)
        pair("attach_disks", lambda: compute.attach_disks(b, vm.shell, disks, stop),
             lambda: vim.VirtualMachine(other.shell, dr._stub).config.hardware.device)
        pair("set_networks", lambda: compute.set_networks(b, vm.shell, nics, stop),
             lambda: WaitForTask(vim.VirtualMachine(other.shell, dr._stub).ReconfigVM_Task(spec=vim.vm.ConfigSpec(
                 deviceChange=[vim.vm.device.VirtualDeviceSpec(
                     operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
                     device=vim.vm.device.VirtualVmxnet3(key=-300, backing=vim.vm.device.VirtualEthernetCard
                                                         .NetworkBackingInfo(deviceName=nics[0].network)))]))))
        with counted() as z:
            compute.set_networks(b, vm.shell, nics, stop)
        print(f"{'set_networks':16s} zerfaux {len(z):3d} for the next VM's lookups (datacenter, network: kept "
              f"on the session for a while), plus its reconfigure")
        pair("power_states", lambda: compute.power_states(a, [vm.moref, other.moref], stop),
             lambda: collect(src, vim.VirtualMachine, ["runtime.powerState"]))
        pair("power_on", lambda: compute.power_on(b, vm.shell, stop),
             lambda: WaitForTask(vim.VirtualMachine(other.shell, dr._stub).PowerOnVM_Task()))
        for shell in (vm.shell, other.shell):
            WaitForTask(vim.VirtualMachine(shell, dr._stub).ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[
                vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value="guestToolsRunning")])))
        pair("wait_ready", lambda: compute.wait_ready(b, vm.shell, 60.0, stop),
             lambda: wait_property(dr, vim.VirtualMachine(other.shell, dr._stub), "guest.toolsRunningStatus",
                                   "guestToolsRunning"))


if __name__ == "__main__":
    main()
