"""The state disk's health: free space and whether writes fail for lack of it (issue 17.19).

A full state disk used to hide: ``/v1/health`` said ``ok`` while every outbox
write failed with "cannot rollback - no transaction is active". The agent's
health and each telemetry window now carry :func:`disk_state`.
"""
from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["MIN_FREE_BYTES", "disk_state", "disk_verdict", "is_disk_full"]

# Below this much free space the disk counts as full: SQLite needs room for its WAL and
# journal, and state.json / a package download would fail next.
MIN_FREE_BYTES = 1 << 20


def disk_verdict(free_bytes: int | None, total_bytes: int | None, *, min_free_bytes: int = MIN_FREE_BYTES,
                 write_error: str | None = None, write_failures: int = 0) -> dict[str, Any]:
    """Pure: the ``disk`` object of health and telemetry from the measured figures."""
    full = write_error is not None or (free_bytes is not None and free_bytes < min_free_bytes)
    return {"free_bytes": free_bytes, "total_bytes": total_bytes, "full": full,
            "write_failures": int(write_failures), "error": write_error}


def disk_state(path: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """:func:`disk_verdict` for the filesystem holding ``path`` (free space as an unprivileged writer sees it)."""
    try:
        st = os.statvfs(path)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:
        free = total = None
    return disk_verdict(free, total, **kw)


def is_disk_full(exc: BaseException) -> bool:
    """True for an SQLite or OS error that means "no space left" (SQLITE_FULL, ENOSPC, EDQUOT)."""
    if isinstance(exc, OSError) and exc.errno in (28, 122):
        return True
    sqlite3 = sys.modules.get("sqlite3")  # not imported yet: exc cannot be one of its errors (and the import stays light)
    if sqlite3 is not None and isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)
    return False
