"""supervisor.shm (scoreboard layout, the concurrency bound, the cross-process replay lock),
supervisor.notify and the pid file, without a proxy."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import shm
from supervisor.notify import Notifier
from supervisor.pidfile import PidFileError, read_pid_file, remove_pid_file, write_pid_file
from supervisor.states import WorkerState


@pytest.fixture
def board(tmp_path: Path) -> Iterator[shm.Scoreboard]:
    scoreboard = shm.Scoreboard.create(8, directory=str(tmp_path))
    yield scoreboard
    scoreboard.close()


def _raw(board: shm.Scoreboard) -> bytes:
    with open(board.path, "rb") as stream:
        return stream.read()


def test_scoreboard_layout_is_the_documented_one(board: shm.Scoreboard) -> None:
    assert os.path.basename(board.path).startswith(f"mtgworkers-{os.getpid()}-")
    assert os.stat(board.path).st_mode & 0o777 == 0o600
    assert os.path.getsize(board.path) == 64 + 8 * (8 + 128)
    cell = board.claim(slot=5, generation=7, started_at=1700000000.5, heartbeat=100.25)
    board.set_pid(cell, 4242)
    board.set_state(cell, WorkerState.READY)
    board.set_drain_timeout(cell, 12.5)
    board.set_sample(
        cell, rss=123456, cpu_user=1.5, cpu_system=0.25, cpu_percent=42.0, fds=17, sampled_at=9.0
    )
    limiter = board.limiter(cell, limit=100)
    assert limiter.try_acquire() and limiter.try_acquire()
    raw = _raw(board)
    assert raw[:8] == b"MTGWSCB\x00"
    assert struct.unpack_from("<III", raw, 8) == (1, 8, 1)  # version, cells, high-water mark
    assert struct.unpack_from("<Q", raw, 64 + 8 * cell)[0] == 2  # sessions of the cell
    record = 64 + 8 * 8 + 128 * cell
    assert struct.unpack_from("<IIIIdd", raw, record) == (4242, 5, 7, 2, 1700000000.5, 12.5)
    assert struct.unpack_from("<QdddI", raw, record + 32) == (123456, 1.5, 0.25, 42.0, 17)
    assert struct.unpack_from("<dd", raw, record + 72) == (9.0, 100.25)  # sampled_at, heartbeat
    (entry,) = board.records()
    assert entry == shm.WorkerRecord(
        cell=0,
        pid=4242,
        slot=5,
        generation=7,
        state="ready",
        started_at=1700000000.5,
        sessions=2,
        rss=123456,
        cpu_user=1.5,
        cpu_system=0.25,
        cpu_percent=42.0,
        fds=17,
        sampled_at=9.0,
        heartbeat=100.25,
    )
    assert board.drain_timeout(cell) == 12.5


def test_heartbeat_is_set_at_claim_then_bumped_by_the_worker(board: shm.Scoreboard) -> None:
    before = time.monotonic()
    cell = board.claim(slot=0, generation=1, started_at=0.0)
    assert before <= board.heartbeat(cell) <= time.monotonic()
    pid = os.fork()
    if pid == 0:  # a worker: writes its heartbeat through the inherited mapping
        board.beat(cell, 12345.5)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert board.heartbeat(cell) == 12345.5 == board.records()[0].heartbeat
    record = 64 + 8 * 8 + 128 * cell
    assert struct.unpack_from("<d", _raw(board), record + 80)[0] == 12345.5
    board.release(cell)
    assert board.heartbeat(cell) == 0.0


def test_worker_states_are_their_names_and_keep_their_scoreboard_codes(
    board: shm.Scoreboard,
) -> None:
    assert [(state.value, state.code) for state in WorkerState] == [
        ("free", 0),
        ("booting", 1),
        ("ready", 2),
        ("retiring", 3),
    ]
    for state in WorkerState:
        assert WorkerState.from_code(state.code) is state
        assert state == state.value and str(state) == f"{state}" == state.value
    with pytest.raises(ValueError):
        WorkerState.from_code(4)
    cell = board.claim(slot=0, generation=1, started_at=0.0)
    assert board.records()[0].state is WorkerState.BOOTING
    board.set_state(cell, WorkerState.RETIRING)
    record = 64 + 8 * 8 + 128 * cell
    assert struct.unpack_from("<I", _raw(board), record + 12)[0] == 3
    assert board.records()[0].state is WorkerState.RETIRING


def test_cells_of_dead_workers_are_reset_and_reused(board: shm.Scoreboard) -> None:
    first, second = board.claim(0, 1, 0.0), board.claim(1, 1, 0.0)
    assert (first, second) == (0, 1)
    limiter = board.limiter(first, limit=10)
    for _ in range(3):
        assert limiter.try_acquire()
    board.limiter(second, limit=10).try_acquire()
    assert board.total_sessions() == 4
    board.release(first)  # the worker died holding three sessions
    assert board.total_sessions() == 1
    assert board.claim(0, 2, 0.0) == first  # lowest free cell first
    assert board.sessions(first) == 0
    assert board.high_water_mark == 2
    for _ in range(2, 8):
        board.claim(0, 1, 0.0)
    with pytest.raises(LookupError):
        board.claim(0, 1, 0.0)


def test_limit_is_exact_when_admissions_do_not_overlap(board: shm.Scoreboard) -> None:
    limiters = [board.limiter(board.claim(i, 1, 0.0), limit=5) for i in range(3)]
    admitted = [limiters[i % 3].try_acquire() for i in range(9)]
    assert admitted == [True] * 5 + [False] * 4
    assert board.total_sessions() == 5
    limiters[0].release()
    assert limiters[2].try_acquire() and not limiters[1].try_acquire()
    limiters[0].release()
    limiters[0].release()
    limiters[0].release()  # never below zero
    assert limiters[0].active == 0


def test_simultaneous_admissions_overshoot_by_at_most_workers_minus_one(
    board: shm.Scoreboard,
) -> None:
    # The documented worst case: W workers check at the same instant, then all take.
    workers, limit = 4, 10
    limiters = [board.limiter(board.claim(i, 1, 0.0), limit=limit) for i in range(workers)]
    for _ in range(limit - 1):
        assert limiters[0].try_acquire()
    assert all(limiter.has_room() for limiter in limiters)  # all see 9 < 10
    for limiter in limiters:
        limiter.take()
    assert board.total_sessions() == limit + workers - 1
    assert not any(limiter.has_room() for limiter in limiters)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=120))
def test_no_interleaving_overshoots_more_than_workers_minus_one(steps: list[int]) -> None:
    # Each step advances one worker: check (has_room) or, if it checked, take. A worker has
    # at most one admission in flight, as in an event loop; release happens now and then.
    import tempfile

    workers, limit = 4, 6
    with tempfile.TemporaryDirectory() as directory:
        board = shm.Scoreboard.create(workers, directory=directory)
        try:
            limiters = [board.limiter(board.claim(i, 1, 0.0), limit=limit) for i in range(workers)]
            checked = [False] * workers
            peak = 0
            for step in steps:
                worker = step % workers
                limiter = limiters[worker]
                if step >= workers and limiter.active:
                    limiter.release()
                elif checked[worker]:
                    limiter.take()
                    checked[worker] = False
                else:
                    checked[worker] = limiter.has_room()
                peak = max(peak, board.total_sessions())
            assert peak <= limit + workers - 1
        finally:
            board.close()


def _in_child(work: Callable[[], int]) -> int:
    """Run ``work`` in a forked child; return its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = work()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_replay_cache_is_shared_between_processes(tmp_path: Path) -> None:
    cache = shm.ReplayCache.create(4096, 0.001, directory=str(tmp_path))
    try:
        # first seen in one process, a replay in another one
        assert _in_child(lambda: int(cache.open_filter().test_and_add(b"session-id"))) == 0
        assert _in_child(lambda: int(cache.open_filter().test_and_add(b"session-id"))) == 1
        assert cache.open_filter().test_and_add(b"session-id")
        assert not cache.open_filter().test_and_add(b"another one")
    finally:
        cache.close()
    assert not os.path.exists(cache.path)


def test_replay_lock_excludes_and_dies_with_its_holder(tmp_path: Path) -> None:
    cache = shm.ReplayCache.create(4096, 0.001, directory=str(tmp_path))
    mine = cache.open_filter()
    locked_r, locked_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # take the lock, say so, wait, then die without unlocking
        theirs = cache.open_filter()
        fcntl.flock(theirs.lock_fd, fcntl.LOCK_EX)
        os.write(locked_w, b"x")
        os.read(hold_r, 1)
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        assert os.read(locked_r, 1) == b"x"
        with pytest.raises(BlockingIOError):  # another worker's test_and_add would wait
            fcntl.flock(mine.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(hold_w, b"x")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
        # the kernel released the dead holder's lock: no deadlock
        fcntl.flock(mine.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(mine.lock_fd, fcntl.LOCK_UN)
        assert not mine.test_and_add(b"after the crash")
    finally:
        for fd in (locked_r, locked_w, hold_r, hold_w, mine.lock_fd):
            os.close(fd)
        cache.close()


def test_segment_can_be_reopened_after_unlink(tmp_path: Path) -> None:
    segment = shm.Segment("replay", 4096, directory=str(tmp_path))
    os.unlink(segment.path)
    fd = segment.reopen()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        segment.close()


def test_stale_segments_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    child = os.fork()  # a PID that existed a moment ago
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    stale = tmp_path / f"mtgworkers-{child}-0123456789abcdef-scoreboard"
    alive = tmp_path / f"mtgworkers-{os.getppid()}-0123456789abcdef-replay"
    other = tmp_path / "unrelated-file"
    for path in (stale, alive, other):
        path.write_bytes(b"")
    assert shm.remove_stale_segments(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and alive.exists() and other.exists()


def test_notifier_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.ready("serving\nnicely")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving nicely"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        reloading, usec = listener.recv(4096).decode().split("\n")
        assert reloading == "RELOADING=1"
        assert before <= int(usec.removeprefix("MONOTONIC_USEC=")) <= before + 5_000_000
        assert notifier.stopping()
        assert listener.recv(4096) == b"STOPPING=1"


def test_notifier_abstract_socket_and_absence() -> None:
    name = f"mtgworkers-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert listener.recv(4096) == b"STATUS=hello"
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready()
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not gone.ready() and not gone.ready()  # logged once, never raised


def test_pid_file(tmp_path: Path) -> None:
    path = str(tmp_path / "p.pid")
    write_pid_file(path, 12345678)  # not a live PID: overwritten without complaint below
    assert read_pid_file(path) == 12345678
    write_pid_file(path, os.getpid())
    with pytest.raises(PidFileError, match="already running as pid"):
        write_pid_file(path, os.getpid() + 1)
    remove_pid_file(path, os.getpid() + 1)  # not ours: kept
    assert read_pid_file(path) == os.getpid()
    remove_pid_file(path, os.getpid())
    assert not os.path.exists(path)
    with pytest.raises(PidFileError, match="cannot write pid-file"):
        write_pid_file(str(tmp_path / "missing" / "p.pid"), os.getpid())


def test_workers_zero_means_one_per_usable_cpu() -> None:
    from supervisor.arbiter import resolve_workers

    assert resolve_workers(0) == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3
