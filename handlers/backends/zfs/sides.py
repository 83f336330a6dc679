"""The two ends of one attempt, as every step of it sees them."""

from __future__ import annotations

from dataclasses import dataclass, field

from handlers.backends.zfs import ops
from handlers.backends.zfs.exec import Runner
from handlers.backends.zfs.plan import Snap
from handlers.errors import PermanentError


@dataclass
class Sides:
    """Where commands run, the two datasets, what each ZFS can do, and the notes the job will show."""

    src: Runner
    tgt: Runner
    src_ds: str
    tgt_ds: str
    scaps: ops.Caps
    tcaps: ops.Caps
    notes: list[str] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        return self.scaps.resume and self.tcaps.resume

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def source_snapshots(self) -> list[Snap]:
        found = ops.snapshots(self.src, self.src_ds, self.scaps)
        if found is None:
            raise PermanentError(f"protection_groups.source_dataset {self.src_ds} does not exist on {self.src.label}")
        return found
