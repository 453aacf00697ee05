"""The exporter process and its supervision.

:class:`Exporter` is the supervisor's handle (``serve()`` uses it too). It creates the
private metrics directory (mode 0700, removed by :meth:`Exporter.close`) and sets
``PROMETHEUS_MULTIPROC_DIR`` for the workers forked later, binds the listening socket
itself (a bind error is a start-up error, as in mtg, and the socket, with its queue,
survives exporter restarts), and runs the exporter as a fresh interpreter
(``python -m supervisor.exporter``, :func:`main`), not a fork: the process facing HTTP
holds none of the supervisor's memory (no secret), sockets or signal handlers.

Restart policy: the owner calls :meth:`Exporter.poll` from its loop; a dead exporter is
logged with how it ended (``metrics exporter exited; restarting it``, ``status`` such
as ``signal SIGKILL`` or ``exit status 1``) and started again after a back-off of 1 s,
doubling up to 30 s, reset once an exporter has lived for a minute. An owner that reaps
its children itself (the supervisor's ``waitpid(-1)``) must hand the exporter's wait
status over (:meth:`Exporter.owns`, :meth:`Exporter.reaped`): the handle cannot learn
it any more once the process was reaped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import supervisor
from mtgworkers.config import HostPort
from mtgworkers.stats.prometheus import (
    MULTIPROC_ENV,
    create_multiproc_dir,
    remove_multiproc_dir,
)
from supervisor.exporter.httpd import listen, run_exporter
from supervisor.exporter.pool import PoolCounters, PoolStatsSource, SharedPoolStats

if TYPE_CHECKING:
    from mtgworkers.config import Prometheus
    from supervisor.shm import Scoreboard

__all__ = ["DEFAULT_BIND", "Exporter", "describe_exit", "main"]

_log = logging.getLogger("mtgworkers.exporter")

# [stats.prometheus] bind-to unset: mtg listens on a random port on every interface;
# we stay on loopback, on the port of mtg's example config.
DEFAULT_BIND: Final = HostPort("127.0.0.1", 3129)
# Restart back-off of a dead exporter: 1 s, 2 s, 4 s ... 30 s; reset after a minute of life.
FIRST_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 30.0
HEALTHY_AFTER: Final = 60.0


def describe_exit(code: int) -> str:
    """``exit status 1`` or ``signal SIGKILL`` for a return code (negative: killed by
    that signal), the way the supervisor describes its workers' ends."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"signal {name}"


class Exporter:
    """The exporter process as the supervisor (or ``serve()``) sees it.

    Life cycle, all from the owner's single thread::

        # before forking workers:
        exporter = Exporter(config.stats.prometheus, scoreboard=scoreboard)
        exporter.start()
        ...  # in the loop, about once a second:
        exporter.poll()
        ...  # when the owner's waitpid(-1) collected a child that is not a worker:
        if exporter.owns(pid): exporter.reaped(status)
        ...  # on events:
        exporter.worker_restarted(restart_reason(code)); exporter.reload_finished(True)
        exporter.close()  # at exit: stops the process, removes the directory

    The constructor creates the metrics directory, sets ``PROMETHEUS_MULTIPROC_DIR`` in
    this process's environment (workers forked afterwards inherit it) and binds the
    listening socket; it raises :class:`ExporterError` when the address cannot be bound
    and OSError when the directory or the shared memory cannot be made.
    """

    def __init__(
        self,
        prometheus: Prometheus,
        *,
        scoreboard: Scoreboard | None = None,
        debug: bool = False,
        directory_parent: str | None = None,
    ) -> None:
        self.config = prometheus
        self.debug = debug
        self.scoreboard = scoreboard
        self.bind_to = prometheus.bind_to or DEFAULT_BIND
        self.multiproc_dir = create_multiproc_dir(directory_parent)
        self.pool: PoolCounters | None = None
        try:
            self.sock = listen(self.bind_to)
            if scoreboard is not None:
                self.pool = PoolCounters.create()
        except BaseException:
            if hasattr(self, "sock"):
                self.sock.close()
            remove_multiproc_dir(self.multiproc_dir)
            raise
        os.environ[MULTIPROC_ENV] = self.multiproc_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0
        self._restart_at = 0.0
        self._failures = 0
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually listened on (port 0 in the config is resolved)."""
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    @property
    def pid(self) -> int | None:
        """PID of the running exporter process, None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the exporter process (no-op when it runs). Raises OSError."""
        if self._proc is not None or self._closed:
            return
        argv = [
            sys.executable,
            "-m",
            "supervisor.exporter",
            "--listen-fd",
            str(self.sock.fileno()),
            "--http-path",
            self.config.http_path,
            "--metric-prefix",
            self.config.metric_prefix,
            "--multiproc-dir",
            self.multiproc_dir,
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.scoreboard is not None:
            argv += ["--scoreboard", self.scoreboard.path]
        if self.pool is not None:
            argv += ["--pool", self.pool.path]
        if self.debug:
            argv.append("--debug")
        env = dict(os.environ)
        # The directory holding the supervisor package: the fresh interpreter finds the
        # same code as this process even when it runs from a checkout.
        root = os.path.dirname(os.path.dirname(os.path.abspath(supervisor.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        sys.stdout.flush()
        sys.stderr.flush()
        self._proc = subprocess.Popen(
            argv, pass_fds=(self.sock.fileno(),), stdin=subprocess.DEVNULL, env=env
        )
        self._spawned_at = time.monotonic()
        _log.debug("metrics exporter started", extra={"pid": self._proc.pid})

    def poll(self, now: float | None = None) -> None:
        """Restart the exporter when it died (back-off 1 s doubling to 30 s), logging how
        it ended."""
        if self._closed:
            return
        now = time.monotonic() if now is None else now
        proc = self._proc
        if proc is not None:
            code = proc.poll()  # waits for it, or what reaped() recorded
            if code is None:
                if self._failures and now - self._spawned_at >= HEALTHY_AFTER:
                    self._failures = 0
                return
            self._proc = None
            self._failures += 1
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self._failures - 1))
            self._restart_at = now + delay
            _log.warning(
                "metrics exporter exited; restarting it",
                extra={"pid": proc.pid, "status": describe_exit(code), "restart_in": delay},
            )
        if now >= self._restart_at:
            try:
                self.start()
            except OSError as exc:
                _log.error("cannot start the metrics exporter", extra={"error": str(exc)})
                self._restart_at = now + MAX_BACKOFF

    def owns(self, pid: int) -> bool:
        """True when ``pid`` is the exporter process (for a supervisor reaping children)."""
        return self._proc is not None and self._proc.pid == pid

    def reaped(self, status: int) -> None:
        """The owner's ``waitpid()`` collected the exporter process (:meth:`owns` its PID)
        with wait status ``status``.

        The exit is recorded, so that the next :meth:`poll` logs how it ended and
        restarts it with the back-off, and nothing waits for or signals that PID again:
        once reaped, it may belong to a new process (a worker forked a moment later).
        """
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.returncode = os.waitstatus_to_exitcode(status)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the exporter process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)

    def close(self) -> None:
        """Stop the process, close the socket, remove the directory and the segment."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        self.sock.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        remove_multiproc_dir(self.multiproc_dir)
        if os.environ.get(MULTIPROC_ENV) == self.multiproc_dir:
            del os.environ[MULTIPROC_ENV]

    # -- pool counters (no-ops without a scoreboard) ---------------------------------------

    def worker_restarted(self, reason: str) -> None:
        """Count a worker restart (:data:`RESTART_REASONS`; see :func:`restart_reason`)."""
        if self.pool is not None:
            self.pool.worker_restarted(reason)

    def reload_finished(self, succeeded: bool) -> None:
        """Count a reload that completed (True) or was given up (False)."""
        if self.pool is not None:
            self.pool.reload_finished(succeeded)


_USAGE = """The metrics exporter process (python -m supervisor.exporter), started by the supervisor.

Usage:
  supervisor.exporter --listen-fd=FD --multiproc-dir=DIR [options]

Options:
  --listen-fd=FD        the bound, listening socket to serve on
  --multiproc-dir=DIR   prometheus-client's multiprocess directory
  --http-path=PATH      where the metrics are served [default: /]
  --metric-prefix=P     prefix of every metric name [default: mtg]
  --parent-pid=PID      exit when this process (the supervisor) dies
  --scoreboard=PATH     the pool's scoreboard segment
  --pool=PATH           the pool's shared-state segment
  --debug               log at debug level
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the exporter process (``python -m supervisor.exporter``)."""
    from docopt import docopt

    opts = docopt(_USAGE, argv=list(sys.argv[1:] if argv is None else argv))
    parent_pid = None if opts["--parent-pid"] is None else int(opts["--parent-pid"])

    from mtgworkers import logs

    logs.setup(bool(opts["--debug"]))
    if parent_pid is not None:
        from supervisor.worker import set_parent_death_signal

        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent_pid:  # it died before prctl() took effect
            return 0
    sock = socket.socket(fileno=int(opts["--listen-fd"]))
    source: PoolStatsSource | None = None
    try:
        if opts["--scoreboard"] or opts["--pool"]:
            source = SharedPoolStats.attach(opts["--scoreboard"], opts["--pool"])
        run_exporter(
            sock,
            opts["--http-path"],
            opts["--metric-prefix"],
            opts["--multiproc-dir"],
            source,
            parent_pid=parent_pid,
        )
    except Exception as exc:
        _log.error("metrics exporter failed", extra={"error": repr(exc)}, exc_info=exc)
        return 1
    return 0
