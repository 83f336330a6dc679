"""Real vCenter backends (pyVmomi): the names ``handlers/__init__.py`` builds when stubs are off.

The work lives in small modules beside this one:
``session`` (logins, TLS, fault translation), ``query`` (bulk reads, task waits, stop checks),
``inventory``, ``vmotion``, ``shell``, ``placement`` (shared by shells and recovery runs) and
``recovery`` / ``recovery_vm`` (a recovery run at the DR vCenter).
"""

from __future__ import annotations

from handlers.backends.vcenter.inventory import VCenterInventoryReal
from handlers.backends.vcenter.recovery import RecoveryComputeReal
from handlers.backends.vcenter.session import VCenterSessions
from handlers.backends.vcenter.shell import DRShellBuilderReal
from handlers.backends.vcenter.vmotion import StorageMoverReal

__all__ = ["DRShellBuilderReal", "RecoveryComputeReal", "StorageMoverReal", "VCenterInventoryReal", "VCenterSessions"]
