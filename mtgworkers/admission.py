"""The concurrency gate of one worker, and what it does when the gate is full.

``concurrency`` counts sessions from their admission (right after the IP lists, before
the ClientHello) to their end. A connection that sends nothing holds its place until the
handshake timeout, so a flood of idle connections would take every place and lock real
clients out. When the limit is reached, :class:`Admission` therefore does what nginx does
with idle connections when it runs out of worker connections: it closes the oldest
session of this worker that has not yet sent a valid ClientHello (an *unproven* session)
and gives its place to the newcomer. Only a connection that arrives while every place of
this worker is held by proven sessions (a valid hello, a DC relay, a fronted connection)
is refused.

The place is handed over, not released and taken again: the evicted session is no longer
counted as soon as it is evicted (the newcomer is counted instead), and its end does not
release anything. So the shared count (``supervisor/shm.py``) stays right whichever
worker evicts: each worker only ever evicts its own sessions and only touches its own
counter.

Refusals and evictions are counted by events and summed into one warning at most every
:data:`REPORT_EVERY` seconds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from mtgworkers import events

if TYPE_CHECKING:
    from collections.abc import Callable

_log = logging.getLogger("mtgworkers.proxy")

REPORT_EVERY = 10.0  # seconds between two "concurrency limit reached" warnings


class Limiter(Protocol):
    """Concurrency gate: ``concurrency`` sessions at most, no queueing."""

    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class Evictable(Protocol):
    """What the gate needs from a session (``session.ClientSession``)."""

    def evict(self) -> bool:
        """Close the session because its place is needed; False if it was ending anyway."""
        ...


class Admission:
    """A worker's gate over its :class:`Limiter` (local or shared between workers).

    ``acquire(session)`` when a session is admitted, ``proven(session)`` once it sent a
    valid ClientHello (or ended its handshake in any other way), ``release(session)`` when
    it ends. ``tick(now)`` from the worker's sweeper writes the pending warning.
    """

    __slots__ = (
        "_clock",
        "_events",
        "_handed_over",
        "_last_report",
        "_unproven",
        "evicted",
        "limiter",
        "refused",
    )

    def __init__(
        self, limiter: Limiter, stream: events.EventStream, clock: Callable[[], float]
    ) -> None:
        self.limiter = limiter
        self._events = stream
        self._clock = clock
        # admitted sessions without a valid ClientHello yet, oldest first (dicts keep order)
        self._unproven: dict[Evictable, None] = {}
        # evicted sessions not ended yet: their place already belongs to another session
        self._handed_over: set[Evictable] = set()
        self.refused = 0  # since the last warning
        self.evicted = 0
        self._last_report = -REPORT_EVERY

    @property
    def unproven(self) -> int:
        """How many admitted sessions have not sent a valid ClientHello yet."""
        return len(self._unproven)

    def acquire(self, session: Evictable) -> bool:
        """Admit ``session``: True when it got a place (perhaps an evicted session's),
        False when it must be refused."""
        if self.limiter.try_acquire():
            self._unproven[session] = None
            return True
        unproven = self._unproven
        while unproven:
            victim = next(iter(unproven))
            del unproven[victim]
            self._handed_over.add(victim)
            if victim.evict():
                unproven[session] = None
                self.evicted += 1
                self._events.send(events.EventConcurrencyEvicted())
                self._limit_reached()
                return True
            # ending anyway: its place frees itself when it ends
            self._handed_over.discard(victim)
        self.refused += 1
        self._events.send(events.EventConcurrencyLimited())
        self._limit_reached()
        return False

    def proven(self, session: Evictable) -> None:
        """``session`` is past the point where it may be evicted."""
        self._unproven.pop(session, None)

    def release(self, session: Evictable) -> None:
        """An admitted ``session`` ended."""
        self._unproven.pop(session, None)
        if session in self._handed_over:
            self._handed_over.discard(session)
        else:
            self.limiter.release()

    def _limit_reached(self) -> None:
        if self._clock() - self._last_report >= REPORT_EVERY:
            self._report()

    def tick(self, now: float) -> None:
        """Write the warning for what happened since the last one, once it is due."""
        if (self.refused or self.evicted) and now - self._last_report >= REPORT_EVERY:
            self._report()

    def _report(self) -> None:
        self._last_report = self._clock()
        refused, evicted = self.refused, self.evicted
        self.refused = self.evicted = 0
        _log.warning(
            f"concurrency limit reached: {refused} refused, {evicted} evicted in the last "
            f"{REPORT_EVERY:g} s",
            extra={"refused": refused, "evicted": evicted},
        )
