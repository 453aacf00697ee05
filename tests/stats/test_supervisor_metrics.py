"""End to end through the real supervisor: ``mtgworkers run`` with two workers and
[stats.prometheus]; a worker is killed with SIGKILL and the configuration is reloaded
while a scraper checks that no counter ever goes down."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import signal
import subprocess
from collections.abc import Callable

import psutil
import pytest

import supervisor.arbiter
from tests.stats.helpers import Series, scrape, scrape_series, value, wait_until
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import ProxyProcess, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        "Exporter(" not in inspect.getsource(supervisor.arbiter),
        reason="the supervisor does not start the metrics exporter yet",
    ),
]

TRAFFIC = "mtg_telegram_traffic_total"
LABELS = {"telegram_ip": "127.0.0.1", "dc": "2"}


def _watch(port: int) -> Callable[[], Series]:
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def observe() -> Series:
        series = scrape_series(port, "/metrics")
        for name, by_labels in series.items():
            if not name.endswith("_total") or name == "mtg_worker_cpu_seconds_total":
                continue  # per-PID CPU series restart with their worker
            for labels, current in by_labels.items():
                before = seen.get((name, labels), 0.0)
                assert current >= before, f"{name}{labels} went down: {before} -> {current}"
                seen[(name, labels)] = current
        return series

    return observe


def _client(proxy: ProxyProcess, secret: KitSecret, payload: int) -> FakeTLSClient:
    client = FakeTLSClient(proxy.host, proxy.port, secret.key, secret.host)
    client.handshake(dc=2)
    if payload:
        data = os.urandom(payload)
        client.send(data)
        assert client.recv_exactly(payload) == data
    return client


def test_metrics_survive_a_killed_worker_and_a_reload(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    port = free_port()
    proxy = proxy_factory(
        {
            # the retiring generation must still be draining when the test looks at it
            "supervisor": {"workers": 2, "graceful-timeout": "30s"},
            "stats": {
                "prometheus": {
                    "enabled": True,
                    "bind-to": f"127.0.0.1:{port}",
                    "http-path": "/metrics",
                }
            },
        }
    )
    proxy.wait_for_log("proxy is listening", timeout=10)
    observe = _watch(port)

    for _ in range(6):
        _client(proxy, test_secret, 1000).close()
    idle = [_client(proxy, test_secret, 0) for _ in range(8)]  # no traffic: exact counters
    series = wait_until(
        lambda: (
            (s := observe())
            and value(s, "mtg_client_connections", ip_family="ipv4") == 8
            and value(s, "mtg_telegram_connections", **LABELS) == 8
            and value(s, TRAFFIC, direction="to_client", **LABELS) == 6000
            and s
        ),
        5,
        "8 open sessions and the traffic of 6 closed ones",
    )
    assert value(series, "mtg_workers", state="ready") == 2
    sessions = {
        dict(labels)["pid"]: count
        for labels, count in series["mtg_worker_sessions"].items()
        if count
    }
    assert sum(sessions.values()) == 8
    victim = max(sessions, key=lambda pid: sessions[pid])

    os.kill(int(victim), signal.SIGKILL)
    series = wait_until(
        lambda: (
            (s := observe())
            and value(s, "mtg_worker_restarts_total", reason="signal") == 1
            and value(s, "mtg_client_connections", ip_family="ipv4") == 8 - sessions[victim]
            and value(s, "mtg_workers", state="ready") == 2
            and s
        ),
        8,
        "the killed worker's sessions to go and its replacement to be ready",
    )
    assert victim not in {dict(labels)["pid"] for labels in series["mtg_worker_sessions"]}
    assert value(series, TRAFFIC, direction="from_client", **LABELS) == 6000
    _client(proxy, test_secret, 500).close()
    wait_until(
        lambda: value(observe(), TRAFFIC, direction="to_client", **LABELS) == 6500,
        5,
        "new traffic on top of the old totals",
    )

    mark = proxy.mark()
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=mark, timeout=10)
    _client(proxy, test_secret, 300).close()
    series = wait_until(
        lambda: (
            (s := observe())
            and value(s, TRAFFIC, direction="to_client", **LABELS) == 6800
            and value(s, "mtg_reloads_total", result="success") == 1
            and s
        ),
        5,
        "the reload and the traffic after it",
    )
    # Sessions of the retiring generation are still counted while they drain.
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 8 - sessions[victim]
    for client in idle:
        client.close()
    wait_until(
        lambda: value(observe(), "mtg_client_connections", ip_family="ipv4") == 0,
        8,
        "every session to end",
    )

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    status, _, body = scrape(port, "/metrics")
    assert status == 200
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0, check.stderr.decode()


def _exporter_pid(proxy: ProxyProcess) -> int | None:
    """PID of the supervisor's live metrics exporter process (None: not running)."""
    for child in psutil.Process(proxy.pid).children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "supervisor.exporter" in " ".join(
                child.cmdline()
            ):
                return child.pid
    return None


def test_a_killed_exporter_is_seen_and_restarted(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    # The supervisor reaps every child itself (waitpid(-1)); the exporter's status must
    # still reach its handle: logged as it is, and the exporter started again.
    port = free_port()
    proxy = proxy_factory(
        {
            "supervisor": {"workers": 2},
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{port}"}},
        }
    )
    proxy.wait_for_log("proxy is listening", timeout=10)
    _client(proxy, test_secret, 1000).close()
    wait_until(
        lambda: value(scrape_series(port), TRAFFIC, direction="to_client", **LABELS) == 1000,
        5,
        "the traffic of one session",
    )
    first = wait_until(lambda: _exporter_pid(proxy), 5, "the exporter process")

    mark = proxy.mark()
    os.kill(first, signal.SIGKILL)
    record = proxy.wait_for_log("metrics exporter exited; restarting it", since=mark)
    assert (record["pid"], record["status"]) == (first, "signal SIGKILL")
    assert record["restart_in"] == 1.0
    # A scrape waits in the queue of the supervisor's socket for the new exporter.
    series = scrape_series(port)
    second = _exporter_pid(proxy)
    assert second not in (None, first)
    assert value(series, TRAFFIC, direction="to_client", **LABELS) == 1000
    assert value(series, "mtg_workers", state="ready") == 2
    assert sum(series["mtg_worker_restarts_total"].values()) == 0  # not a worker
    assert not proxy.logs_matching("worker died; starting a new one", since=mark)

    # The replacement is supervised the same way: a second death is seen too.
    mark = proxy.mark()
    os.kill(second, signal.SIGKILL)
    record = proxy.wait_for_log("metrics exporter exited; restarting it", since=mark)
    assert (record["pid"], record["status"]) == (second, "signal SIGKILL")
    assert record["restart_in"] == 2.0
    assert value(scrape_series(port), TRAFFIC, direction="to_client", **LABELS) == 1000
    assert _exporter_pid(proxy) not in (None, first, second)
