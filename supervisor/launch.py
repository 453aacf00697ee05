"""Starting a worker: fork, then exec a fresh interpreter that inherits the worker's parts.

A worker runs the code that is installed when it starts, not the code the supervisor
imported when it started: after ``pip install -U`` (or ``deploy/install.sh`` run again) a
reload (SIGHUP) starts the next generation on the new code while the old generation
drains. The supervisor's own code (this package: the arbiter, shared-memory layouts, the
exporter handle) stays what it started with until the proxy is restarted.

What crosses the exec:

- descriptors, made inheritable in the child between ``fork()`` and ``execve()``: the
  slot's listening socket, the write end of the worker's report pipe, the read end of the
  life pipe, and the shared-memory segments (scoreboard, replay cache, doppelganger
  state), which the worker maps again (``MAP_SHARED``: the same pages). Everything else
  the supervisor holds is close-on-exec and disappears with the exec;
- the *launch spec*, one JSON document in an anonymous file (memfd) whose descriptor is
  the interpreter's only argument besides the package root (the config holds the secret,
  so it is never put on the command line): the spec version, slot, generation, cell,
  the supervisor's PID, the descriptor numbers and segment paths, the replay filter's
  parameters, and the configuration as decoded TOML data plus its directory. The worker
  parses that data with its own (possibly newer) code; a newer worker that cannot accept
  the data, or a spec or segment layout it does not know, reports a boot error and the
  reload is aborted (the running generation stays);
- signal dispositions: the supervisor's signals that a worker ignores are set to
  ``SIG_IGN`` before the exec (an ignored signal stays ignored across it, and Python does
  not install its SIGINT handler then), the stop signals to ``SIG_DFL``;
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set before the exec (it survives it);
- the environment (``PROMETHEUS_MULTIPROC_DIR`` among it).

The interpreter is the supervisor's ``sys.executable``; ``sys.path[0]`` is the directory
that holds the supervisor's ``supervisor`` package (site-packages of the installation, or
a checkout), so the fresh interpreter finds the same installation, upgraded or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

from supervisor.signals import CAUGHT_SIGNALS, IGNORED_SIGNALS

__all__ = ["SPEC_VERSION", "LaunchSpec", "SpecError", "launch", "package_root"]

# Bumped whenever the spec's meaning changes; a worker refuses other versions.
SPEC_VERSION: Final = 1
# What a child that could not exec exits with (supervisor.worker.WORKER_BOOT_ERROR).
EXEC_FAILED: Final = 3

BOOTSTRAP: Final = (
    "import sys; sys.path[0] = sys.argv[1]; "
    "from supervisor.worker import exec_main; exec_main(sys.argv[2:])"
)


class SpecError(ValueError):
    """The launch spec is not one this code can run (version, missing fields)."""


@dataclass(frozen=True)
class LaunchSpec:
    """What the supervisor tells a worker it starts; :meth:`encode` gives the JSON."""

    slot: int
    generation: int
    cell: int
    supervisor_pid: int
    config_data: Mapping[str, Any]  # decoded TOML (or simple-run's equivalent)
    config_base_dir: str | None
    listen_fd: int
    report_fd: int
    life_fd: int
    scoreboard_fd: int
    scoreboard_path: str
    replay_fd: int | None = None
    replay_path: str | None = None
    replay_max_size: int = 0
    replay_error_rate: float = 0.0
    doppel_fd: int | None = None
    doppel_path: str | None = None
    startup_checks: bool = False

    @property
    def fds(self) -> tuple[int, ...]:
        """The descriptors the worker inherits."""
        fds = [self.listen_fd, self.report_fd, self.life_fd, self.scoreboard_fd]
        fds += [fd for fd in (self.replay_fd, self.doppel_fd) if fd is not None]
        return tuple(fds)

    def encode(self) -> bytes:
        document = {"version": SPEC_VERSION, **self.__dict__}
        return json.dumps(document, default=str).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LaunchSpec:
        """Raises SpecError."""
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise SpecError(f"launch spec is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise SpecError("launch spec is not a JSON object")
        version = document.pop("version", None)
        if version != SPEC_VERSION:
            raise SpecError(
                f"the supervisor speaks launch spec version {version}, this worker code "
                f"version {SPEC_VERSION}: restart the proxy to run the installed code"
            )
        try:
            return cls(**document)
        except TypeError as exc:
            raise SpecError(f"launch spec does not fit this worker code: {exc}") from None


def package_root() -> str:
    """The directory holding the ``supervisor`` package this process imported."""
    import supervisor

    return os.path.dirname(os.path.dirname(os.path.abspath(supervisor.__file__)))


def launch(spec: LaunchSpec, *, executable: str | None = None, root: str | None = None) -> int:
    """Fork and exec a worker for ``spec``; return its PID. Raises OSError (fork failed).

    The caller keeps (and later closes) its own copies of every descriptor in ``spec``.
    When the exec itself fails the child writes the reason to the report pipe and exits
    with :data:`EXEC_FAILED`.
    """
    argv = [executable or sys.executable, "-c", BOOTSTRAP, root or package_root()]
    with _spec_file() as stream:
        stream.write(spec.encode())
        stream.flush()
        spec_fd = stream.fileno()
        argv.append(str(spec_fd))
        env = dict(os.environ)
        # Buffered output would otherwise be written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _exec_child(argv, env, (*spec.fds, spec_fd), spec_fd, spec.report_fd)
    return pid


def _spec_file() -> IO[bytes]:
    """An anonymous file for the spec: a memfd on Linux, else an unlinked temporary file."""
    try:
        fd = os.memfd_create("mtgworkers-launch-spec", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return tempfile.TemporaryFile(prefix="mtgworkers-spec-")
    return os.fdopen(fd, "w+b")


def _exec_child(
    argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int], spec_fd: int, report_fd: int
) -> None:
    """In the forked child: prepare what survives the exec, then exec (never returns)."""
    try:
        from supervisor.worker import set_parent_death_signal

        signal.set_wakeup_fd(-1)
        for signum in CAUGHT_SIGNALS:
            signal.signal(signum, signal.SIG_IGN if signum in IGNORED_SIGNALS else signal.SIG_DFL)
        set_parent_death_signal(signal.SIGKILL)
        for fd in fds:
            os.set_inheritable(fd, True)
        os.lseek(spec_fd, 0, os.SEEK_SET)
        os.execve(argv[0], list(argv), dict(env))
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            message = {"event": "error", "error": f"cannot run {argv[0]}: {exc}"}
            os.write(report_fd, json.dumps(message).encode() + b"\n")
    finally:
        os._exit(EXEC_FAILED)
