"""Client connections refused for want of file descriptors: counted and logged.

Without this module such refusals are invisible. A worker accepts through uvloop's
``create_server``, that is through libuv (1.52.1 in uvloop 0.23). When ``accept()``
fails with EMFILE or ENFILE, libuv closes a spare descriptor it keeps for that purpose,
accepts every connection waiting in the queue and closes it at once (the client sees its
connection closed, or reset if it had sent data), reopens the spare and returns; without
a spare it just returns and tries again on the next loop iteration. Nothing of this
reaches Python: uvloop's listen callback is not called, nor the loop's exception
handler, nor the protocol factory.

So the worker refuses such connections itself, one step earlier. Its protocol factory asks
:meth:`AcceptGuard.admit` before each session. Far from the limit the answer is yes
without a system call: every :data:`CHECK_EVERY` seconds the guard counts the open
descriptors (``/proc/self/fd``) and works out how many accepts cannot reach the limit
before the next count. Near the limit it checks, by duplicating a descriptor
:data:`FREE_MIN` times, that enough descriptors are still free after the accept: one for
the session's connection to Telegram or the fronting host, one for the next accept. If
not, the connection is closed at once (so libuv's next accept does not fail and shed
silently), an :class:`~mtgworkers.events.EventAcceptRefused` is sent (the
``accept_refused_total`` metric) and a warning is logged, at most one line every
:data:`WARN_EVERY` seconds with the number of refusals since the previous line.

What stays invisible: when something other than an accept takes the last descriptors
(the dials of many sessions admitted at once, a DNS query), libuv can still shed a few
connections silently until one is freed; the sessions whose dial failed are logged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
from collections.abc import Callable, Sized

from mtgworkers import events

__all__ = ["CHECK_EVERY", "FREE_MIN", "WARN_EVERY", "AcceptGuard"]

# At most one warning line per this many seconds; it carries the count since the last one.
WARN_EVERY = 10.0
# How often the open descriptors are counted (and a pending warning line is written).
CHECK_EVERY = 1.0
# Descriptors that must still be free after an accept for the session to be admitted.
FREE_MIN = 2
# What one admitted connection can cost (its socket and one upstream), and what other
# users may take between two counts (DNS, IP lists, sessions admitted earlier dialling
# out are counted apart): the same model as the start-up check of the limit.
_FDS_PER_ACCEPT = 2
_SLACK = 64

_REASONS = dict(zip((errno.EMFILE, errno.ENFILE), events.ACCEPT_REFUSED_REASONS, strict=True))

_log = logging.getLogger("mtgworkers.proxy")


class _Refused(asyncio.Protocol):
    """Closes the connection it is given at once (one instance serves them all)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class AcceptGuard:
    """Admission by free file descriptors for one worker process (see the module doc).

    ``sessions``: the worker's live sessions (each may still open one upstream
    connection). Create it in the worker process; :meth:`start` once the loop serves,
    :meth:`close` when the worker stops.
    """

    refusal: asyncio.Protocol = _Refused()  # what the protocol factory returns instead

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stream: events.EventStream,
        sessions: Sized,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._events = stream
        self._sessions = sessions
        self._clock = clock
        self._probe = -1  # duplicated to test for free descriptors; opened by start()
        self._budget = 0  # accepts admitted without a check until the next count
        self._timer: asyncio.TimerHandle | None = None
        self._unreported = dict.fromkeys(_REASONS.values(), 0)
        self._warned_at: float | None = None

    def start(self) -> None:
        """Count the descriptors now and every :data:`CHECK_EVERY` seconds (before, every
        connection is admitted)."""
        if self._probe < 0:
            self._probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if self._timer is None:
            self._tick()

    def close(self) -> None:
        """Stop the timer, log refusals not reported yet, release the descriptor."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if any(self._unreported.values()):
            self._warn(self._clock())
        if self._probe >= 0:
            os.close(self._probe)
            self._probe = -1

    def admit(self) -> bool:
        """Called for each accepted connection: False when it must be refused (then
        return :attr:`refusal` as its protocol); the refusal is already counted."""
        if self._budget > 0:
            self._budget -= 1
            return True
        reason = self._short_of_descriptors()
        if reason is None:
            return True
        self.refused(reason)
        return False

    def refused(self, reason: str) -> None:
        """Count one refusal (``emfile`` or ``enfile``) and log if a line is due."""
        self._events.send(events.EventAcceptRefused(reason))
        self._unreported[reason] = self._unreported.get(reason, 0) + 1
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warn(now)

    def _short_of_descriptors(self) -> str | None:
        if self._probe < 0:
            return None
        taken: list[int] = []
        try:
            for _ in range(FREE_MIN):
                taken.append(os.dup(self._probe))
        except OSError as exc:
            return _REASONS.get(exc.errno or 0)
        finally:
            for fd in taken:
                os.close(fd)
        return None

    def _tick(self) -> None:
        self._timer = self._loop.call_later(CHECK_EVERY, self._tick)
        if any(self._unreported.values()):
            now = self._clock()
            if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
                self._warn(now)
        self._budget = self._unchecked_accepts()

    def _unchecked_accepts(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            # The number of open descriptors (Linux >= 6.2; 0 before: check every accept).
            open_fds = os.stat("/proc/self/fd").st_size
        except OSError:
            return 0
        if open_fds <= 0 or soft == resource.RLIM_INFINITY:
            return 0
        spare = soft - open_fds - _SLACK - len(self._sessions)
        return max(0, spare // _FDS_PER_ACCEPT)

    def _warn(self, now: float) -> None:
        counts = self._unreported
        self._unreported = dict.fromkeys(_REASONS.values(), 0)
        self._warned_at = now
        _log.warning(
            "connections were refused: too many open files; raise LimitNOFILE (systemd) or "
            "'ulimit -n', or lower concurrency",
            extra={
                "refused": sum(counts.values()),
                **counts,
                "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            },
        )
