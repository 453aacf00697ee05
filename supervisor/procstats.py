"""Resource samples of worker processes (psutil): RSS, CPU time and open descriptors.

The supervisor samples every worker once per second. ``worker-max-rss`` is enforced from
these samples; they are also written to the scoreboard (``supervisor/shm.py``) so the
metrics code, in any process that maps it, can export them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

__all__ = ["Sample", "Sampler"]


@dataclass(frozen=True)
class Sample:
    """One measurement of one process."""

    pid: int
    rss: int  # bytes
    cpu_user: float  # seconds since the process started
    cpu_system: float
    cpu_percent: float  # of one CPU, since the previous sample (0.0 for the first)
    fds: int
    sampled_at: float  # Unix time


class Sampler:
    """Keeps one ``psutil.Process`` per PID so CPU use can be computed between samples."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        self._previous: dict[int, tuple[float, float]] = {}  # pid -> (monotonic, cpu seconds)

    def sample(self, pid: int) -> Sample | None:
        """Measure ``pid``; None when it is gone or cannot be read."""
        process = self._processes.get(pid)
        try:
            if process is None:
                process = psutil.Process(pid)
                self._processes[pid] = process
            with process.oneshot():
                memory = process.memory_info()
                cpu = process.cpu_times()
                fds = process.num_fds()
        except (psutil.Error, OSError):
            self.forget(pid)
            return None
        now = time.monotonic()
        used = cpu.user + cpu.system
        percent = 0.0
        previous = self._previous.get(pid)
        if previous is not None and now > previous[0]:
            percent = max(0.0, (used - previous[1]) / (now - previous[0]) * 100.0)
        self._previous[pid] = (now, used)
        return Sample(pid, memory.rss, cpu.user, cpu.system, percent, fds, time.time())

    def forget(self, pid: int) -> None:
        """Drop what is kept about ``pid`` (after it exited)."""
        self._processes.pop(pid, None)
        self._previous.pop(pid, None)
