"""mtgworkers.fdguard: admission by free descriptors, counted refusals, sparse warnings."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from mtgworkers import events
from mtgworkers.fdguard import CHECK_EVERY, WARN_EVERY, AcceptGuard

ROOT = Path(__file__).resolve().parents[2]
LINE = (
    "connections were refused: too many open files; raise LimitNOFILE (systemd) or "
    "'ulimit -n', or lower concurrency"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[uvloop.Loop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == LINE]


def test_one_line_per_interval_with_the_count_since_the_last(
    loop: uvloop.Loop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    sent: list[events.Event] = []
    stream = events.EventStream()
    stream.subscribe(sent.append)
    clock = Clock()
    guard = AcceptGuard(loop, stream, set(), clock=clock)

    guard.refused("emfile")  # the first one is logged at once
    (first,) = _lines(caplog)
    assert first.levelno == logging.WARNING and first.name == "mtgworkers.proxy"
    assert (first.refused, first.emfile, first.enfile) == (1, 1, 0)  # type: ignore[attr-defined]
    assert first.nofile_limit > 0  # type: ignore[attr-defined]

    clock.now += WARN_EVERY / 2
    for _ in range(5):
        guard.refused("emfile")
    guard.refused("enfile")
    assert len(_lines(caplog)) == 1  # within the interval: counted, not logged

    clock.now += WARN_EVERY / 2
    guard.refused("emfile")  # the interval is over: one line with all of them
    second = _lines(caplog)[1]
    assert (second.refused, second.emfile, second.enfile) == (7, 6, 1)  # type: ignore[attr-defined]

    clock.now += 1
    guard.refused("emfile")
    guard.refused("emfile")
    guard.close()  # what is not reported yet is logged at the end
    assert [r.refused for r in _lines(caplog)] == [1, 7, 2]  # type: ignore[attr-defined]
    assert (
        sent
        == [events.EventAcceptRefused("emfile")] * 6
        + [events.EventAcceptRefused("enfile")]
        + [events.EventAcceptRefused("emfile")] * 3
    )
    guard.close()  # twice is fine
    assert len(_lines(caplog)) == 3


def test_the_timer_logs_a_pending_count_once_the_interval_is_over(
    loop: uvloop.Loop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    guard = AcceptGuard(loop, events.EventStream(), set(), clock=clock)
    guard.refused("emfile")
    clock.now += 1
    guard.refused("enfile")
    guard.start()  # counts at once: the interval is not over, nothing to log
    assert len(_lines(caplog)) == 1
    clock.now += WARN_EVERY  # no refusal since, but the pending one is due ...

    async def next_line() -> None:
        while len(_lines(caplog)) < 2:  # ... at the timer's next count
            await asyncio.sleep(0.01)

    loop.run_until_complete(asyncio.wait_for(next_line(), CHECK_EVERY + 2))
    second = _lines(caplog)[1]
    assert (second.refused, second.emfile, second.enfile) == (1, 0, 1)  # type: ignore[attr-defined]
    guard.close()
    assert len(_lines(caplog)) == 2


def test_plenty_of_descriptors_admits(loop: uvloop.Loop) -> None:
    sent: list[events.Event] = []
    stream = events.EventStream()
    stream.subscribe(sent.append)
    guard = AcceptGuard(loop, stream, set())
    assert all(guard.admit() for _ in range(100))  # not started: nothing is checked
    guard.start()
    assert all(guard.admit() for _ in range(100))
    guard.close()
    assert sent == []


# A real process at its open files limit (the limit of the test process stays alone).
_AT_THE_LIMIT = textwrap.dedent(
    """
    import asyncio, json, os, resource, sys
    from mtgworkers import events
    from mtgworkers.fdguard import AcceptGuard

    loop = asyncio.new_event_loop()
    sent = []
    stream = events.EventStream()
    stream.subscribe(sent.append)
    result = {}

    def fill():
        taken = []
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                return taken

    def open_fds():
        return os.stat("/proc/self/fd").st_size

    # Near the limit (less than the 64 descriptors kept for others): every accept is checked.
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 40, 200))
    guard = AcceptGuard(loop, stream, set())
    guard.start()
    taken = fill()
    result["full"] = guard.admit()
    os.close(taken.pop())
    result["one_free"] = guard.admit()
    os.close(taken.pop())
    result["two_free"] = guard.admit()
    result["events"] = [event.reason for event in sent]
    for fd in taken:
        os.close(fd)
    guard.close()

    # Far from the limit no accept is checked until the next count: room for exactly 5
    # accepts (2 descriptors each) besides the 64 kept for everything else and the one
    # start() opens.
    guard = AcceptGuard(loop, stream, set())
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 1 + 64 + 2 * 5, 200))
    guard.start()
    taken = fill()
    result["unchecked"] = [guard.admit() for _ in range(7)]
    for fd in taken:
        os.close(fd)
    guard.close()
    result["size_reported"] = open_fds() > 0
    print(json.dumps(result))
    """
)


def test_a_process_at_its_limit_refuses_until_two_descriptors_are_free() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _AT_THE_LIMIT],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result = json.loads(done.stdout)
    assert (result["full"], result["one_free"], result["two_free"]) == (False, False, True)
    assert result["events"] == ["emfile", "emfile"]
    if result["size_reported"]:  # Linux >= 6.2 reports the count of open descriptors
        assert result["unchecked"] == [True] * 5 + [False, False]
    else:
        assert result["unchecked"] == [False] * 7
