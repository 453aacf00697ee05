"""Small process helpers shared by the worker, the supervisor and the metrics code."""

from __future__ import annotations

import os
import tempfile
from typing import Final

SHM_DIR: Final = "/dev/shm"


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_dir() -> str:
    """Where shared memory files go (the scoreboard, the replay cache, the metrics files):
    ``/dev/shm`` when it exists (tmpfs: mapped pages are never written back to a disk),
    else the temporary directory."""
    return SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
