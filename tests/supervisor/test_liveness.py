"""Frozen workers: a worker whose event loop stops running (here: SIGSTOP) is killed after
``[supervisor] worker-timeout`` and replaced on its slot; one that pauses for less is left
alone; the decision itself, without processes."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from mtgworkers import config as config_module
from supervisor.arbiter import SUPERVISOR_STALL, Arbiter, heartbeat_expired
from supervisor.shm import Scoreboard
from tests.stats.helpers import scrape_series, value
from tests.supervisor.helpers import (
    EchoStream,
    open_client,
    owner_of,
    ready_workers,
    signal_proxy,
    start_proxy,
    wait_until,
    worker_pids,
)
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import ProxyProcess, deep_merge, free_port, make_config, to_toml

KILLED = "worker stopped responding; killing it"


# -- the decision --------------------------------------------------------------------------


def test_a_ready_worker_is_frozen_once_its_heartbeat_is_older_than_the_timeout() -> None:
    def expired(now: float, heartbeat: float, ready_at: float | None = 0.0) -> bool:
        return heartbeat_expired(
            now=now, heartbeat=heartbeat, ready_at=ready_at, since=0.0, timeout=2.0
        )

    assert not expired(now=101.0, heartbeat=100.0)
    assert not expired(now=102.0, heartbeat=100.0)  # exactly the timeout: not yet
    assert expired(now=102.01, heartbeat=100.0)
    assert not expired(now=500.0, heartbeat=499.5)
    # a worker that never reported ready is left to the boot timeout (it may be importing)
    assert not expired(now=1000.0, heartbeat=1.0, ready_at=None)
    # the heartbeat set when the cell was claimed does not count against a fresh worker
    assert not expired(now=103.0, heartbeat=90.0, ready_at=101.5)
    assert expired(now=103.6, heartbeat=90.0, ready_at=101.5)


def test_time_the_supervisor_was_stalled_does_not_count() -> None:
    # The supervisor resumed at 200 (it was stopped with its workers): a worker whose
    # last beat is from before the stall gets the whole timeout from then on.
    def expired(now: float) -> bool:
        return heartbeat_expired(now=now, heartbeat=150.0, ready_at=10.0, since=200.0, timeout=2.0)

    assert not expired(200.0) and not expired(201.9)
    assert expired(202.1)


def test_a_gap_in_the_supervisor_loop_restarts_the_judging(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    secret = "ee" + "11" * 16 + b"example.com".hex()
    path.write_text(to_toml(make_config(secret, bind_port=1, dc_port=None, fronting_port=None)))
    arbiter = Arbiter(config_module.load(path), str(path))
    assert arbiter._heartbeats_count_since(1000.0) == 0.0  # the first check: no gap yet
    assert arbiter._heartbeats_count_since(1001.0) == 0.0
    assert arbiter._heartbeats_count_since(1001.0 + SUPERVISOR_STALL) == 0.0
    resumed = 1001.0 + 2 * SUPERVISOR_STALL + 0.5
    assert arbiter._heartbeats_count_since(resumed) == resumed
    assert arbiter._heartbeats_count_since(resumed + 1.0) == resumed


# -- real processes ------------------------------------------------------------------------


def _sessions_on_each_worker(proxy: ProxyProcess, secret: KitSecret) -> dict[int, FakeTLSClient]:
    """One echo session per worker process (pid -> client); the extra clients are closed."""
    pids = worker_pids(proxy)
    held: dict[int, FakeTLSClient] = {}
    deadline = time.monotonic() + 10
    while set(held) != pids:
        assert time.monotonic() < deadline, "could not place a session on every worker"
        client = open_client(proxy, secret.key, secret.host)
        owner = owner_of(proxy, client)
        if owner in held:
            client.close()
        else:
            held[owner] = client
    return held


def _heartbeat_age(board: Scoreboard, pid: int) -> float:
    (record,) = [r for r in board.records() if r.pid == pid]
    return time.monotonic() - record.heartbeat


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class _Handshake(threading.Thread):
    """A full handshake and an echo, started while a worker is frozen."""

    def __init__(self, proxy: ProxyProcess, secret: KitSecret) -> None:
        super().__init__(daemon=True)
        self.client = FakeTLSClient(proxy.host, proxy.port, secret.key, secret.host, timeout=15)
        self.error: str | None = None
        self.done_at = 0.0

    def run(self) -> None:
        try:
            self.client.handshake()
            payload = os.urandom(64)
            self.client.send(payload)
            assert self.client.recv_exactly(64) == payload
            self.done_at = time.monotonic()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


@pytest.mark.e2e
def test_frozen_worker_is_killed_and_replaced_on_its_slot(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(
        proxy_factory,
        workers=2,
        overrides={
            "supervisor": {"worker-timeout": "2s"},
            # clients queued on the frozen worker are served by its replacement seconds
            # later: their FakeTLS timestamps must still be acceptable then
            "tolerate-time-skewness": "30s",
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{metrics_port}"}},
        },
    )
    held = _sessions_on_each_worker(proxy, test_secret)
    victim, survivor = sorted(held)
    slot = ready_workers(proxy)[victim]
    stream = EchoStream(held[survivor])
    stream.start()
    stream.wait_bytes(64 * 1024, 5)
    mark = proxy.mark()
    stopped_at = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        # new clients while it is frozen: those hashed onto its socket wait in its queue
        queued = [_Handshake(proxy, test_secret) for _ in range(12)]
        for handshake in queued:
            handshake.start()

        killed = proxy.wait_for_log(KILLED, since=mark, pid=victim, timeout=2 + 4)
        killed_in = time.monotonic() - stopped_at
        assert killed["slot"] == slot and killed["level"] == "warn"
        assert killed["worker_timeout"] == 2.0 and 2.0 < killed["heartbeat_age"] < 4.0
        assert killed["state"] == "ready"
        died = proxy.wait_for_log("worker died; starting a new one", since=mark, pid=victim)
        assert died["status"] == "signal SIGKILL" and died["slot"] == slot
        new = proxy.wait_for_log("worker is ready", since=mark, slot=slot)
        ready_in = time.monotonic() - stopped_at
    finally:
        _resume(victim)
    print(f"killed {killed_in:.2f} s and replaced {ready_in:.2f} s after SIGSTOP")
    assert ready_in < 2 + 3, f"the replacement was ready {ready_in:.2f} s after SIGSTOP"
    assert new["pid"] != victim and new["generation"] == 1
    # reaped, not a zombie; the pool is the survivor and the new worker
    assert wait_until(lambda: not psutil.pid_exists(victim), 3, "the frozen worker reaped")
    assert worker_pids(proxy) == {survivor, new["pid"]}

    # the clients that arrived during the freeze were all answered, some by the new worker
    for handshake in queued:
        handshake.join(15)
        assert handshake.error is None, handshake.error
    owners = {owner_of(proxy, handshake.client) for handshake in queued}
    assert new["pid"] in owners, f"no client was queued on the frozen worker: {owners}"
    for handshake in queued:
        handshake.client.close()

    # the frozen worker's session is gone, the survivor's kept flowing all along
    assert held[victim].wait_closed(5) in ("eof", "reset")
    stream.wait_bytes(stream.bytes + 256 * 1024, 5)
    assert stream.finish() > 0
    held[survivor].close()

    # every new client is answered, by both workers
    owners = set()
    for _ in range(20):
        client = open_client(proxy, test_secret.key, test_secret.host, timeout=4)
        owners.add(owner_of(proxy, client))
        client.close()
    assert owners == {survivor, new["pid"]}

    def timeout_counted() -> dict | None:
        series = scrape_series(metrics_port)
        return series if value(series, "mtg_worker_restarts_total", reason="timeout") else None

    restarts = wait_until(timeout_counted, 5, "the timeout restart counted")
    assert value(restarts, "mtg_worker_restarts_total", reason="timeout") == 1
    assert value(restarts, "mtg_worker_restarts_total", reason="signal") == 0
    assert value(restarts, "mtg_workers", state="ready") == 2
    assert len(proxy.logs_matching(KILLED)) == 1
    proxy.assert_alive()


@pytest.mark.e2e
def test_worker_paused_for_less_than_the_timeout_is_left_alone(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(
        proxy_factory, workers=2, overrides={"supervisor": {"worker-timeout": "3s"}}
    )
    pids = worker_pids(proxy)
    held = _sessions_on_each_worker(proxy, test_secret)
    victim = min(held)
    board = Scoreboard.attach(proxy.wait_for_log("supervisor started")["scoreboard"])
    try:
        assert _heartbeat_age(board, victim) < 1.0
        os.kill(victim, signal.SIGSTOP)
        try:
            # Busy for 1.5 s (half the timeout): its heartbeat stops moving ...
            wait_until(lambda: _heartbeat_age(board, victim) >= 1.5, 5, "a stale heartbeat")
            # ... and the supervisor sees it, but keeps it
            mark = proxy.mark()
            signal_proxy(proxy, signal.SIGUSR2)
            status = proxy.wait_for_log("worker status", since=mark)
            (frozen,) = [w for w in status["workers"] if w["pid"] == victim]
            assert frozen["state"] == "ready" and frozen["heartbeat_age"] >= 1.5
        finally:
            _resume(victim)
        # its loop runs again: the heartbeat is fresh, so it cannot be judged frozen now
        wait_until(lambda: _heartbeat_age(board, victim) < 0.75, 5, "a fresh heartbeat")
    finally:
        board.close(unlink=False)
    assert not proxy.logs_matching(KILLED)
    assert worker_pids(proxy) == pids
    # its session survived the pause
    for client in held.values():
        client.send(b"still here")
        assert client.recv_exactly(10) == b"still here"
        client.close()


@pytest.mark.e2e
def test_reload_applies_a_new_worker_timeout_to_the_new_generation(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(
        proxy_factory, workers=1, overrides={"supervisor": {"worker-timeout": "1m"}}
    )
    proxy.config = deep_merge(proxy.config, {"supervisor": {"worker-timeout": "2s"}})
    proxy.config_path.write_text(to_toml(proxy.config))
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=mark, timeout=10)
    (new,) = proxy.logs_matching("worker is ready", since=mark)
    mark = proxy.mark()
    os.kill(new["pid"], signal.SIGSTOP)
    try:
        killed = proxy.wait_for_log(KILLED, since=mark, pid=new["pid"], timeout=2 + 4)
    finally:
        _resume(new["pid"])
    assert killed["worker_timeout"] == 2.0 and killed["generation"] == 2
    proxy.wait_for_log("worker is ready", since=mark, slot=0)
    open_client(proxy, test_secret.key, test_secret.host).close()
