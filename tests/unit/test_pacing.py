"""The per-worker pacer (mtgworkers.pacing) on a real uvloop loop."""

from __future__ import annotations

import asyncio

import uvloop

from mtgworkers.defense.doppel import WeibullParams
from mtgworkers.pacing import TICK, Pacer


class Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop, log: list[tuple[int, float]], n: int):
        self.loop, self.log, self.n = loop, log, n

    def due(self) -> None:
        self.log.append((self.n, self.loop.time()))


def test_many_connections_share_one_timer_and_fire_in_order() -> None:
    loop = uvloop.new_event_loop()
    try:
        pacer = Pacer(loop)
        log: list[tuple[int, float]] = []
        timers: list[object] = []
        due_tick: dict[int, int] = {}

        async def main() -> None:
            start = loop.time()
            for n in range(1000):
                # uvloop's clock moves while this loop runs: remember each due millisecond
                due_tick[n] = int((loop.time() + (n % 50) * 0.002) / TICK + 0.5)
                pacer.after(Recorder(loop, log, n), (n % 50) * 0.002)
                timers.append(pacer._timer)
            assert pacer.pending == 1000
            while len(log) < 1000:
                await asyncio.sleep(0.01)
            for n, at in log:
                # never early by more than the bucket rounding
                assert at - start >= (n % 50) * 0.002 - TICK, (n, at - start)

        loop.run_until_complete(main())
        # one timer armed at a time: only re-armed when an earlier bucket appeared
        assert len({id(t) for t in timers}) <= 2
        ticks = [due_tick[n] for n, _ in log]
        assert ticks == sorted(ticks)  # served in the order they fall due
        assert pacer.pending == 0 and pacer._timer is None
    finally:
        loop.close()


def test_a_delay_within_the_current_millisecond_runs_in_the_same_pass() -> None:
    loop = uvloop.new_event_loop()
    try:
        pacer = Pacer(loop)
        log: list[tuple[int, bool]] = []
        later = {"ran": False}  # set by a callback queued behind the current pass

        def next_pass() -> None:
            later["ran"] = True

        class Chain:
            count = 0

            def due(self) -> None:
                self.count += 1
                if self.count == 1:
                    loop.call_soon(next_pass)
                log.append((self.count, later["ran"]))
                if self.count < 5:
                    pacer.after(self, 0.0)  # rounds to now: served at once

        async def main() -> None:
            pacer.after(Chain(), 0.005)
            while len(log) < 5:
                await asyncio.sleep(0.005)

        loop.run_until_complete(main())
        # all five in the pass that served the first, before anything queued after it
        assert log[:5] == [(n, False) for n in range(1, 6)]
    finally:
        loop.close()


def test_delays_follow_the_parameters_in_force() -> None:
    loop = uvloop.new_event_loop()
    try:
        pacer = Pacer(loop, uniform=lambda: 0.5)
        first = pacer.delay()
        pacer.params = WeibullParams(1.0, 10.0)  # exponential, mean 10 ms
        assert pacer.delay() != first
        assert abs(pacer.delay() - 0.010 * 0.6931471805599453) < 1e-9
    finally:
        loop.close()


def test_close_forgets_everything() -> None:
    loop = uvloop.new_event_loop()
    try:
        pacer = Pacer(loop)
        log: list[tuple[int, float]] = []
        pacer.after(Recorder(loop, log, 1), 0.001)
        pacer.close()
        loop.run_until_complete(asyncio.sleep(0.02))
        assert log == [] and pacer.pending == 0
    finally:
        loop.close()
