"""The arbiter: the supervisor process's one loop (gunicorn's arbiter shape).

Signal handlers do nothing but append the signal to :attr:`Arbiter.signal_queue` (the
C-level wake-up fd makes ``select`` return). The loop then, in order: dispatches queued
signals to ``handle_<name>``; reaps dead workers (``waitpid(WNOHANG)``); completes the
initial boot or a reload once every new worker reported ready; spawns or retires workers
so each slot has one worker of the current generation (``manage_workers``); kills workers
past their deadline or frozen (``murder_workers``); samples the workers' resources
(``sample_workers``); and sleeps in ``select`` on the wake-up pipe and the workers'
report pipes. The supervisor never runs an event loop or a thread: it starts workers from
this loop, where no lock is held, by fork and exec of a fresh interpreter
(``supervisor/launch.py``), so every worker runs the code installed when it starts: after
an upgrade of the package, a reload puts the new code into service without dropping a
session. The supervisor itself keeps the code it started with.

Frozen workers: every worker's event loop bumps a heartbeat in its scoreboard record
(``supervisor/worker.py``). A worker that reported ready (also once it is retiring) whose
heartbeat is older than ``[supervisor] worker-timeout`` is killed with SIGKILL; when it
is reaped, its slot gets a new worker like after any other death. A booting worker is
judged by ``BOOT_TIMEOUT`` instead (before its loop runs there is no heartbeat to expect).

Generations: the workers started together from one configuration. A reload (SIGHUP)
starts generation N+1 next to N; once every worker of N+1 reported ready, N is retired
(SIGTERM: stop accepting, drain up to ``graceful-timeout``, then close the rest). Both
generations accept from the same slot sockets meanwhile, so no connection is refused.

Exit statuses: 0 after SIGTERM/SIGINT/SIGQUIT; on failures :class:`SupervisorError` is
raised after cleanup (the CLI prints it and exits 1): a slot socket cannot be bound, the
pid file is taken, or a worker cannot boot (instead of restarting it forever).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mtgworkers import __version__, links, logs
from mtgworkers import config as config_module
from supervisor import shm
from supervisor.launch import LaunchSpec, launch
from supervisor.listeners import ListenError, bind_slot_socket, tcp_migrate_req
from supervisor.notify import Notifier
from supervisor.pidfile import PidFileError, remove_pid_file, write_pid_file
from supervisor.procstats import Sample, Sampler
from supervisor.signals import CAUGHT_SIGNALS, SUPERVISOR_SIGNALS
from supervisor.states import WorkerState
from supervisor.worker import WORKER_BOOT_ERROR

if TYPE_CHECKING:
    from mtgworkers.config import Config
    from supervisor.exporter import Exporter

__all__ = ["Arbiter", "SupervisorError", "heartbeat_expired", "resolve_workers"]

_log = logging.getLogger("supervisor")

# How long a new worker may take to report ready (it resolves the fronting host first).
BOOT_TIMEOUT = 30.0
# A retiring worker still running this long after graceful-timeout is killed.
KILL_MARGIN = 5.0
# SIGQUIT -> SIGKILL.
QUIT_TIMEOUT = 5.0
SAMPLE_EVERY = 1.0
# Restart back-off of a slot whose workers keep dying: the first FREE_RESTARTS deaths
# within CRASH_WINDOW seconds restart at once, then 0.5 s, 1 s, 2 s ... up to MAX_BACKOFF.
CRASH_WINDOW = 60.0
FREE_RESTARTS = 3
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# worker-max-rss is judged only on workers that have been ready this long.
RSS_MIN_AGE = 2.0
# Two heartbeat checks this far apart mean the supervisor itself did not run (stopped with
# its process group, starved): the workers' heartbeats are then judged from that moment,
# since a worker resumed with it may not have run its loop yet.
SUPERVISOR_STALL = 3.0
# Scoreboard cells: one per worker process alive at once (all generations still draining).
CELLS = 4 * config_module.MAX_WORKERS
MAX_QUEUED_SIGNALS = 10

STARTING, RUNNING, STOPPING, QUITTING = "starting", "running", "stopping", "quitting"

# What a configuration was parsed from: decoded TOML data (or simple-run's equivalent) and
# the directory relative paths are resolved against. Workers parse it with their own code.
ConfigSource = tuple[Mapping[str, Any], str | None]


class SupervisorError(Exception):
    """The proxy cannot run; the message says why (printed by the CLI, exit status 1)."""


def resolve_workers(configured: int) -> int:
    """``[supervisor] workers``: the configured count, or one per usable CPU for 0."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, config_module.MAX_WORKERS))


@dataclass(eq=False)
class WorkerProcess:
    """The supervisor's view of one worker process."""

    pid: int
    slot: int
    generation: int
    cell: int
    config: Config
    report_fd: int
    spawned_at: float  # monotonic
    state: WorkerState = WorkerState.BOOTING
    ready_at: float | None = None
    kill_at: float | None = None  # monotonic; SIGKILL when still alive then
    killed: bool = False
    unresponsive: bool = False  # killed for worker-timeout
    error: str | None = None  # why it could not boot (report pipe or boot timeout)
    replaces: int | None = None  # worker-max-rss: pid this one takes over from
    replaced_by: int | None = None
    sample: Sample | None = None
    version: str | None = None  # the package version it runs (from its "ready" report)
    buffer: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class Slot:
    """A worker slot: its listening socket outlives the slot's workers."""

    index: int
    sock: socket.socket
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    respawn_at: float = 0.0  # monotonic


@dataclass(eq=False)
class Reload:
    """A generation being started by SIGHUP, not yet serving alone."""

    generation: int
    config: Config
    source: ConfigSource
    workers: int
    sockets: dict[int, socket.socket]  # new slot sockets made for it (new slots, new bind-to)
    replay: shm.ReplayCache | None
    started: float  # monotonic


class Arbiter:
    """Supervises the worker processes of one proxy; see the module docstring."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        source: ConfigSource | None = None,
        *,
        notifier: Notifier | None = None,
    ) -> None:
        """``source``: what ``config`` was parsed from (None: read ``config_path`` again
        at start)."""
        self.config = config
        self.config_path = config_path
        self.source = source
        self.pid = os.getpid()
        self.generation = 1
        self._last_generation = 1  # generation numbers are never reused, failed ones neither
        self.num_workers = resolve_workers(config.supervisor.workers)
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, WorkerProcess] = {}
        self.pending: Reload | None = None
        self.reload_again = False
        self.signal_queue: list[int] = []
        self.state = STARTING
        self.failure: str | None = None
        self.notifier = notifier or Notifier()
        self.sampler = Sampler()
        self.scoreboard: shm.Scoreboard | None = None
        self.replay: shm.ReplayCache | None = None
        # what the doppelganger learned: one segment for the supervisor's life, so a
        # reload keeps the learned timing and the time of the last raid
        self.doppel: shm.Segment | None = None
        self.pid_file: str | None = None
        self.exporter: Exporter | None = None  # [stats.prometheus]: the metrics process
        self._wake_r = self._wake_w = self._life_r = self._life_w = -1
        self._next_sample = 0.0
        self._last_liveness_check = 0.0
        self._liveness_since = 0.0  # heartbeats older than this count from here
        self._status = ""

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until shutdown; return the exit status.

        Raises :class:`SupervisorError` (after stopping every worker) when the proxy
        cannot start or a worker cannot boot.
        """
        try:
            self.start()
            while self.state in (STARTING, RUNNING) or self.workers:
                self.handle_signals()
                self.reap_workers()
                self.check_generations()
                self.manage_workers()
                self.murder_workers()
                self.sample_workers()
                self.sleep()
        finally:
            self.cleanup()
        if self.failure is not None:
            raise SupervisorError(self.failure)
        _log.warning("supervisor stopped")
        return 0

    def start(self) -> None:
        """Bind the slot sockets, create shared memory and the pid file, install signals."""
        from mtgworkers.server import raise_nofile_limit

        if self.source is None:
            if self.config_path is None:
                raise SupervisorError("no configuration to hand to the workers")
            try:
                self.source = config_module.read(self.config_path)
            except config_module.ConfigError as exc:
                raise SupervisorError(str(exc)) from None
        for path in shm.remove_stale_segments():
            _log.info("removed shared memory of a supervisor that is gone", extra={"path": path})
        raise_nofile_limit(self.config.concurrency)
        try:
            for index in range(self.num_workers):
                self.slots[index] = Slot(index, bind_slot_socket(self.config.bind_to))
        except ListenError as exc:
            raise SupervisorError(str(exc)) from None
        self._set_pid_file(self.config.supervisor.pid_file)
        try:
            self.scoreboard = shm.Scoreboard.create(CELLS)
            self.replay = self._replay_cache_for(self.config)
            self.doppel = shm.create_doppel_segment()
        except OSError as exc:
            raise SupervisorError(f"cannot create shared memory: {exc}") from None
        if self.config.stats.prometheus.enabled:
            # Before the first fork: workers inherit its PROMETHEUS_MULTIPROC_DIR.
            from supervisor.exporter import Exporter, ExporterError

            try:
                self.exporter = Exporter(
                    self.config.stats.prometheus,
                    scoreboard=self.scoreboard,
                    debug=self.config.debug,
                )
                self.exporter.start()
            except (ExporterError, OSError) as exc:
                raise SupervisorError(f"cannot start the metrics exporter: {exc}") from None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._life_r, self._life_w = os.pipe()
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in CAUGHT_SIGNALS:
            signal.signal(signum, self._on_signal)
        _log.info(
            "supervisor started",
            extra={
                "pid": self.pid,
                "version": __version__,
                "workers": self.num_workers,
                "bind_to": str(self.config.bind_to),
                "scoreboard": self.scoreboard.path,
                "replay_cache": self.replay.path if self.replay else None,
            },
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only enqueue: the wake-up fd already made select() return.
        if signum != signal.SIGCHLD and len(self.signal_queue) < MAX_QUEUED_SIGNALS:
            self.signal_queue.append(signum)

    def sleep(self) -> None:
        """Wait in select() for a signal, a worker report or the next deadline (<= 1 s)."""
        now = time.monotonic()
        deadline = now + SAMPLE_EVERY
        for worker in self.workers.values():
            if worker.kill_at is not None and not worker.killed:
                deadline = min(deadline, worker.kill_at)
            if worker.state == WorkerState.BOOTING and not worker.killed:
                deadline = min(deadline, worker.spawned_at + BOOT_TIMEOUT)
        for slot in self.slots.values():
            if slot.respawn_at > now:
                deadline = min(deadline, slot.respawn_at)
        reports = {w.report_fd: w for w in self.workers.values() if w.report_fd >= 0}
        if self.signal_queue or (self.state in (STOPPING, QUITTING) and not self.workers):
            return
        try:
            readable, _, _ = select.select(
                [self._wake_r, *reports], [], [], max(0.0, deadline - now)
            )
        except InterruptedError:
            return
        for fd in readable:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            else:
                self._read_report(reports[fd])

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            name = SUPERVISOR_SIGNALS.get(signal.Signals(signum))
            if name is not None:
                _log.info("signal received", extra={"signal": signal.Signals(signum).name})
                getattr(self, f"handle_{name}")()

    # -- signals ---------------------------------------------------------------------------

    def handle_hup(self) -> None:
        """Reload the configuration (after the initial boot; ignored while stopping)."""
        if self.state == STARTING:
            self.reload_again = True
        elif self.state == RUNNING:
            self.reload()

    def handle_term(self) -> None:
        self.graceful_stop()

    def handle_int(self) -> None:
        # A second Ctrl-C does not wait for the sessions.
        if self.state == STOPPING:
            self.quit()
        else:
            self.graceful_stop()

    def handle_quit(self) -> None:
        self.quit()

    def handle_ttin(self) -> None:
        if self.state not in (STARTING, RUNNING):
            return
        if self.num_workers >= config_module.MAX_WORKERS:
            _log.warning("SIGTTIN: already at the maximum number of workers")
            return
        self.num_workers += 1
        _log.warning("SIGTTIN: one worker more", extra={"workers": self.num_workers})

    def handle_ttou(self) -> None:
        if self.state not in (STARTING, RUNNING):
            return
        if self.num_workers <= 1:
            _log.warning("SIGTTOU: cannot remove the last worker")
            return
        self.num_workers -= 1
        _log.warning("SIGTTOU: one worker less", extra={"workers": self.num_workers})

    def handle_usr1(self) -> None:
        _log.info("SIGUSR1: logging to stdout, nothing to reopen")
        for worker in list(self.workers.values()):
            self._signal(worker, signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Log every worker's sessions and resources (hash balancing is not load balancing:
        this shows the skew)."""
        self._refresh_samples()
        assert self.scoreboard is not None
        records = self.scoreboard.records()
        now = time.monotonic()
        versions = {w.pid: w.version for w in self.workers.values()}
        _log.warning(
            "worker status",
            extra={
                "generation": self.generation,
                "version": __version__,
                "sessions": sum(record.sessions for record in records),
                "workers": [
                    {
                        "slot": record.slot,
                        "pid": record.pid,
                        "generation": record.generation,
                        "state": record.state,
                        "version": versions.get(record.pid),
                        "sessions": record.sessions,
                        "rss": record.rss,
                        "cpu_percent": round(record.cpu_percent, 1),
                        "fds": record.fds,
                        "heartbeat_age": round(now - record.heartbeat, 3),
                    }
                    for record in records
                ],
            },
        )

    # -- lifecycle -------------------------------------------------------------------------

    def graceful_stop(self) -> None:
        """SIGTERM/SIGINT: stop accepting everywhere, let sessions drain, then exit 0."""
        if self.state in (STOPPING, QUITTING):
            return
        self.state = STOPPING
        timeout = self.config.supervisor.graceful_timeout
        self.notifier.stopping("draining sessions")
        _log.warning("shutting down: draining sessions", extra={"graceful_timeout": timeout})
        self._drop_pending()
        self._close_slots()
        for worker in list(self.workers.values()):
            if worker.state != WorkerState.RETIRING:
                self.retire(worker, timeout)

    def quit(self) -> None:
        """SIGQUIT: close every session now and exit."""
        if self.state == QUITTING:
            return
        if self.state != STOPPING:
            self.notifier.stopping("stopping")
        self.state = QUITTING
        _log.warning("shutting down at once")
        self._drop_pending()
        self._close_slots()
        deadline = time.monotonic() + QUIT_TIMEOUT
        for worker in list(self.workers.values()):
            worker.state = WorkerState.RETIRING
            worker.kill_at = min(worker.kill_at or deadline, deadline)
            self._signal(worker, signal.SIGQUIT)

    def halt(self, reason: str) -> None:
        """Stop everything because the proxy cannot go on; run() raises with ``reason``."""
        if self.failure is None:
            self.failure = reason
            _log.error("supervisor stops", extra={"error": reason})
        self.quit()

    def retire(self, worker: WorkerProcess, timeout: float) -> None:
        """SIGTERM ``worker``: it stops accepting and drains for up to ``timeout`` seconds."""
        assert self.scoreboard is not None
        worker.state = WorkerState.RETIRING
        worker.kill_at = time.monotonic() + timeout + KILL_MARGIN
        self.scoreboard.set_drain_timeout(worker.cell, timeout)
        self.scoreboard.set_state(worker.cell, WorkerState.RETIRING)
        _log.info(
            "retiring worker",
            extra={"slot": worker.slot, "pid": worker.pid, "generation": worker.generation},
        )
        self._signal(worker, signal.SIGTERM)

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config; if valid, start a new generation beside the old one.

        An invalid config is logged (the message names the key) and the running one stays.
        """
        if self.pending is not None:
            self.reload_again = True
            _log.info("reload in progress; another one follows it")
            return
        old = self.config
        assert self.source is not None
        source: ConfigSource = self.source
        if self.config_path is None:
            new = old  # simple-run: nothing to re-read, the workers are replaced
        else:
            try:
                source = config_module.read(self.config_path)
                new = config_module.parse(source[0], base_dir=source[1])
            except config_module.ConfigError as exc:
                self._reload_refused(str(exc))
                return
        refusal = _unreloadable(old, new) or self._claim_pid_file(new)
        if refusal is not None:
            self._reload_refused(refusal)
            return
        workers = resolve_workers(new.supervisor.workers)
        self.notifier.reloading("reloading configuration")
        _log.warning(
            "reloading configuration", extra={"path": self.config_path, "workers": workers}
        )
        if new.debug != old.debug:
            logs.setup(new.debug)  # before the fork: the new workers inherit it
        for key in new.deprecated:
            advice = config_module.deprecation_message(key)
            _log.warning(
                "deprecated option in the reloaded configuration",
                extra={"option": key, "advice": advice},
            )
        for warning in config_module.warnings(new):
            _log.warning(warning)
        from mtgworkers.server import raise_nofile_limit

        raise_nofile_limit(new.concurrency)
        sockets: dict[int, socket.socket] = {}
        try:
            for index in range(workers):
                if new.bind_to != old.bind_to or index not in self.slots:
                    sockets[index] = bind_slot_socket(new.bind_to)
            replay = self._replay_cache_for(new)
        except (ListenError, OSError) as exc:
            for sock in sockets.values():
                sock.close()
            self._reload_failed(str(exc), new)
            return
        self._last_generation += 1
        self.pending = Reload(
            self._last_generation, new, source, workers, sockets, replay, time.monotonic()
        )
        for index in range(workers):
            sock = sockets.get(index) or self.slots[index].sock
            spawned = self.spawn(
                index, self.pending.generation, new, sock, startup_checks=index == 0
            )
            if spawned is None:
                self.abort_reload("cannot start the workers of the new configuration")
                return

    def _reload_refused(self, reason: str) -> None:
        _log.error(
            "cannot reload configuration; keeping the running one",
            extra={"path": self.config_path, "error": reason},
        )
        if self.exporter is not None:
            self.exporter.reload_finished(False)

    def _replay_cache_for(self, config: Config) -> shm.ReplayCache | None:
        """The replay cache for ``config``: the running one when its size fits, else new."""
        anti_replay = config.defense.anti_replay
        if not anti_replay.enabled:
            return None
        if self.replay is not None:
            if self.replay.matches(anti_replay.max_size, anti_replay.error_rate):
                return self.replay
            _log.warning(
                "anti-replay cache size changed: the new workers start with an empty cache"
            )
        return shm.ReplayCache.create(anti_replay.max_size, anti_replay.error_rate)

    def complete_reload(self) -> None:
        """Every worker of the new generation is ready: retire the older ones."""
        pending = self.pending
        assert pending is not None
        self.pending = None
        self.config = pending.config
        self.source = pending.source
        self.generation = pending.generation
        self.num_workers = pending.workers
        for index, sock in pending.sockets.items():
            slot = self.slots.get(index)
            if slot is None:
                self.slots[index] = Slot(index, sock)
            else:  # bind-to changed: the old socket closes when its workers stop accepting
                slot.sock.close()
                slot.sock = sock
        if pending.replay is not self.replay:
            if self.replay is not None:
                self.replay.close()  # retiring workers keep their own mapping
            self.replay = pending.replay
        timeout = self.config.supervisor.graceful_timeout
        for worker in list(self.workers.values()):
            if worker.generation < self.generation and worker.state != WorkerState.RETIRING:
                self.retire(worker, timeout)
        self._switch_pid_file(self.config.supervisor.pid_file)
        if self.exporter is not None:
            self.exporter.reload_finished(True)
        self.notifier.ready(self.status_text())
        _log.warning(
            "configuration reloaded",
            extra={
                "generation": self.generation,
                "versions": sorted(
                    {
                        str(w.version)
                        for w in self.workers.values()
                        if w.generation == self.generation
                    }
                ),
                "workers": self.num_workers,
                "seconds": round(time.monotonic() - pending.started, 3),
            },
        )
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def abort_reload(self, reason: str) -> None:
        """A worker of the new generation failed: stop that generation, keep the old one."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        for worker in list(self.workers.values()):
            if worker.generation == pending.generation and worker.state != WorkerState.RETIRING:
                self.retire(worker, self.config.supervisor.graceful_timeout)
        for sock in pending.sockets.values():
            sock.close()
        if pending.replay is not None and pending.replay is not self.replay:
            pending.replay.close()
        self._reload_failed(reason, pending.config)
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def _reload_failed(self, reason: str, new: Config) -> None:
        if new.debug != self.config.debug:
            logs.setup(self.config.debug)
        self._release_pid_file(new)
        self._reload_refused(reason)
        self.notifier.ready(self.status_text())

    def _drop_pending(self) -> None:
        pending, self.pending = self.pending, None
        self.reload_again = False
        if pending is not None:
            for sock in pending.sockets.values():
                sock.close()
            if pending.replay is not None and pending.replay is not self.replay:
                pending.replay.close()
            self._release_pid_file(pending.config)

    # -- workers ---------------------------------------------------------------------------

    def check_generations(self) -> None:
        """Finish the initial boot or a reload when all of its workers are ready."""
        if self.state == STARTING and self._generation_ready(self.generation, self.num_workers):
            self.state = RUNNING
            self.booted()
        if self.pending is not None and self._generation_ready(
            self.pending.generation, self.pending.workers
        ):
            self.complete_reload()

    def _generation_ready(self, generation: int, count: int) -> bool:
        ready = {
            w.slot
            for w in self.workers.values()
            if w.generation == generation and w.state == WorkerState.READY
        }
        return ready.issuperset(range(count))

    def booted(self) -> None:
        self.notifier.ready(self.status_text())
        _log.warning(
            "proxy is listening",
            extra={"bind_to": str(self.config.bind_to), "workers": self.num_workers},
        )
        hint = links.access_hint(self.config_path)
        for link in links.redacted_links(self.config):
            _log.warning("proxy link", extra={"tg_url": link, "hint": hint})
        migrate = tcp_migrate_req()
        if migrate == 0:
            _log.info(
                "net.ipv4.tcp_migrate_req is 0: when a worker slot is removed (SIGTTOU), the "
                "connections waiting in its accept queue are reset; set it to 1 to move them "
                "to the other workers"
            )
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def manage_workers(self) -> None:
        """Give every slot a worker of the current generation; remove surplus slots."""
        if self.state not in (STARTING, RUNNING):
            return
        keep = self.num_workers
        if self.pending is not None:
            keep = max(keep, self.pending.workers)
        for index in sorted(self.slots):
            if index >= keep:
                self._remove_slot(index)
        now = time.monotonic()
        for index in range(self.num_workers):
            slot = self.slots.get(index)
            if slot is None:
                try:
                    slot = self.slots[index] = Slot(index, bind_slot_socket(self.config.bind_to))
                except ListenError as exc:
                    _log.error("cannot add a worker", extra={"error": str(exc)})
                    self.num_workers = index
                    return
            if slot.respawn_at > now or self._has_worker(index, self.generation):
                continue
            first = self.state == STARTING and index == 0
            if (
                self.spawn(index, self.generation, self.config, slot.sock, startup_checks=first)
                is None
            ):
                slot.respawn_at = now + 1.0

    def _has_worker(self, index: int, generation: int) -> bool:
        return any(
            w.slot == index
            and w.generation == generation
            and w.state in (WorkerState.BOOTING, WorkerState.READY)
            for w in self.workers.values()
        )

    def _remove_slot(self, index: int) -> None:
        slot = self.slots.pop(index)
        for worker in list(self.workers.values()):
            if worker.slot == index and worker.state != WorkerState.RETIRING:
                self.retire(worker, self.config.supervisor.graceful_timeout)
        slot.sock.close()
        _log.info(
            "worker slot removed",
            extra={"slot": index, "tcp_migrate_req": tcp_migrate_req()},
        )

    def _close_slots(self) -> None:
        for slot in self.slots.values():
            slot.sock.close()
        self.slots.clear()

    def spawn(
        self,
        index: int,
        generation: int,
        config: Config,
        sock: socket.socket,
        *,
        replaces: int | None = None,
        startup_checks: bool = False,
    ) -> WorkerProcess | None:
        """Start a worker for slot ``index`` (fork and exec, ``supervisor/launch.py``);
        None when no scoreboard cell is free or the fork failed.

        ``startup_checks``: this worker runs mtg's start-up SNI-DNS check (one per
        generation, so the warning is not repeated by every worker).
        """
        assert self.scoreboard is not None
        if threading.active_count() != 1:
            # Forking with threads risks locks held by them; the supervisor has none.
            self.halt("refusing to fork a worker: the supervisor runs threads")
            return None
        try:
            cell = self.scoreboard.claim(index, generation, time.time())
        except LookupError as exc:
            _log.error("cannot start a worker", extra={"slot": index, "error": str(exc)})
            return None
        replay = self.replay
        source = self.source
        if self.pending is not None and generation == self.pending.generation:
            replay = self.pending.replay
            source = self.pending.source
        assert source is not None
        report_r, report_w = os.pipe()
        spec = LaunchSpec(
            slot=index,
            generation=generation,
            cell=cell,
            supervisor_pid=self.pid,
            config_data=source[0],
            config_base_dir=source[1],
            listen_fd=sock.fileno(),
            report_fd=report_w,
            life_fd=self._life_r,
            scoreboard_fd=self.scoreboard.segment.fd,
            scoreboard_path=self.scoreboard.path,
            replay_fd=replay.segment.fd if replay is not None else None,
            replay_path=replay.path if replay is not None else None,
            replay_max_size=replay.max_size if replay is not None else 0,
            replay_error_rate=replay.error_rate if replay is not None else 0.0,
            doppel_fd=self.doppel.fd if self.doppel is not None else None,
            doppel_path=self.doppel.path if self.doppel is not None else None,
            startup_checks=startup_checks,
        )
        try:
            pid = launch(spec)
        except OSError as exc:
            os.close(report_r)
            os.close(report_w)
            self.scoreboard.release(cell)
            _log.error("cannot start a worker", extra={"slot": index, "error": str(exc)})
            return None
        os.close(report_w)
        os.set_blocking(report_r, False)
        self.scoreboard.set_pid(cell, pid)
        worker = WorkerProcess(
            pid, index, generation, cell, config, report_r, time.monotonic(), replaces=replaces
        )
        self.workers[pid] = worker
        _log.info(
            "worker started",
            extra={"slot": index, "pid": pid, "generation": generation, "cell": cell},
        )
        return worker

    def _read_report(self, worker: WorkerProcess) -> bool:
        """Read what the worker wrote to its report pipe; False when nothing was there."""
        try:
            data = os.read(worker.report_fd, 4096)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            os.close(worker.report_fd)
            worker.report_fd = -1
            return False
        worker.buffer += data
        while b"\n" in worker.buffer:
            line, _, rest = bytes(worker.buffer).partition(b"\n")
            worker.buffer[:] = rest
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "ready":
                version = message.get("version")
                worker.version = str(version) if version is not None else None
                self.worker_ready(worker)
            elif message.get("event") == "error":
                worker.error = str(message.get("error"))
        return True

    def worker_ready(self, worker: WorkerProcess) -> None:
        assert self.scoreboard is not None
        if worker.state != WorkerState.BOOTING:
            return
        worker.state = WorkerState.READY
        worker.ready_at = time.monotonic()
        self.scoreboard.set_state(worker.cell, WorkerState.READY)
        _log.info(
            "worker is ready",
            extra={
                "slot": worker.slot,
                "pid": worker.pid,
                "generation": worker.generation,
                "version": worker.version,
                "boot_seconds": round(worker.ready_at - worker.spawned_at, 3),
            },
        )
        if worker.replaces is not None:
            old = self.workers.get(worker.replaces)
            if old is not None and old.state != WorkerState.RETIRING:
                self.retire(old, self.config.supervisor.graceful_timeout)

    def reap_workers(self) -> None:
        """Collect exited workers (waitpid WNOHANG) and decide what each death means.

        Every child is reaped here, the metrics exporter too: its wait status goes to its
        handle, which logs how it ended and restarts it (``Exporter.poll``).
        """
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.worker_exited(worker, status)
            elif self.exporter is not None and self.exporter.owns(pid):
                self.exporter.reaped(status)

    def worker_exited(self, worker: WorkerProcess, status: int) -> None:
        assert self.scoreboard is not None
        if worker.report_fd >= 0:
            while self._read_report(worker):  # its last words (why it could not boot)
                pass
            if worker.report_fd >= 0:
                os.close(worker.report_fd)
                worker.report_fd = -1
        self.scoreboard.release(worker.cell)
        self.sampler.forget(worker.pid)
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        fields = {
            "slot": worker.slot,
            "pid": worker.pid,
            "generation": worker.generation,
            "status": how,
        }
        if worker.state == WorkerState.RETIRING or self.state in (STOPPING, QUITTING):
            _log.info("worker exited", extra=fields)
            return
        pending = self.pending
        if worker.replaces is not None:
            old = self.workers.get(worker.replaces)
            if old is not None:
                old.replaced_by = None
        if worker.state == WorkerState.BOOTING:
            reason = worker.error or f"it ended with {how} before it was ready"
            message = f"worker {worker.slot} cannot start: {reason}"
            if pending is not None and worker.generation == pending.generation:
                self.abort_reload(message)
                return
            if self.state == STARTING or code == WORKER_BOOT_ERROR or worker.error:
                # Restarting a worker that cannot boot would only repeat the failure.
                self.halt(message)
                return
        if pending is not None and worker.generation == pending.generation:
            self.abort_reload(f"worker {worker.slot} of the new configuration died ({how})")
            return
        slot = self.slots.get(worker.slot)
        if slot is None or worker.generation != self.generation:
            _log.info("worker exited", extra=fields)
            return
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - CRASH_WINDOW:
            slot.crashes.popleft()
        recent = len(slot.crashes)
        delay = 0.0
        if recent > FREE_RESTARTS:
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (recent - FREE_RESTARTS - 1))
        slot.respawn_at = now + delay
        if self.exporter is not None:
            from supervisor.exporter import RESTART_TIMEOUT, restart_reason

            reason = RESTART_TIMEOUT if worker.unresponsive else restart_reason(code)
            self.exporter.worker_restarted(reason)
        _log.warning(
            "worker died; starting a new one",
            extra={**fields, "restart_in": delay, "deaths_last_minute": recent},
        )

    def murder_workers(self) -> None:
        """SIGKILL workers past their deadline: retiring too long, not booting, or frozen
        (no heartbeat for worker-timeout)."""
        assert self.scoreboard is not None
        now = time.monotonic()
        since = self._heartbeats_count_since(now)
        for worker in list(self.workers.values()):
            if worker.killed:
                continue
            heartbeat = self.scoreboard.heartbeat(worker.cell)
            if worker.state == WorkerState.BOOTING and now - worker.spawned_at > BOOT_TIMEOUT:
                worker.error = f"it did not report ready within {BOOT_TIMEOUT:g} s"
            elif worker.kill_at is not None and now >= worker.kill_at:
                _log.warning(
                    "worker did not exit in time; killing it",
                    extra={"slot": worker.slot, "pid": worker.pid},
                )
            elif heartbeat_expired(
                now=now,
                heartbeat=heartbeat,
                ready_at=worker.ready_at,
                since=since,
                timeout=worker.config.supervisor.worker_timeout,
            ):
                worker.unresponsive = True
                _log.warning(
                    "worker stopped responding; killing it",
                    extra={
                        "slot": worker.slot,
                        "pid": worker.pid,
                        "generation": worker.generation,
                        "state": worker.state,
                        "heartbeat_age": round(now - heartbeat, 3),
                        "worker_timeout": worker.config.supervisor.worker_timeout,
                    },
                )
            else:
                continue
            worker.killed = True
            self._signal(worker, signal.SIGKILL)

    def _heartbeats_count_since(self, now: float) -> float:
        """From when heartbeats are judged: the start, or the last stall of this loop."""
        last, self._last_liveness_check = self._last_liveness_check, now
        if last and now - last > SUPERVISOR_STALL:
            self._liveness_since = now
            _log.warning(
                "the supervisor did not run for a while; worker heartbeats are judged from now",
                extra={"seconds": round(now - last, 3)},
            )
        return self._liveness_since

    # -- resources and status --------------------------------------------------------------

    def sample_workers(self) -> None:
        """Once a second: psutil samples into the scoreboard, worker-max-rss, STATUS=."""
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + SAMPLE_EVERY
        if self.exporter is not None and self.state in (STARTING, RUNNING):
            self.exporter.poll()  # restarts a dead exporter (with its own back-off)
        self._refresh_samples()
        limit = self.config.supervisor.worker_max_rss
        if limit and self.state == RUNNING and self.pending is None:
            for worker in list(self.workers.values()):
                sample = worker.sample
                if (
                    sample is not None
                    and sample.rss > limit
                    and worker.state == WorkerState.READY
                    and worker.generation == self.generation
                    and worker.replaced_by is None
                    and worker.ready_at is not None
                    and now - worker.ready_at >= RSS_MIN_AGE
                    and worker.slot in self.slots
                ):
                    self._replace_big_worker(worker, sample.rss, limit, now)
        text = self.status_text()
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    def _replace_big_worker(self, worker: WorkerProcess, rss: int, limit: int, now: float) -> None:
        fields: dict[str, object] = {
            "slot": worker.slot,
            "pid": worker.pid,
            "rss": rss,
            "worker_max_rss": limit,
        }
        if worker.ready_at is not None and now - worker.ready_at < 10.0:
            fields["hint"] = "a fresh worker already exceeds worker-max-rss: raise it"
        _log.warning("worker exceeded worker-max-rss; replacing it", extra=fields)
        replacement = self.spawn(
            worker.slot,
            self.generation,
            self.config,
            self.slots[worker.slot].sock,
            replaces=worker.pid,
        )
        if replacement is not None:
            worker.replaced_by = replacement.pid
            if self.exporter is not None:
                from supervisor.exporter import RESTART_MAX_RSS

                self.exporter.worker_restarted(RESTART_MAX_RSS)

    def _refresh_samples(self) -> None:
        assert self.scoreboard is not None
        for worker in self.workers.values():
            sample = self.sampler.sample(worker.pid)
            if sample is None:
                continue
            worker.sample = sample
            self.scoreboard.set_sample(
                worker.cell,
                rss=sample.rss,
                cpu_user=sample.cpu_user,
                cpu_system=sample.cpu_system,
                cpu_percent=sample.cpu_percent,
                fds=sample.fds,
                sampled_at=sample.sampled_at,
            )

    def status_text(self) -> str:
        """One line for systemd's STATUS=: workers and sessions per slot."""
        if self.scoreboard is None:
            return "starting"
        per_slot: dict[int, int] = {}
        retiring_workers = retiring_sessions = 0
        for worker in self.workers.values():
            sessions = self.scoreboard.sessions(worker.cell)
            if worker.state == WorkerState.RETIRING:
                retiring_workers += 1
                retiring_sessions += sessions
            else:
                per_slot[worker.slot] = per_slot.get(worker.slot, 0) + sessions
        total = sum(per_slot.values())
        slots = ", ".join(f"slot {slot}: {count}" for slot, count in sorted(per_slot.items()))
        text = (
            f"generation {self.generation}: {self.num_workers} workers, {total} sessions ({slots})"
        )
        if retiring_workers:
            text += f"; {retiring_workers} retiring with {retiring_sessions} sessions"
        return text

    # -- files -----------------------------------------------------------------------------

    def _set_pid_file(self, path: str | None) -> None:
        """At start: write the pid file; a failure stops the proxy."""
        if path is not None:
            try:
                write_pid_file(path, self.pid)
            except PidFileError as exc:
                raise SupervisorError(str(exc)) from None
        self.pid_file = path

    def _claim_pid_file(self, new: Config) -> str | None:
        """On reload, before anything else changes: write ``new``'s pid file when it is
        another one. Returns why it cannot be written (the reload is then refused, as
        the same value is fatal at start), or None. Until the reload completes both
        files exist; a failed reload removes the new one (:meth:`_release_pid_file`)."""
        path = new.supervisor.pid_file
        if path is None or path == self.pid_file:
            return None
        try:
            write_pid_file(path, self.pid)
        except PidFileError as exc:
            return f"supervisor.pid-file: {exc}"
        return None

    def _release_pid_file(self, new: Config) -> None:
        """A reload to ``new`` failed or was dropped: remove the pid file it claimed."""
        path = new.supervisor.pid_file
        if path is not None and path != self.pid_file:
            remove_pid_file(path, self.pid)

    def _switch_pid_file(self, path: str | None) -> None:
        """A reload completed: ``path`` (claimed already) replaces the running pid file."""
        if path == self.pid_file:
            return
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, self.pid)
        self.pid_file = path

    def cleanup(self) -> None:
        """Leave nothing behind: workers, sockets, pipes, shared memory, pid file."""
        for worker in list(self.workers.values()):
            self._signal(worker, signal.SIGKILL)
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.workers.clear()
        self._drop_pending()
        self._close_slots()
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
            for signum in CAUGHT_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
        for fd in (self._wake_r, self._wake_w, self._life_r, self._life_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = self._life_r = self._life_w = -1
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        if self.replay is not None:
            self.replay.close()
            self.replay = None
        if self.scoreboard is not None:
            self.scoreboard.close()
            self.scoreboard = None
        if self.doppel is not None:
            self.doppel.close()
            self.doppel = None
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, self.pid)
            self.pid_file = None


def heartbeat_expired(
    *, now: float, heartbeat: float, ready_at: float | None, since: float, timeout: float
) -> bool:
    """True when a worker is frozen: no heartbeat for more than ``timeout`` seconds.

    All times are ``time.monotonic()`` seconds. Only a worker that reported ready
    (``ready_at``) is judged: before that it may still be importing, before its loop runs
    (``BOOT_TIMEOUT`` covers booting). Time before ``ready_at`` and before ``since`` (when
    the supervisor's own loop resumed after a stall) does not count against it.
    """
    if ready_at is None:
        return False
    return now - max(heartbeat, ready_at, since) > timeout


def _unreloadable(old: Config, new: Config) -> str | None:
    """Why ``new`` cannot replace ``old`` by a reload (naming the key), or None."""
    if new.stats.prometheus != old.stats.prometheus:
        # The exporter process and its socket are made once, before the first fork.
        return "stats.prometheus: cannot be changed by a reload; restart the proxy"
    return None
