"""What runs in a worker process: one uvloop loop serving one slot's socket.

The supervisor forks and execs a fresh interpreter (``supervisor/launch.py``), which runs
:func:`exec_main`: it reads the launch spec, parses the configuration with the code that is
installed now, maps the inherited shared memory and calls :func:`worker_main`, which never
returns: it ends the process with ``os._exit``.

Talking to the supervisor:

- the *report pipe* (worker -> supervisor): one JSON line, ``{"event": "ready"}`` once the
  worker accepts on its socket, or ``{"event": "error", "error": "..."}`` when it cannot
  boot (then it exits with :data:`WORKER_BOOT_ERROR`);
- signals (supervisor -> worker): SIGTERM drains (stop accepting, let sessions end for
  the drain time the supervisor wrote into the scoreboard, then cut the rest), SIGQUIT
  stops at once; SIGINT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR2 are ignored (they are meant for
  the supervisor, and a terminal sends some of them to the whole process group); SIGUSR1
  reopens log files (stdout: nothing to do);
- the *life pipe*: the worker holds its read end, only the supervisor holds the write
  end, so end-of-file means the supervisor is gone. Together with
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` and a parent-PID check every second this makes
  sure no worker outlives its supervisor;
- the *heartbeat*: a timer on the worker's event loop writes ``time.monotonic()`` into
  the worker's scoreboard record every :data:`HEARTBEAT_EVERY` seconds, from before boot
  until the loop ends. A loop that stops running callbacks (an endless loop, a blocking
  call, SIGSTOP) stops it, and the supervisor kills and replaces a worker whose heartbeat
  is older than ``[supervisor] worker-timeout``.

Memory after a peak: glibc's allocator keeps the memory freed by closed sessions in its
arenas (a later peak reuses it, but the RSS stays high). Every :data:`TRIM_CHECK_EVERY`
seconds the worker compares its session count with the highest count since the last
trim; once at least :data:`TRIM_MIN_DROP` sessions and half of that peak are gone, it
calls ``malloc_trim(0)``, which returns the free pages to the system. Only on glibc (found
through ctypes; elsewhere the timer is not started), never on a session's path, and
``MTGWORKERS_MALLOC_TRIM=0`` in the environment turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from mtgworkers.defense.antireplay import NoopFilter
from mtgworkers.defense.doppel import SharedState
from supervisor.signals import CAUGHT_SIGNALS, IGNORED_SIGNALS

if TYPE_CHECKING:
    from mtgworkers.config import Config
    from mtgworkers.server import ReplayFilter, Worker
    from supervisor.shm import ReplayCache, Scoreboard, Segment

__all__ = [
    "WORKER_BOOT_ERROR",
    "WORKER_CRASHED",
    "MemoryTrimmer",
    "WorkerSpec",
    "exec_main",
    "worker_main",
]

# Exit statuses of a worker process (0: it stopped because it was told to).
WORKER_CRASHED = 1  # an unexpected exception after boot
WORKER_BOOT_ERROR = 3  # could not start serving; the reason went to the report pipe

PR_SET_PDEATHSIG = 1
PARENT_CHECK_EVERY = 1.0
HEARTBEAT_EVERY = 0.5
TRIM_CHECK_EVERY = 5.0
TRIM_MIN_DROP = 256  # sessions
TRIM_ENV = "MTGWORKERS_MALLOC_TRIM"

_log = logging.getLogger("mtgworkers.worker")


@dataclass
class WorkerSpec:
    """Everything a worker process gets from the supervisor (built by :func:`exec_main`
    from the launch spec and the inherited descriptors)."""

    slot: int
    generation: int
    cell: int  # its scoreboard cell (session counter)
    config: Config
    sock: socket.socket  # the slot's listening socket
    report_fd: int  # write end of its report pipe
    life_fd: int  # read end of the life pipe
    supervisor_pid: int
    scoreboard: Scoreboard
    replay: ReplayCache | None
    doppel: Segment | None = None  # the doppelganger's learned state (shm.create_doppel_segment)
    startup_checks: bool = False  # mtg's start-up SNI-DNS check: one worker per generation


def exec_main(argv: list[str]) -> NoReturn:
    """The entry point of a worker's fresh interpreter (``supervisor/launch.py``): read the
    launch spec from the descriptor named by ``argv[0]``, rebuild the worker's parts and
    run it. Ends the process, never returns; a spec, configuration or segment this code
    cannot use goes to the report pipe and exits with :data:`WORKER_BOOT_ERROR`."""
    from supervisor.launch import LaunchSpec

    try:
        with os.fdopen(int(argv[0]), "rb") as stream:
            raw = stream.read()
    except (IndexError, ValueError, OSError) as exc:
        print(f"mtgworkers worker: cannot read the launch spec: {exc}", file=sys.stderr)
        os._exit(WORKER_BOOT_ERROR)
    report_fd = -1
    try:
        report_fd = int(json.loads(raw)["report_fd"])
        spec = _spec_from_launch(LaunchSpec.decode(raw))
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        if report_fd >= 0:
            _report(report_fd, event="error", error=reason)
        else:
            print(f"mtgworkers worker: {reason}", file=sys.stderr)
        os._exit(WORKER_BOOT_ERROR)
    worker_main(spec)


def _spec_from_launch(launch: object) -> WorkerSpec:
    """The launch spec -> a WorkerSpec with this code's objects. Raises ValueError,
    OSError, ConfigError (whose text names the key)."""
    from mtgworkers import config as config_module
    from mtgworkers import logs
    from supervisor.launch import LaunchSpec
    from supervisor.shm import ReplayCache, Scoreboard, Segment

    assert isinstance(launch, LaunchSpec)
    try:
        config = config_module.parse(launch.config_data, base_dir=launch.config_base_dir)
    except config_module.ConfigError as exc:
        raise ValueError(f"this worker code refuses the configuration: {exc}") from None
    logs.setup(config.debug)
    os.set_inheritable(launch.report_fd, False)
    os.set_inheritable(launch.life_fd, False)
    sock = socket.socket(fileno=launch.listen_fd)
    sock.set_inheritable(False)
    scoreboard = Scoreboard.inherit(launch.scoreboard_fd, launch.scoreboard_path)
    replay = None
    if launch.replay_fd is not None and launch.replay_path is not None:
        replay = ReplayCache.inherit(
            launch.replay_fd, launch.replay_path, launch.replay_max_size, launch.replay_error_rate
        )
    doppel = None
    if launch.doppel_fd is not None and launch.doppel_path is not None:
        doppel = Segment.inherit(launch.doppel_fd, launch.doppel_path)
    return WorkerSpec(
        slot=launch.slot,
        generation=launch.generation,
        cell=launch.cell,
        config=config,
        sock=sock,
        report_fd=launch.report_fd,
        life_fd=launch.life_fd,
        supervisor_pid=launch.supervisor_pid,
        scoreboard=scoreboard,
        replay=replay,
        doppel=doppel,
        startup_checks=launch.startup_checks,
    )


def worker_main(spec: WorkerSpec) -> NoReturn:
    """Run a worker in this (fresh) process; ends the process, never returns."""
    code = WORKER_CRASHED
    try:
        _detach_from_supervisor(spec)
        code = _serve(spec)
    except BaseException as exc:  # the exit code says it; keep the reason in the log
        with contextlib.suppress(Exception):
            _log.error("worker crashed", extra={"error": repr(exc)}, exc_info=exc)
    finally:
        with contextlib.suppress(Exception):
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _detach_from_supervisor(spec: WorkerSpec) -> None:
    """Set the signal dispositions of a worker and tie its life to the supervisor's."""
    for signum in CAUGHT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN if signum in IGNORED_SIGNALS else signal.SIG_DFL)
    set_parent_death_signal(signal.SIGKILL)  # already set before the exec; harmless again
    if os.getppid() != spec.supervisor_pid:  # it died before prctl() took effect
        os._exit(0)
    field = WorkerField(spec.slot)
    for handler in logging.getLogger().handlers:
        handler.addFilter(field)


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies (prctl).

    Returns False where that is not available (not Linux, no libc); the life pipe and
    the parent-PID check still stop the worker there.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class WorkerField(logging.Filter):
    """Adds ``worker`` (the slot number) to every log record of a worker process."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.slot
        return True


def _report(fd: int, **message: object) -> None:
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
    except OSError:  # the supervisor is gone: the life pipe will stop us
        pass


def _serve(spec: WorkerSpec) -> int:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    heartbeat = Heartbeat(spec.scoreboard, spec.cell, loop)
    heartbeat.start()
    trimmer = MemoryTrimmer.for_this_process(lambda: spec.scoreboard.sessions(spec.cell), loop)
    if trimmer is not None:
        trimmer.start()
    detach: list[Callable[[], None]] = []
    try:
        # One run_until_complete() for boot and service: uvloop only listens for signals
        # while it runs, and a SIGTERM that arrived between two runs would wait for the
        # next signal before its handler ran.
        return loop.run_until_complete(_boot_and_serve(spec, loop, detach))
    finally:
        for detach_stats in detach:
            with contextlib.suppress(Exception):
                detach_stats()  # after the sessions ended: their last traffic is counted
        heartbeat.stop()
        if trimmer is not None:
            trimmer.stop()
        loop.close()


class Heartbeat:
    """A timer chain on the worker's loop that bumps its heartbeat in the scoreboard.

    The first beat is written by :meth:`start`, before the loop runs; then one every
    :data:`HEARTBEAT_EVERY` seconds for as long as the loop runs callbacks. The supervisor
    compares it with its own ``time.monotonic()`` (CLOCK_MONOTONIC is system-wide).
    """

    def __init__(self, scoreboard: Scoreboard, cell: int, loop: asyncio.AbstractEventLoop):
        self.scoreboard = scoreboard
        self.cell = cell
        self.loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._beat()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _beat(self) -> None:
        self.scoreboard.beat(self.cell, time.monotonic())
        self._timer = self.loop.call_later(HEARTBEAT_EVERY, self._beat)


class MemoryTrimmer:
    """A timer on the worker's loop that returns freed memory to the system after a peak
    of sessions (``malloc_trim(0)``; see the module docstring)."""

    def __init__(
        self,
        trim: Callable[[], int],
        sessions: Callable[[], int],
        loop: asyncio.AbstractEventLoop,
        *,
        every: float = TRIM_CHECK_EVERY,
        min_drop: int = TRIM_MIN_DROP,
    ) -> None:
        self.trim = trim
        self.sessions = sessions
        self.loop = loop
        self.every = every
        self.min_drop = min_drop
        self.peak = 0
        self.trims = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_this_process(
        cls, sessions: Callable[[], int], loop: asyncio.AbstractEventLoop
    ) -> MemoryTrimmer | None:
        """A trimmer calling glibc's ``malloc_trim``; None without glibc or when
        ``MTGWORKERS_MALLOC_TRIM=0``."""
        if os.environ.get(TRIM_ENV, "1").strip() in ("0", "false", "no", "off"):
            return None
        trim = glibc_malloc_trim()
        if trim is None:
            return None
        return cls(trim, sessions, loop)

    def start(self) -> None:
        self._timer = self.loop.call_later(self.every, self.check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def check(self) -> bool:
        """One check (the timer's callback): trim when the sessions fell far enough below
        the peak since the last trim. Returns whether it trimmed."""
        self._timer = self.loop.call_later(self.every, self.check)
        now = self.sessions()
        if now > self.peak:
            self.peak = now
            return False
        if self.peak - now < self.min_drop or now > self.peak // 2:
            return False
        peak, self.peak = self.peak, now
        rss_before = _rss()
        started = time.perf_counter()
        gc.collect()  # sessions caught in reference cycles free their buffers first
        self.trim()
        self.trims += 1
        _log.info(
            "returned freed memory to the system",
            extra={
                "sessions": now,
                "peak_sessions": peak,
                "rss_before": rss_before,
                "rss_after": _rss(),
                "seconds": round(time.perf_counter() - started, 4),
            },
        )
        return True


def glibc_malloc_trim() -> Callable[[], int] | None:
    """``malloc_trim(0)`` of this process's glibc, or None (not glibc, no ctypes)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return lambda: int(malloc_trim(0))


def _rss() -> int:
    """This process's resident set size in bytes (0 when /proc cannot tell)."""
    try:
        with open("/proc/self/statm", "rb") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def _boot_and_serve(
    spec: WorkerSpec, loop: asyncio.AbstractEventLoop, detach: list[Callable[[], None]]
) -> int:
    from mtgworkers.server import StartupError, build_worker

    try:
        replay_filter: ReplayFilter = (
            spec.replay.open_filter() if spec.replay is not None else NoopFilter()
        )
        # Metrics files are named after the cell: unique among live workers, and the
        # replacement of a dead worker continues its counters.
        doppel = doppel_lock = None
        if spec.doppel is not None:
            doppel = SharedState(spec.doppel.map)
            doppel_lock = spec.doppel.reopen()
        worker, detach_stats = build_worker(
            spec.config,
            loop,
            metrics_id=spec.cell,
            replay_filter=replay_filter,
            limiter=spec.scoreboard.limiter(spec.cell, spec.config.concurrency),
            doppel=doppel,
            doppel_lock=doppel_lock,
            startup_checks=spec.startup_checks,
        )
        detach.append(detach_stats)
        await worker.start(sockets=[spec.sock])
    except Exception as exc:
        reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
        _report(spec.report_fd, event="error", error=reason)
        return WORKER_BOOT_ERROR
    lifecycle = _Lifecycle(worker, spec, loop)
    lifecycle.install()  # before "ready": the supervisor may retire us right after it
    from mtgworkers import __version__

    _report(spec.report_fd, event="ready", version=__version__)
    _log.debug("worker is serving", extra={"generation": spec.generation})
    await lifecycle.done
    return 0


class _Lifecycle:
    """The worker's reactions to signals and to the supervisor's death."""

    def __init__(self, worker: Worker, spec: WorkerSpec, loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.spec = spec
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._immediate = False
        self._watch: asyncio.TimerHandle | None = None

    def install(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.graceful)
        loop.add_signal_handler(signal.SIGQUIT, self.immediate, "SIGQUIT")
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        loop.add_reader(self.spec.life_fd, self.parent_gone)
        self._watch = loop.call_later(PARENT_CHECK_EVERY, self.check_parent)

    def graceful(self) -> None:
        """SIGTERM: drain for the time the supervisor set (else graceful-timeout)."""
        if self._task is not None:
            return
        timeout = self.spec.scoreboard.drain_timeout(self.spec.cell)
        if timeout <= 0:
            timeout = self.spec.config.supervisor.graceful_timeout
        _log.debug(
            "worker stops accepting and drains",
            extra={"sessions": len(self.worker.sessions), "timeout": timeout},
        )
        self._task = self.loop.create_task(self._drain(timeout))

    def immediate(self, reason: str) -> None:
        """SIGQUIT or supervisor gone: close every session now."""
        if self._immediate:
            return
        self._immediate = True
        if self._task is not None:
            self._task.cancel()
        _log.debug("worker stops at once", extra={"reason": reason})
        self._task = self.loop.create_task(self._stop())

    def reopen_logs(self) -> None:
        # Logs go to stdout, which the supervisor's manager (systemd, docker) owns.
        _log.debug("SIGUSR1: logging to stdout, nothing to reopen")

    def parent_gone(self) -> None:
        self.loop.remove_reader(self.spec.life_fd)
        _log.warning("supervisor is gone; worker stops at once")
        self.immediate("supervisor gone")

    def check_parent(self) -> None:
        if os.getppid() != self.spec.supervisor_pid:
            self.parent_gone()
            return
        self._watch = self.loop.call_later(PARENT_CHECK_EVERY, self.check_parent)

    async def _drain(self, timeout: float) -> None:
        # Worker.drain() also waits for connections accepted in the loop turn that
        # stopped accepting (their connection_made() comes a few iterations later).
        cut = await self.worker.drain(timeout)
        if cut:
            _log.warning(
                "graceful-timeout passed; closing the remaining sessions",
                extra={"sessions": cut, "timeout": timeout},
            )
        self._finish()

    async def _stop(self) -> None:
        await self.worker.stop()
        self._finish()

    def _finish(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if not self.done.done():
            self.done.set_result(None)
