"""Record pacing for the doppelganger: one scheduler per worker for every paced connection.

With ``[defense.doppelganger] pacing`` (on by default, as in mtg) each ApplicationData
record to a Telegram client leaves after a Weibull-distributed delay
(:func:`mtgworkers.defense.doppel.weibull_delay`), so the gaps between records look like
a real website's. mtg runs a goroutine and a timer per connection; here one :class:`Pacer`
per worker keeps the due connections in buckets of one millisecond (the resolution of
the event loop's timers) and arms a single loop timer for the earliest bucket, so 10k
paced connections cost one timer, not 10k timer objects per record.

A delay that rounds to the current millisecond is served in the same pass, so the many
short gaps of the distribution (its median is ~0.7 ms) still go out back to back.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from typing import TYPE_CHECKING, Protocol

from mtgworkers.defense.doppel import WeibullParams, weibull_delay

if TYPE_CHECKING:
    from collections.abc import Callable

TICK = 0.001  # seconds per bucket: uvloop (libuv) timers count whole milliseconds


class Paced(Protocol):
    """What the pacer calls when a connection's delay has passed."""

    def due(self) -> None: ...


class Pacer:
    """Releases paced writes of all connections of one worker from one loop timer.

    ``params`` are the Weibull parameters in force; the worker replaces them when the
    doppelganger learns new ones. ``uniform`` draws from [0, 1) (injectable for tests).
    """

    __slots__ = ("_due", "_fired", "_loop", "_ticks", "_timer", "_timer_tick", "params", "uniform")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        params: WeibullParams | None = None,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self._loop = loop
        self.params = params or WeibullParams()
        self.uniform = uniform
        self._due: dict[int, list[Paced]] = {}  # bucket (ms tick) -> connections due then
        self._ticks: list[int] = []  # heap of the buckets in _due
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick = 0
        self._fired = 0  # due() calls, for tests and the benchmark's notes

    def delay(self) -> float:
        """A fresh delay in seconds."""
        return weibull_delay(self.params, self.uniform())

    def after(self, paced: Paced, delay: float) -> None:
        """Call ``paced.due()`` once ``delay`` seconds have passed (to the millisecond)."""
        tick = int((self._loop.time() + delay) / TICK + 0.5)
        bucket = self._due.get(tick)
        if bucket is not None:
            bucket.append(paced)
            return
        self._due[tick] = [paced]
        heapq.heappush(self._ticks, tick)
        timer = self._timer
        if timer is None or tick < self._timer_tick:
            if timer is not None:
                timer.cancel()
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        self._timer_tick = tick
        self._timer = self._loop.call_at(tick * TICK, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        ticks = self._ticks
        due = self._due
        # The clock is read again for every bucket: a connection that asks for a delay
        # rounding to "now" from inside due() is served in this pass even when the
        # clock crossed a millisecond boundary meanwhile (uvloop's time() is not cached).
        while ticks and ticks[0] <= int(loop.time() / TICK + 0.5):
            for paced in due.pop(heapq.heappop(ticks)):
                self._fired += 1
                try:
                    paced.due()
                except Exception as exc:  # one connection's bug must not stop the others
                    loop.call_exception_handler({"message": "paced write failed", "exception": exc})
        if ticks:
            self._arm(ticks[0])

    @property
    def pending(self) -> int:
        """How many connections wait for their delay."""
        return sum(len(bucket) for bucket in self._due.values())

    def close(self) -> None:
        """Forget every waiting connection (worker shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._ticks.clear()
