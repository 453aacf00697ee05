"""mtgworkers.admission: the concurrency gate evicts the oldest unproven session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mtgworkers import events
from mtgworkers.admission import REPORT_EVERY, Admission
from mtgworkers.server import LocalLimiter
from supervisor import shm


class Held:
    """A session as the gate sees it; ``ending`` ones refuse to be evicted."""

    def __init__(self, name: str, ending: bool = False) -> None:
        self.name = name
        self.ending = ending
        self.evicted = False

    def evict(self) -> bool:
        if self.ending:
            return False
        self.evicted = True
        return True

    def __repr__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gate(limiter: LocalLimiter | shm.SharedLimiter) -> tuple[Admission, list[events.Event]]:
    seen: list[events.Event] = []
    stream = events.EventStream()
    stream.subscribe(seen.append)
    return Admission(limiter, stream, Clock()), seen


def test_a_full_gate_evicts_the_oldest_unproven_session() -> None:
    limiter = LocalLimiter(3)
    gate, seen = _gate(limiter)
    a, b, c, d = Held("a"), Held("b"), Held("c"), Held("d")
    for session in (a, b, c):
        assert gate.acquire(session)
    gate.proven(a)  # a sent a valid hello: b is now the oldest candidate
    assert gate.acquire(d)
    assert (a.evicted, b.evicted, c.evicted) == (False, True, False)
    assert seen == [events.EventConcurrencyEvicted()]
    assert limiter.active == 3 and gate.unproven == 2
    # b's place went to d: its end releases nothing
    gate.release(b)
    assert limiter.active == 3
    for session in (a, c, d):
        gate.release(session)
    assert limiter.active == 0 and gate.unproven == 0


def test_a_gate_full_of_proven_sessions_refuses() -> None:
    limiter = LocalLimiter(2)
    gate, seen = _gate(limiter)
    a, b = Held("a"), Held("b")
    assert gate.acquire(a) and gate.acquire(b)
    gate.proven(a)
    gate.proven(b)
    newcomer = Held("new")
    assert not gate.acquire(newcomer)
    assert seen == [events.EventConcurrencyLimited()]
    assert limiter.active == 2 and not a.evicted and not b.evicted


def test_a_session_ending_anyway_is_skipped_and_releases_its_place() -> None:
    limiter = LocalLimiter(2)
    gate, _ = _gate(limiter)
    ending, idle = Held("ending", ending=True), Held("idle")
    assert gate.acquire(ending) and gate.acquire(idle)
    assert gate.acquire(Held("new"))
    assert idle.evicted and not ending.evicted
    gate.release(ending)  # it still held its own place
    assert limiter.active == 1


def test_the_warning_sums_refusals_and_evictions_at_most_every_10_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = LocalLimiter(1)
    gate, _ = _gate(limiter)
    clock = gate._clock
    assert isinstance(clock, Clock)
    caplog.set_level(logging.WARNING, "mtgworkers.proxy")
    first = Held("first")
    gate.acquire(first)
    for index in range(5):  # each evicts the previous one
        gate.acquire(Held(str(index)))
    gate.proven(next(iter(gate._unproven)))
    gate.acquire(Held("refused"))
    gate.acquire(Held("refused too"))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["concurrency limit reached: 0 refused, 1 evicted in the last 10 s"]
    gate.tick(clock.now + 1)
    assert len(caplog.records) == 1
    clock.now += REPORT_EVERY
    gate.tick(clock.now)
    assert caplog.records[-1].getMessage() == (
        "concurrency limit reached: 2 refused, 4 evicted in the last 10 s"
    )
    assert (caplog.records[-1].refused, caplog.records[-1].evicted) == (2, 4)  # type: ignore[attr-defined]
    clock.now += 3 * REPORT_EVERY
    gate.tick(clock.now)  # nothing happened since: no line
    assert len(caplog.records) == 2


def test_eviction_keeps_the_shared_count_right(tmp_path: Path) -> None:
    board = shm.Scoreboard.create(4, directory=str(tmp_path))
    try:
        cells = [board.claim(slot, 1, 0.0) for slot in range(2)]
        gates = [_gate(board.limiter(cell, limit=4))[0] for cell in cells]
        idle = [[Held(f"w{w}-{i}") for i in range(2)] for w in range(2)]
        for worker, gate in enumerate(gates):
            for session in idle[worker]:
                assert gate.acquire(session)
        assert board.total_sessions() == 4
        # each worker evicts only its own idle sessions; no cell changes
        newcomers = [Held("new0"), Held("new1")]
        for worker, gate in enumerate(gates):
            assert gate.acquire(newcomers[worker])
            assert idle[worker][0].evicted and not idle[worker][1].evicted
        assert [board.sessions(cell) for cell in cells] == [2, 2]
        for worker, gate in enumerate(gates):
            gate.release(idle[worker][0])  # the evicted sessions end
        assert board.total_sessions() == 4
        for worker, gate in enumerate(gates):
            gate.release(idle[worker][1])
            gate.release(newcomers[worker])
        assert board.total_sessions() == 0
    finally:
        board.close()
