"""``collect_pages`` against vcsim: pages of our size although vcsim ignores maxObjects, and a VM
deleted between the listing and the read of its page is left out instead of failing the sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

from handlers.backends.vcenter.query import collect, collect_pages
from handlers.backends.vcenter.session import VCenterSessions
from tests.support.vcsim import Simulator

pytestmark = pytest.mark.vcsim


def _read(sim: Simulator, work: Callable[[Any], Any]) -> Any:
    sessions = VCenterSessions(sim.secrets(), ca_bundle=sim.cert_file)
    try:
        return sessions.run(sim.endpoint(), work)
    finally:
        sessions.close()


def test_pages_are_bounded_and_complete(vcsim_source: Simulator) -> None:
    def work(si: Any) -> tuple[list[int], set[str], set[str]]:
        pages = list(collect_pages(si, vim.VirtualMachine, ["name"], page_size=2))
        every = {o._moId for o, _ in collect(si, vim.VirtualMachine, ["name"])}
        return [len(p) for p in pages], {o._moId for p in pages for o, _ in p}, every

    sizes, paged, every = _read(vcsim_source, work)
    assert max(sizes) == 2 and sum(sizes) == len(every) == vcsim_source.vm_count
    assert paged == every


def test_a_vm_deleted_mid_read_is_left_out(vcsim_factory: Callable[..., Simulator]) -> None:
    sim = vcsim_factory("pages")

    def work(si: Any) -> tuple[set[str], str]:
        pages = collect_pages(si, vim.VirtualMachine, ["name"], page_size=2)
        first = next(pages)
        seen = {o._moId for o, _ in first}
        victim = next(vm for vm in sim.find(vim.VirtualMachine) if vm._moId not in seen)
        if victim.runtime.powerState != "poweredOff":
            WaitForTask(victim.PowerOffVM_Task())
        WaitForTask(victim.Destroy_Task())  # listed already, its page not read yet
        seen |= {o._moId for page in pages for o, _ in page}
        return seen, victim._moId

    seen, victim = _read(sim, work)
    assert victim not in seen
    assert len(seen) == sim.vm_count - 1
