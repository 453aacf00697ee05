"""Small process helpers shared by the worker, the supervisor and the metrics code."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
