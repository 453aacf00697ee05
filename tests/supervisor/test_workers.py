"""Worker pool: every worker accepts, a killed worker is replaced while the others keep
relaying, SIGTTIN/SIGTTOU, worker-max-rss, IPv6 bind, SIGUSR2 status."""

from __future__ import annotations

import signal
import time

import pytest

from supervisor.shm import Scoreboard
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
from tests.support.fakedc import FakeDC
from tests.support.proxy import ProxyProcess, free_port

pytestmark = pytest.mark.e2e


def _scoreboard_sessions(proxy: ProxyProcess) -> dict[int, int]:
    """pid -> sessions, read from the supervisor's shared memory segment."""
    board = Scoreboard.attach(proxy.wait_for_log("supervisor started")["scoreboard"])
    try:
        return {record.pid: record.sessions for record in board.records()}
    finally:
        board.close(unlink=False)


def test_every_worker_accepts_and_sessions_are_counted_per_worker(
    proxy_factory: ProxyPool, test_secret: KitSecret, fake_dc: FakeDC
) -> None:
    proxy = start_proxy(proxy_factory, workers=3)
    pids = worker_pids(proxy)
    assert len(pids) == 3
    assert set(ready_workers(proxy)) == pids
    clients = []
    owners: dict[int, int] = {}
    try:
        # SO_REUSEPORT hashes each connection's 4-tuple onto one slot's socket.
        for _ in range(24):
            client = open_client(proxy, test_secret.key, test_secret.host)
            clients.append(client)
            owner = owner_of(proxy, client)
            owners[owner] = owners.get(owner, 0) + 1
        assert len(owners) > 1, f"every connection landed on one worker: {owners}"
        assert set(owners) <= pids
        # the per-worker counters in shared memory agree with what the kernel shows
        assert wait_until(lambda: _scoreboard_sessions(proxy) == owners, 5, "scoreboard counts")
        # ... and SIGUSR2 logs them
        mark = proxy.mark()
        signal_proxy(proxy, signal.SIGUSR2)
        status = proxy.wait_for_log("worker status", since=mark)
        assert status["sessions"] == 24
        assert {w["pid"]: w["sessions"] for w in status["workers"]} == {
            pid: owners.get(pid, 0) for pid in pids
        }
        assert all(w["rss"] > 0 and w["fds"] > 0 for w in status["workers"])
        # worker processes tag their log lines with their slot
        started = proxy.logs_matching("Stream has been started")
        assert {r.get("worker") for r in started} == {
            slot for pid, slot in ready_workers(proxy).items() if pid in owners
        }
    finally:
        for client in clients:
            client.close()
    assert fake_dc.stats()["connections"] == 24


def test_killed_worker_is_replaced_and_other_sessions_keep_flowing(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    pids = worker_pids(proxy)
    by_worker: dict[int, list[FakeTLSClient]] = {pid: [] for pid in pids}
    spare: list[FakeTLSClient] = []
    # Open sessions until both workers hold at least two.
    deadline = time.monotonic() + 10
    while min(len(v) for v in by_worker.values()) < 2:
        assert time.monotonic() < deadline, "could not place sessions on both workers"
        client = open_client(proxy, test_secret.key, test_secret.host)
        owner = owner_of(proxy, client)
        (by_worker[owner] if len(by_worker[owner]) < 2 else spare).append(client)
    victim, survivor = sorted(pids)
    streams = [EchoStream(client) for client in by_worker[survivor]]
    for stream in streams:
        stream.start()
        stream.wait_bytes(64 * 1024, 5)
    slot = ready_workers(proxy)[victim]
    mark = proxy.mark()
    killed_at = time.monotonic()
    signal_proxy_worker(victim)
    died = proxy.wait_for_log("worker died; starting a new one", since=mark, pid=victim)
    assert died["status"] == "signal SIGKILL"
    new = proxy.wait_for_log("worker is ready", since=mark, slot=slot)
    replaced_in = time.monotonic() - killed_at
    assert new["pid"] not in pids and new["generation"] == 1
    assert replaced_in < 2.0, f"replacement took {replaced_in:.2f} s"
    # the survivor's sessions never stopped; keep them going a bit longer to be sure
    for stream in streams:
        stream.wait_bytes(stream.bytes + 256 * 1024, 5)
    for stream in streams:
        assert stream.finish() > 0
    # the victim's sessions are gone (their process was killed) ...
    for client in by_worker[victim]:
        assert client.wait_closed(5) in ("eof", "reset")
    # ... and new clients reach both workers again
    assert worker_pids(proxy) == {survivor, new["pid"]}
    for client in by_worker[survivor] + spare:
        client.close()
    check = open_client(proxy, test_secret.key, test_secret.host)
    check.close()
    proxy.assert_alive()


def signal_proxy_worker(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)


def test_sigttin_adds_and_sigttou_removes_a_worker(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = start_proxy(proxy_factory, workers=2)
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGTTIN)
    added = proxy.wait_for_log("worker is ready", since=mark, slot=2)
    assert wait_until(lambda: len(worker_pids(proxy)) == 3, 5, "three workers")
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGTTOU)
    proxy.wait_for_log("worker slot removed", since=mark, slot=2)
    proxy.wait_for_log("worker exited", since=mark, pid=added["pid"])
    assert wait_until(lambda: len(worker_pids(proxy)) == 2, 5, "two workers")
    # the last worker cannot be removed (one signal at a time: pending signals coalesce)
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGTTOU)
    proxy.wait_for_log("SIGTTOU: one worker less", since=mark, workers=1)
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGTTOU)
    proxy.wait_for_log("SIGTTOU: cannot remove the last worker", since=mark)
    assert wait_until(lambda: len(worker_pids(proxy)) == 1, 5, "one worker")
    for _ in range(3):
        open_client(proxy, test_secret.key, test_secret.host).close()


def test_worker_above_max_rss_is_replaced_gracefully(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    # Any worker is bigger than 1 MiB: the first one is replaced as soon as it is judged.
    proxy = start_proxy(
        proxy_factory,
        workers=1,
        overrides={"supervisor": {"worker-max-rss": "1mib", "graceful-timeout": "10s"}},
    )
    (first,) = worker_pids(proxy)
    client = open_client(proxy, test_secret.key, test_secret.host)
    stream = EchoStream(client)
    stream.start()
    record = proxy.wait_for_log("worker exceeded worker-max-rss; replacing it", timeout=8)
    assert record["pid"] == first and record["rss"] > 1024 * 1024
    assert record["worker_max_rss"] == 1024 * 1024
    assert "hint" in record
    replacement = proxy.wait_for_log("worker is ready", predicate=lambda r: r["pid"] != first)
    assert replacement["slot"] == 0
    proxy.wait_for_log("retiring worker", pid=first)
    # the old worker drains: its session keeps working until the client ends it
    stream.wait_bytes(stream.bytes + 128 * 1024, 5)
    stream.finish()
    client.close()
    proxy.wait_for_log("worker exited", pid=first, timeout=5)
    open_client(proxy, test_secret.key, test_secret.host).close()


def test_ipv6_bind(proxy_factory: ProxyPool, test_secret: KitSecret) -> None:
    proxy = proxy_factory(start=False)
    proxy.config["bind-to"] = f"[::1]:{proxy.port}"
    proxy.config["supervisor"] = {"workers": 2}
    proxy.host = "::1"
    proxy.start()
    proxy.wait_for_log("proxy is listening", bind_to=f"[::1]:{proxy.port}")
    owners = set()
    for _ in range(12):
        client = open_client(proxy, test_secret.key, test_secret.host)
        owners.add(owner_of(proxy, client))
        client.close()
    assert len(owners) == 2


def test_metrics_exporter_sums_the_workers_and_shows_the_pool(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    from tests.stats.helpers import scrape_series, total, value

    metrics_port = free_port()
    proxy = start_proxy(
        proxy_factory,
        workers=2,
        overrides={
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{metrics_port}"}}
        },
    )
    clients = []
    owners: dict[int, int] = {}
    try:
        for _ in range(6):
            client = open_client(proxy, test_secret.key, test_secret.host)
            clients.append(client)
            owner = owner_of(proxy, client)
            owners[owner] = owners.get(owner, 0) + 1

        seen: list[object] = []

        def settled() -> dict | None:
            series = scrape_series(metrics_port)
            sessions = {
                int(dict(labels)["pid"]): count
                for labels, count in series.get("mtg_worker_sessions", {}).items()
            }
            expected = {pid: owners.get(pid, 0) for pid in worker_pids(proxy)}
            connections = total(series, "mtg_client_connections")
            seen[:] = [sessions, expected, connections]
            return series if sessions == expected and connections == 6 else None

        try:
            series = wait_until(settled, 10, "metrics of both workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: last seen {seen}") from None
        assert value(series, "mtg_workers", state="ready") == 2
    finally:
        for client in clients:
            client.close()
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=mark)
    wait_until(
        lambda: value(scrape_series(metrics_port), "mtg_reloads_total", result="success") == 1,
        5,
        "the reload counted",
    )
