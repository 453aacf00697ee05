"""Small process helpers shared by the worker, the supervisor and the metrics code."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Final

SHM_DIR: Final = "/dev/shm"
# Shared memory file names: mtgworkers-<supervisor pid>-<16 hex digits>-<kind>
SEGMENT_PREFIX: Final = "mtgworkers-"
SEGMENT_NAME: Final = re.compile(r"mtgworkers-(\d+)-[0-9a-f]{16}-([a-z]+)\Z")


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


def segment_files(kind: str, directory: str | None = None) -> list[tuple[int, str]]:
    """(supervisor pid, path) of the shared memory files of ``kind`` whose supervisor is
    alive, e.g. the ``doppel`` state of running proxies (for doctor)."""
    directory = directory or shm_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        match = SEGMENT_NAME.match(name)
        if match and match.group(2) == kind and pid_alive(int(match.group(1))):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return found
