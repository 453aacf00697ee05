"""Shared memory between the supervisor and its workers: the scoreboard and the replay cache.

The supervisor creates every segment before it starts a worker: a file in ``/dev/shm``
(private random name, mode 0600) mapped ``MAP_SHARED``. Workers inherit the segment's
descriptor across fork and exec (``supervisor/launch.py``) and map it again (the same
pages); they never open a segment by name. The supervisor unlinks the files when it
exits; files left behind by a supervisor that was killed (SIGKILL) are removed by the next
start (:func:`remove_stale_segments`), and systemd's ``RemoveIPC=`` (implied by
``DynamicUser=``) removes them too.

File names: ``mtgworkers-<supervisor pid>-<16 hex digits>-<kind>``, ``kind`` is
``scoreboard``, ``replay``, ``doppel`` or ``pool``.

Scoreboard layout (all integers little-endian, offsets in bytes)::

    offset          size         field
         0             8         magic b"MTGWSCB\\0"
         8             4         u32 layout version (1)
        12             4         u32 cells: number of worker cells (C)
        16             4         u32 high-water mark H: cells [0, H) may be in use; written
                                 by the supervisor before it forks a worker with cell H-1,
                                 never lowered, read by workers on every admission
        20            44         reserved, 0
        64         8 * C         sessions: one u64 per cell. Written ONLY by the worker that
                                 owns the cell (+1 on admission, -1 when the session ends);
                                 reset to 0 by the supervisor after that worker died.
    64 + 8*C     128 * C         worker records, one per cell, written ONLY by the
                                 supervisor, except heartbeat (the worker reads
                                 drain_timeout and writes heartbeat):
                                   0  u32 pid (0 = free cell)
                                   4  u32 slot (the listening socket the worker accepts on)
                                   8  u32 generation (+1 on every reload)
                                  12  u32 state: 0 free, 1 booting, 2 ready, 3 retiring
                                      (``supervisor.states.WorkerState.code``)
                                  16  f64 started_at (Unix time)
                                  24  f64 drain_timeout: seconds the worker may drain when it
                                      gets SIGTERM (set before the signal; 0 = its config's
                                      graceful-timeout)
                                  32  u64 rss (bytes)
                                  40  f64 cpu_user (seconds)
                                  48  f64 cpu_system (seconds)
                                  56  f64 cpu_percent (since the previous sample)
                                  64  u32 open file descriptors
                                  68  u32 reserved
                                  72  f64 sampled_at (Unix time; 0 = never sampled)
                                  80  f64 heartbeat: when the worker's event loop last ran
                                      its heartbeat timer (``time.monotonic()``; Linux's
                                      CLOCK_MONOTONIC is the same in every process). Set by
                                      the supervisor when it claims the cell (before the
                                      fork), then ONLY by the worker, at least once a second
                                      while its loop runs; the supervisor replaces a ready
                                      or retiring worker whose heartbeat is older than
                                      ``[supervisor] worker-timeout``
                                  88  40 bytes reserved, 0

A cell belongs to one worker *process*, not to a slot: during a reload the old and the new
worker of a slot run side by side and each counts its own sessions.

Concurrency limit (``concurrency``, global to the proxy). Admission in a worker is::

    if sum(sessions[0:H]) >= limit: refuse
    sessions[own cell] += 1

Both steps run in one event-loop callback (no ``await`` between them), so one worker has
at most one admission in flight. Workers do not lock against each other: W workers that
admit at the same instant can all see the same sum, so the total can exceed the limit by
at most W - 1 (W = workers accepting at that moment, which includes both generations
during a reload). ``tests/supervisor/test_shm.py`` shows that bound. The counters (and the
heartbeat) are aligned 8-byte words written with single stores, so a reader never sees a
torn value; a stale read only widens the same bound. When a worker dies its cell is reset by the
supervisor, so sessions a crashed worker never released do not leak capacity.

Replay cache: a :class:`~mtgworkers.defense.antireplay.StableBloomFilter` in its own
segment (layout in ``mtgworkers/defense/antireplay.py``), created with the size from
``[defense.anti-replay]``. The filter takes no lock itself; workers serialise
``test_and_add`` with ``flock(2)`` on their own open file description of the segment
(opened after fork through ``/proc/self/fd``), so the lock is released by the kernel if a
worker dies holding it: no deadlock, at worst a half-updated filter (harmless).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Final

from mtgworkers.defense.antireplay import StableBloomFilter
from mtgworkers.defense.doppel import SharedState
from mtgworkers.proc import SEGMENT_NAME, SEGMENT_PREFIX, pid_alive, shm_dir
from supervisor.states import WorkerState

__all__ = [
    "LockedReplayFilter",
    "ReplayCache",
    "Scoreboard",
    "Segment",
    "SharedLimiter",
    "WorkerRecord",
    "remove_stale_segments",
]

PREFIX: Final = SEGMENT_PREFIX
_NAME_RE = SEGMENT_NAME

MAGIC: Final = b"MTGWSCB\x00"
VERSION: Final = 1
HEADER_SIZE: Final = 64
RECORD_SIZE: Final = 128
_HEADER = struct.Struct("<8sIII44x")
_RECORD_IDENTITY = struct.Struct("<IIIId")  # pid, slot, generation, state, started_at
_RECORD_SAMPLE = struct.Struct("<QdddI4xd")  # rss, cpu_user, cpu_system, cpu_percent, fds, at
_DOUBLE = struct.Struct("<d")
_U32 = struct.Struct("<I")
_DRAIN_OFFSET: Final = 24
_SAMPLE_OFFSET: Final = 32
_STATE_OFFSET: Final = 12
_HEARTBEAT_OFFSET: Final = 80
assert _HEADER.size == HEADER_SIZE
assert _RECORD_IDENTITY.size == 24 and _SAMPLE_OFFSET + _RECORD_SAMPLE.size == 80
_RECORD_DOUBLES: Final = RECORD_SIZE // 8  # a record as f64 words: the heartbeat's index
_HEARTBEAT_INDEX: Final = _HEARTBEAT_OFFSET // 8


class Segment:
    """One shared memory file, created and mapped by the supervisor.

    ``fd`` stays open in the supervisor so that workers forked later can reopen the file
    (for their own lock) even after it was unlinked.
    """

    def __init__(self, kind: str, size: int, directory: str | None = None) -> None:
        """Create a new zero-filled file of ``size`` bytes and map it. Raises OSError."""
        directory = directory or shm_dir()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}-{kind}"
        self.path = os.path.join(directory, name)
        self.size = size
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            os.unlink(self.path)
            raise
        self._owner = os.getpid()

    @classmethod
    def attach(cls, path: str) -> Segment:
        """Map an existing segment read-only (another process's, for inspection).

        Raises OSError. The file is never removed through this object.
        """
        segment = cls.__new__(cls)
        segment.path = path
        segment.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            segment.size = os.fstat(segment.fd).st_size
            segment.map = mmap.mmap(segment.fd, segment.size, prot=mmap.PROT_READ)
        except BaseException:
            os.close(segment.fd)
            raise
        segment._owner = -1
        return segment

    @classmethod
    def inherit(cls, fd: int, path: str) -> Segment:
        """Map, read-write and shared, a segment whose descriptor this process inherited
        across exec (a worker). Raises OSError. The file is never removed through this
        object; ``fd`` is made close-on-exec again."""
        os.set_inheritable(fd, False)
        segment = cls.__new__(cls)
        segment.path = path
        segment.fd = fd
        segment.size = os.fstat(fd).st_size
        segment.map = mmap.mmap(fd, segment.size, flags=mmap.MAP_SHARED)
        segment._owner = -1
        return segment

    def reopen(self) -> int:
        """A new open file description of this segment (for ``flock``): call after fork.

        Goes through ``/proc/self/fd`` so it works after the file was unlinked; falls back
        to the path. Returns the new descriptor (close-on-exec). Raises OSError.
        """
        try:
            return os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, *, unlink: bool = True) -> None:
        """Unmap, close, and (only in the process that created it) remove the file."""
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()  # BufferError: views still exported; the mapping goes at exit
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if unlink and os.getpid() == self._owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def remove_stale_segments(directory: str | None = None) -> list[str]:
    """Remove segment files whose supervisor no longer runs; return their paths.

    A file whose supervisor PID is alive is kept (it may be another running proxy).
    """
    directory = directory or shm_dir()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _NAME_RE.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    return removed


@dataclass(frozen=True)
class WorkerRecord:
    """One worker's cell of the scoreboard (see the layout in the module docstring)."""

    cell: int
    pid: int
    slot: int
    generation: int
    state: WorkerState  # never FREE
    started_at: float
    sessions: int
    rss: int
    cpu_user: float
    cpu_system: float
    cpu_percent: float
    fds: int
    sampled_at: float
    heartbeat: float  # monotonic


class Scoreboard:
    """Per-worker session counters and worker records in one shared segment."""

    def __init__(self, segment: Segment, cells: int) -> None:
        """Internal: use :meth:`create`."""
        self.segment = segment
        self.cells = cells
        view = memoryview(segment.map)
        self._header = view[:HEADER_SIZE]
        self._hwm = view[16:20].cast("I")
        self._sessions = view[HEADER_SIZE : HEADER_SIZE + 8 * cells].cast("Q")
        self._records = view[
            HEADER_SIZE + 8 * cells : HEADER_SIZE + 8 * cells + RECORD_SIZE * cells
        ]
        self._doubles = self._records.cast("d")  # aligned: the heartbeat is one store
        self._free = list(range(cells - 1, -1, -1))  # supervisor only; pop() gives the lowest

    @classmethod
    def attach(cls, path: str) -> Scoreboard:
        """Read another process's scoreboard (e.g. a status tool); read-only.

        Raises OSError, or ValueError when the file holds no scoreboard of this layout.
        """
        segment = Segment.attach(path)
        try:
            if segment.size < HEADER_SIZE:
                raise ValueError(f"{path}: too small for a scoreboard")
            magic, version, cells, _ = _HEADER.unpack(segment.map[:HEADER_SIZE])
            if magic != MAGIC or version != VERSION or segment.size < cls.size(cells):
                raise ValueError(f"{path}: not a scoreboard of layout version {VERSION}")
            return cls(segment, cells)
        except BaseException:
            segment.close(unlink=False)
            raise

    @classmethod
    def inherit(cls, fd: int, path: str) -> Scoreboard:
        """The supervisor's scoreboard in a worker started by exec (read-write).

        Raises OSError, or ValueError when the segment holds no scoreboard of this
        layout (a worker of newer code under an older supervisor: restart the proxy).
        """
        segment = Segment.inherit(fd, path)
        try:
            magic, version, cells, _ = _HEADER.unpack(segment.map[:HEADER_SIZE])
            if magic != MAGIC or version != VERSION or segment.size < cls.size(cells):
                raise ValueError(
                    f"the supervisor's scoreboard is not of layout version {VERSION}: "
                    "restart the proxy to run the installed code"
                )
            board = cls(segment, cells)
            board._free = []  # cells are the supervisor's to hand out
            return board
        except BaseException:
            segment.close(unlink=False)
            raise

    @staticmethod
    def size(cells: int) -> int:
        """Bytes of a scoreboard with ``cells`` cells."""
        return HEADER_SIZE + cells * (8 + RECORD_SIZE)

    @classmethod
    def create(cls, cells: int, directory: str | None = None) -> Scoreboard:
        """Create the segment and its header (supervisor). Raises OSError, ValueError."""
        if cells < 1:
            raise ValueError("a scoreboard needs at least one cell")
        segment = Segment("scoreboard", cls.size(cells), directory)
        segment.map[:HEADER_SIZE] = _HEADER.pack(MAGIC, VERSION, cells, 0)
        return cls(segment, cells)

    @property
    def path(self) -> str:
        return self.segment.path

    @property
    def high_water_mark(self) -> int:
        return int(self._hwm[0])

    # -- supervisor side -------------------------------------------------------------------

    def claim(
        self, slot: int, generation: int, started_at: float, heartbeat: float | None = None
    ) -> int:
        """Take the lowest free cell for a worker about to be forked; return its index.

        The record is marked booting with pid 0 until :meth:`set_pid`; its heartbeat is
        ``heartbeat`` (default: now, monotonic). Raises LookupError when every cell is
        taken (too many workers still draining).
        """
        if not self._free:
            raise LookupError(f"all {self.cells} worker cells are in use")
        cell = self._free.pop()
        self._sessions[cell] = 0
        self._write_record(cell, 0, slot, generation, WorkerState.BOOTING, started_at)
        self.beat(cell, time.monotonic() if heartbeat is None else heartbeat)
        if cell + 1 > self._hwm[0]:
            self._hwm[0] = cell + 1
        return cell

    def set_pid(self, cell: int, pid: int) -> None:
        """Record the PID of the worker that owns ``cell``."""
        offset = cell * RECORD_SIZE
        self._records[offset : offset + 4] = _U32.pack(pid)

    def set_state(self, cell: int, state: WorkerState) -> None:
        """Record a worker's state (BOOTING, READY, RETIRING)."""
        offset = cell * RECORD_SIZE + _STATE_OFFSET
        self._records[offset : offset + 4] = _U32.pack(state.code)

    def set_drain_timeout(self, cell: int, seconds: float) -> None:
        """Tell the worker of ``cell`` how long to drain on SIGTERM (set before sending it)."""
        offset = cell * RECORD_SIZE + _DRAIN_OFFSET
        self._records[offset : offset + 8] = _DOUBLE.pack(seconds)

    def set_sample(
        self,
        cell: int,
        *,
        rss: int,
        cpu_user: float,
        cpu_system: float,
        cpu_percent: float,
        fds: int,
        sampled_at: float,
    ) -> None:
        """Store the latest resource sample of a worker (psutil, taken by the supervisor)."""
        offset = cell * RECORD_SIZE + _SAMPLE_OFFSET
        self._records[offset : offset + _RECORD_SAMPLE.size] = _RECORD_SAMPLE.pack(
            rss, cpu_user, cpu_system, cpu_percent, fds, sampled_at
        )

    def release(self, cell: int) -> None:
        """Free the cell of a worker that exited: its session count goes back to 0."""
        self._sessions[cell] = 0
        offset = cell * RECORD_SIZE
        self._records[offset : offset + RECORD_SIZE] = bytes(RECORD_SIZE)
        self._free.append(cell)
        self._free.sort(reverse=True)

    def _write_record(
        self,
        cell: int,
        pid: int,
        slot: int,
        generation: int,
        state: WorkerState,
        started_at: float,
    ) -> None:
        offset = cell * RECORD_SIZE
        self._records[offset : offset + RECORD_SIZE] = bytes(RECORD_SIZE)
        self._records[offset : offset + _RECORD_IDENTITY.size] = _RECORD_IDENTITY.pack(
            pid, slot, generation, state.code, started_at
        )

    # -- both sides ------------------------------------------------------------------------

    def sessions(self, cell: int) -> int:
        """Sessions counted by the worker of ``cell``."""
        return int(self._sessions[cell])

    def total_sessions(self) -> int:
        """Sessions of all workers (what admission compares with ``concurrency``)."""
        return sum(self._sessions[: self._hwm[0]])

    def beat(self, cell: int, now: float) -> None:
        """Record that the worker of ``cell`` is alive at ``now`` (monotonic seconds)."""
        self._doubles[cell * _RECORD_DOUBLES + _HEARTBEAT_INDEX] = now

    def heartbeat(self, cell: int) -> float:
        """The last heartbeat of the worker of ``cell`` (monotonic seconds)."""
        return float(self._doubles[cell * _RECORD_DOUBLES + _HEARTBEAT_INDEX])

    def drain_timeout(self, cell: int) -> float:
        """The drain time the supervisor set for ``cell`` (0.0 = not set)."""
        offset = cell * RECORD_SIZE + _DRAIN_OFFSET
        return float(_DOUBLE.unpack(self._records[offset : offset + 8])[0])

    def records(self) -> list[WorkerRecord]:
        """Every cell in use, in cell order (for status lines and metrics)."""
        result = []
        for cell in range(self._hwm[0]):
            offset = cell * RECORD_SIZE
            pid, slot, generation, code, started_at = _RECORD_IDENTITY.unpack(
                self._records[offset : offset + _RECORD_IDENTITY.size]
            )
            try:
                state = WorkerState.from_code(code)
            except ValueError:  # not written by this layout version: nothing to show
                continue
            if state is WorkerState.FREE:
                continue
            rss, cpu_user, cpu_system, cpu_percent, fds, sampled_at = _RECORD_SAMPLE.unpack(
                self._records[offset + _SAMPLE_OFFSET : offset + _SAMPLE_OFFSET + 48]
            )
            result.append(
                WorkerRecord(
                    cell=cell,
                    pid=pid,
                    slot=slot,
                    generation=generation,
                    state=state,
                    started_at=started_at,
                    sessions=int(self._sessions[cell]),
                    rss=rss,
                    cpu_user=cpu_user,
                    cpu_system=cpu_system,
                    cpu_percent=cpu_percent,
                    fds=fds,
                    sampled_at=sampled_at,
                    heartbeat=float(self._doubles[cell * _RECORD_DOUBLES + _HEARTBEAT_INDEX]),
                )
            )
        return result

    def limiter(self, cell: int, limit: int) -> SharedLimiter:
        """The concurrency gate of the worker that owns ``cell`` (call in that worker)."""
        return SharedLimiter(self._sessions, self._hwm, cell, limit)

    def close(self, *, unlink: bool = True) -> None:
        """Release the views and the segment (and remove the file: supervisor only)."""
        for view in (self._sessions, self._hwm, self._doubles, self._records, self._header):
            view.release()
        self.segment.close(unlink=unlink)


class SharedLimiter:
    """``server.Limiter`` over the scoreboard: a global limit, one counter per worker.

    See the module docstring for the guarantee (over-admission of at most W - 1).
    """

    __slots__ = ("_cell", "_hwm", "_sessions", "limit")

    def __init__(self, sessions: memoryview, hwm: memoryview, cell: int, limit: int) -> None:
        self._sessions = sessions
        self._hwm = hwm
        self._cell = cell
        self.limit = limit

    @property
    def active(self) -> int:
        """Sessions of this worker."""
        return int(self._sessions[self._cell])

    def has_room(self) -> bool:
        """First half of :meth:`try_acquire`: True while the global total is below the limit."""
        return sum(self._sessions[: self._hwm[0]]) < self.limit

    def take(self) -> None:
        """Second half of :meth:`try_acquire`: count one more session of this worker."""
        self._sessions[self._cell] += 1

    def try_acquire(self) -> bool:
        """Admit one session if the proxy-wide total is below the limit."""
        if sum(self._sessions[: self._hwm[0]]) >= self.limit:
            return False
        self._sessions[self._cell] += 1
        return True

    def release(self) -> None:
        """A session of this worker ended."""
        cell = self._cell
        if self._sessions[cell]:
            self._sessions[cell] -= 1


def create_doppel_segment(directory: str | None = None) -> Segment:
    """The doppelganger's learned state (layout: ``mtgworkers.defense.doppel.SharedState``),
    initialised with mtg's defaults. Workers map it through fork; the raiding worker claims
    raids under ``flock`` on its own descriptor (:meth:`Segment.reopen`). Raises OSError."""
    segment = Segment("doppel", SharedState.SIZE, directory)
    SharedState(segment.map)
    return segment


class ReplayCache:
    """The shared anti-replay filter's segment (supervisor side)."""

    def __init__(self, segment: Segment, max_size: int, error_rate: float) -> None:
        """Internal: use :meth:`create`."""
        self.segment = segment
        self.max_size = max_size
        self.error_rate = error_rate

    @classmethod
    def create(cls, max_size: int, error_rate: float, directory: str | None = None) -> ReplayCache:
        """Create the segment and an empty filter in it. Raises OSError, ValueError."""
        segment = Segment("replay", StableBloomFilter.buffer_size(max_size), directory)
        try:
            StableBloomFilter.create(segment.map, max_size, error_rate)
        except BaseException:
            segment.close()
            raise
        return cls(segment, max_size, error_rate)

    @classmethod
    def inherit(cls, fd: int, path: str, max_size: int, error_rate: float) -> ReplayCache:
        """The supervisor's replay cache in a worker started by exec. Raises OSError."""
        return cls(Segment.inherit(fd, path), max_size, error_rate)

    @property
    def path(self) -> str:
        return self.segment.path

    def matches(self, max_size: int, error_rate: float) -> bool:
        """True when a config with these parameters can keep using this filter."""
        return (self.max_size, self.error_rate) == (max_size, error_rate)

    def open_filter(self) -> LockedReplayFilter:
        """The filter for the calling worker, with its own lock descriptor (after fork)."""
        return LockedReplayFilter(StableBloomFilter.attach(self.segment.map), self.segment.reopen())

    def close(self, *, unlink: bool = True) -> None:
        self.segment.close(unlink=unlink)


class LockedReplayFilter:
    """``server.ReplayFilter``: the shared filter, ``test_and_add`` under ``flock``."""

    __slots__ = ("_filter", "lock_fd")

    def __init__(self, bloom: StableBloomFilter, lock_fd: int) -> None:
        self._filter = bloom
        self.lock_fd = lock_fd

    def test_and_add(self, key: bytes, rnd: int | None = None) -> bool:
        """True if ``key`` was seen before by any worker (a replay); adds it either way."""
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            return self._filter.test_and_add(key, rnd)
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
