"""The ``[supervisor] pid-file``: the supervisor's PID, written at start, removed at exit."""

from __future__ import annotations

import contextlib
import os

from mtgworkers.proc import pid_alive

__all__ = ["PidFileError", "remove_pid_file", "write_pid_file"]


class PidFileError(Exception):
    """The pid file cannot be written, or names another running supervisor."""


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically (temporary file + rename).

    Raises :class:`PidFileError` when the file names another process that is alive, or
    when it cannot be written.
    """
    other = read_pid_file(path)
    if other is not None and other != pid and pid_alive(other):
        raise PidFileError(f"pid-file {path}: another proxy is already running as pid {other}")
    temporary = f"{path}.{pid}.tmp"
    try:
        with open(temporary, "w") as stream:
            stream.write(f"{pid}\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise PidFileError(f"cannot write pid-file {path}: {exc.strerror or exc}") from exc


def read_pid_file(path: str) -> int | None:
    """The PID in ``path``; None if the file is missing or holds no number."""
    try:
        with open(path) as stream:
            return int(stream.read().strip())
    except (OSError, ValueError):
        return None


def remove_pid_file(path: str, pid: int) -> None:
    """Remove ``path`` if it still holds ``pid`` (a newer supervisor may own it now)."""
    if read_pid_file(path) == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)
