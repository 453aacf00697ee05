"""What the supervisor tells the exporter about its pool: counters in shared memory and
the pool statistics source.

- :class:`PoolCounters` is a small shared memory segment (layout below) where the
  supervisor counts worker restarts by reason (:data:`RESTART_REASONS`, see
  :func:`restart_reason`) and reloads by result, next to its start time. The supervisor
  creates it and is its only writer; the exporter process maps it read-only.
- :class:`SharedPoolStats` is the exporter's *pool stats source*: it reads the
  scoreboard (worker records and psutil samples, ``supervisor/shm.py``) and the
  :class:`PoolCounters` into one :class:`PoolSnapshot` per scrape
  (:mod:`supervisor.exporter.exposition` turns it into metric families).

:class:`PoolCounters` layout (little-endian; written only by the supervisor, 8-byte
aligned single stores, so a reader never sees a torn value)::

    offset  size  field
         0     8  magic b"MTGWPOOL"
         8     4  u32 layout version (2)
        12     4  reserved, 0
        16     8  f64 supervisor start time (Unix time)
        24    32  u64 worker restarts by reason: exit, signal, max_rss, timeout
        56    16  u64 reloads by result: success, failure
        72        (end)
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from supervisor.states import WorkerState

if TYPE_CHECKING:
    from supervisor.shm import Scoreboard, Segment

__all__ = [
    "RELOAD_RESULTS",
    "RESTART_EXIT",
    "RESTART_MAX_RSS",
    "RESTART_REASONS",
    "RESTART_SIGNAL",
    "RESTART_TIMEOUT",
    "PoolCounters",
    "PoolSnapshot",
    "PoolStatsSource",
    "SharedPoolStats",
    "WorkerStats",
    "restart_reason",
]

RESTART_EXIT: Final = "exit"  # a worker exited by itself (crash, unexpected exit status)
RESTART_SIGNAL: Final = "signal"  # a worker was killed by a signal (OOM killer, kill -9)
RESTART_MAX_RSS: Final = "max_rss"  # replaced for exceeding [supervisor] worker-max-rss
RESTART_TIMEOUT: Final = "timeout"  # killed: no heartbeat for [supervisor] worker-timeout
RESTART_REASONS: Final = (RESTART_EXIT, RESTART_SIGNAL, RESTART_MAX_RSS, RESTART_TIMEOUT)
RELOAD_RESULTS: Final = ("success", "failure")

POOL_MAGIC: Final = b"MTGWPOOL"
POOL_VERSION: Final = 2
POOL_SIZE: Final = 72
_POOL_HEADER = struct.Struct("<8sII")
_RESTARTS_AT: Final = 3  # index of the first restart counter, in u64 words
_RELOADS_AT: Final = _RESTARTS_AT + len(RESTART_REASONS)


class PoolCounters:
    """Worker restarts, reloads and the supervisor's start time, in shared memory.

    The supervisor creates it (:meth:`create`) and is its only writer; the exporter maps
    the same file read-only (:meth:`attach`). Layout in the module docstring.
    """

    def __init__(self, segment: Segment) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self.segment = segment
        view = memoryview(segment.map)
        self._view = view
        self._words = view[: POOL_SIZE - POOL_SIZE % 8].cast("Q")
        self._doubles = view[: POOL_SIZE - POOL_SIZE % 8].cast("d")

    @classmethod
    def create(cls, directory: str | None = None, started_at: float | None = None) -> PoolCounters:
        """Create the segment (supervisor side). Raises OSError."""
        from supervisor.shm import Segment

        segment = Segment("pool", POOL_SIZE, directory)
        segment.map[: _POOL_HEADER.size] = _POOL_HEADER.pack(POOL_MAGIC, POOL_VERSION, 0)
        counters = cls(segment)
        counters._doubles[2] = time.time() if started_at is None else started_at
        return counters

    @classmethod
    def attach(cls, path: str) -> PoolCounters:
        """Map an existing segment read-only (exporter side). Raises OSError, ValueError."""
        from supervisor.shm import Segment

        segment = Segment.attach(path)
        try:
            if segment.size < POOL_SIZE:
                raise ValueError(f"{path}: too small for pool counters")
            magic, version, _ = _POOL_HEADER.unpack(segment.map[: _POOL_HEADER.size])
            if magic != POOL_MAGIC or version != POOL_VERSION:
                raise ValueError(f"{path}: not pool counters of layout version {POOL_VERSION}")
            return cls(segment)
        except BaseException:
            segment.close(unlink=False)
            raise

    @property
    def path(self) -> str:
        return self.segment.path

    @property
    def started_at(self) -> float:
        return float(self._doubles[2])

    def worker_restarted(self, reason: str) -> None:
        """Count one worker restart; ``reason`` is one of :data:`RESTART_REASONS`.

        Raises ValueError for another reason.
        """
        index = _RESTARTS_AT + RESTART_REASONS.index(reason)
        self._words[index] += 1

    def reload_finished(self, succeeded: bool) -> None:
        """Count one reload (SIGHUP) that completed or was given up."""
        self._words[_RELOADS_AT + (0 if succeeded else 1)] += 1

    def restarts(self) -> dict[str, int]:
        return {r: int(self._words[_RESTARTS_AT + i]) for i, r in enumerate(RESTART_REASONS)}

    def reloads(self) -> dict[str, int]:
        return {r: int(self._words[_RELOADS_AT + i]) for i, r in enumerate(RELOAD_RESULTS)}

    def close(self, *, unlink: bool = True) -> None:
        """Release the mapping (and remove the file: creator only)."""
        for view in (self._words, self._doubles, self._view):
            view.release()
        self.segment.close(unlink=unlink)


def restart_reason(exit_code: int) -> str:
    """The restart reason for a worker that died with ``exit_code`` (as returned by
    ``os.waitstatus_to_exitcode``: negative = killed by that signal)."""
    return RESTART_SIGNAL if exit_code < 0 else RESTART_EXIT


@dataclass(frozen=True)
class WorkerStats:
    """One worker process as the pool metrics show it."""

    slot: int
    pid: int
    state: WorkerState
    sessions: int
    rss: int | None  # bytes; None until the supervisor sampled it
    cpu_seconds: float | None
    fds: int | None


@dataclass(frozen=True)
class PoolSnapshot:
    """What the exporter needs from the supervisor for the pool metrics."""

    started_at: float
    workers: tuple[WorkerStats, ...] = ()
    restarts: Mapping[str, int] = field(default_factory=dict)
    reloads: Mapping[str, int] = field(default_factory=dict)


PoolStatsSource = Callable[[], "PoolSnapshot | None"]


class SharedPoolStats:
    """A :data:`PoolStatsSource` over the scoreboard and the :class:`PoolCounters`."""

    def __init__(self, scoreboard: Scoreboard | None, counters: PoolCounters | None) -> None:
        self.scoreboard = scoreboard
        self.counters = counters

    @classmethod
    def attach(cls, scoreboard_path: str | None, counters_path: str | None) -> SharedPoolStats:
        """Map the supervisor's segments read-only (exporter side). Raises OSError,
        ValueError."""
        from supervisor.shm import Scoreboard

        scoreboard = Scoreboard.attach(scoreboard_path) if scoreboard_path else None
        counters = PoolCounters.attach(counters_path) if counters_path else None
        return cls(scoreboard, counters)

    def __call__(self) -> PoolSnapshot | None:
        if self.scoreboard is None and self.counters is None:
            return None
        workers: list[WorkerStats] = []
        if self.scoreboard is not None:
            for record in self.scoreboard.records():
                sampled = record.sampled_at > 0
                workers.append(
                    WorkerStats(
                        slot=record.slot,
                        pid=record.pid,
                        state=record.state,
                        sessions=record.sessions,
                        rss=record.rss if sampled else None,
                        cpu_seconds=record.cpu_user + record.cpu_system if sampled else None,
                        fds=record.fds if sampled else None,
                    )
                )
        counters = self.counters
        return PoolSnapshot(
            started_at=counters.started_at if counters is not None else 0.0,
            workers=tuple(workers),
            restarts=counters.restarts() if counters is not None else {},
            reloads=counters.reloads() if counters is not None else {},
        )
