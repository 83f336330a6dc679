"""Datastore paths as vSphere writes them: ``[datastore] dir/file.vmdk``.

One definition for the handlers (which map a source disk to its replica) and the vCenter
backends (which read where a VM's files live).
"""

from __future__ import annotations

import re

# The path part may be empty ("[ds]" names a datastore's root); DOTALL so a stray newline
# cannot make a path unreadable here (handlers refuse control characters before matching).
DS_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$", re.DOTALL)


def split_datastore_path(path: str | None) -> tuple[str, str] | None:
    """``[ds] dir/file`` -> ``("ds", "dir/file")``; None when it is not a datastore path."""
    match = DS_PATH.match(path or "")
    return (match["ds"], match["path"]) if match else None


def datastore_of_path(path: str | None) -> str | None:
    """``[ds] dir/file`` -> ``ds``."""
    parts = split_datastore_path(path)
    return parts[0] if parts else None
