"""End to end: worker processes write metrics while traffic flows, the exporter process
serves their sum over HTTP, a scraper parses it (prometheus_client.parser, promtool).

The pool is made without the supervisor: ``tests.stats.runner`` workers with different
slots write into the exporter's directory, which is what supervisor workers do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mtgworkers.config import HostPort, Prometheus
from supervisor.exporter import Exporter
from tests.stats.helpers import (
    Series,
    WorkerProcess,
    scrape,
    scrape_series,
    total,
    value,
    wait_until,
    worker_config,
)
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret
from tests.support.fakedc import FakeDC
from tests.support.website import Website

pytestmark = pytest.mark.e2e

TRAFFIC = "mtg_telegram_traffic_total"
TRAFFIC_MTG = "mtg_telegram_traffic"  # mtg's name, no _total (classic text format)

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    exp = Exporter(
        Prometheus(
            enabled=True,
            bind_to=HostPort("127.0.0.1", 0),
            http_path="/metrics",
            metric_prefix="mtg",
        )
    )
    exp.start()
    yield exp
    exp.close()
    assert not os.path.exists(exp.multiproc_dir), "metrics directory left behind"


@pytest.fixture
def start_worker(
    tmp_path: Path,
    test_secret: KitSecret,
    fake_dc: FakeDC,
    website: Website,
    exporter: Exporter,
) -> Iterator[StartWorker]:
    """start_worker(slot, overrides=None, wait=True) -> a worker writing into the exporter's
    directory; every worker still running at teardown must stop with exit status 0."""
    started: list[WorkerProcess] = []

    def start(slot: int, overrides: dict[str, Any] | None = None, wait: bool = True):
        config = worker_config(test_secret.hex, fake_dc.port, website.port, overrides)
        worker = WorkerProcess(tmp_path, config, slot, exporter.multiproc_dir).start()
        started.append(worker)
        return worker.wait_listening() if wait else worker

    yield start
    failures = []
    for worker in started:
        if worker.proc is not None and worker.proc.returncode is None:
            code = worker.stop()
            if code != 0:
                failures.append(f"worker {worker.slot} exited with {code}\n{worker.output()}")
    assert not failures, "\n".join(failures)


def _client(worker: WorkerProcess, secret: KitSecret, **options: Any) -> FakeTLSClient:
    key = options.pop("key", secret.key)
    return FakeTLSClient(worker.host, worker.port, key, secret.host, **options)


def _session(worker: WorkerProcess, secret: KitSecret, payload: int, dc: int = 2) -> FakeTLSClient:
    """A relayed session that sent ``payload`` bytes and got them back from the echo DC."""
    client = _client(worker, secret)
    client.handshake(dc=dc)
    if payload:
        data = os.urandom(payload)
        client.send(data)
        assert client.recv_exactly(payload) == data
    return client


def _watch(port: int) -> Callable[[], Series]:
    """A scrape function that also checks that no counter ever went down."""
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def scrape_checked() -> Series:
        series = scrape_series(port, "/metrics")
        for name, by_labels in series.items():
            if not (name.endswith("_total") or name.startswith("mtg_telegram_traffic")):
                continue
            for labels, current in by_labels.items():
                before = seen.get((name, labels), 0.0)
                assert current >= before, f"counter {name}{labels} went down: {before} -> {current}"
                seen[(name, labels)] = current
        return series

    return scrape_checked


def test_two_workers_relay_then_one_is_killed_and_restarted(
    exporter: Exporter, start_worker: StartWorker, test_secret: KitSecret
) -> None:
    port = exporter.address[1]
    observe = _watch(port)
    first = start_worker(0, wait=False)
    second = start_worker(1, wait=False)
    first.wait_listening()
    second.wait_listening()

    # Five sessions: three on worker 0, two on worker 1. The open ones send nothing, so
    # the traffic counters are exact whenever the periodic flush runs.
    closing = [
        _session(first, test_secret, 70_001),
        _session(second, test_secret, 1000),
    ]
    open_sessions = [_session(first, test_secret, 0) for _ in range(2)]
    open_sessions.append(_session(second, test_secret, 0))
    labels = {"telegram_ip": "127.0.0.1", "dc": "2"}
    # The proxy dials the DC after the client's handshake: wait for the gauges to settle.
    wait_until(
        lambda: (
            (s := observe())
            and value(s, "mtg_client_connections", ip_family="ipv4") == 5
            and value(s, "mtg_telegram_connections", **labels) == 5
        ),
        5,
        "5 client and 5 Telegram connections",
    )

    for client in closing:
        client.close()
    sent = 1000 + 70_001
    series = wait_until(
        lambda: (
            (s := observe())
            and value(s, TRAFFIC, direction="to_client", **labels) == sent
            and value(s, "mtg_client_connections", ip_family="ipv4") == 3
            and s
        ),
        5,
        "the traffic of the closed sessions",
    )
    assert value(series, TRAFFIC, direction="from_client", **labels) == sent
    # mtg's own sample name, without _total, serves the same value.
    assert value(series, TRAFFIC_MTG, direction="from_client", **labels) == sent
    assert value(series, "mtg_telegram_connections", **labels) == 3

    # kill -9 worker 0 with two open sessions: its gauges go, counters stay.
    first.kill9()
    series = wait_until(
        lambda: (
            (s := observe()) and value(s, "mtg_client_connections", ip_family="ipv4") == 1 and s
        ),
        5,
        "the dead worker's connections to disappear",
    )
    assert value(series, "mtg_telegram_connections", **labels) == 1
    assert value(series, TRAFFIC, direction="to_client", **labels) == sent

    # Its replacement reuses slot 0 and its files: counters continue from the dead totals.
    replacement = start_worker(0)
    observe()  # the dead worker's 70 001 bytes are still counted
    with _session(replacement, test_secret, 5000):
        pass
    series = wait_until(
        lambda: (
            (s := observe())
            and value(s, TRAFFIC, direction="to_client", **labels) == sent + 5000
            and s
        ),
        5,
        "the replacement's traffic on top of the old totals",
    )
    assert value(series, TRAFFIC, direction="from_client", **labels) == sent + 5000
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 1
    for client in open_sessions:
        client.close()
    wait_until(
        lambda: value(observe(), "mtg_client_connections", ip_family="ipv4") == 0,
        5,
        "no connections left",
    )
    # Files stay bounded by the slots: one set per slot id, whatever the restarts.
    names = sorted(n for n in os.listdir(exporter.multiproc_dir) if n.endswith(".db"))
    assert {n.rsplit("_", 1)[1] for n in names} <= {"0.db", "1.db"}


def test_open_sessions_are_flushed_within_the_flush_interval(
    exporter: Exporter, start_worker: StartWorker, test_secret: KitSecret
) -> None:
    worker = start_worker(3)
    client = _session(worker, test_secret, 12_345, dc=4)
    labels = {"telegram_ip": "127.0.0.1", "dc": "4"}
    # The worker flushes open sessions every 5 s (its sweeper ticks once a second) and the
    # observer writes its changes once a second: at most ~7 s after the worker started.
    series = wait_until(
        lambda: (
            (s := scrape_series(exporter.address[1], "/metrics"))
            and value(s, TRAFFIC, direction="from_client", **labels) == 12_345
            and s
        ),
        9.0,
        "the periodic traffic flush",
    )
    assert value(series, TRAFFIC, direction="to_client", **labels) == 12_345
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 1
    client.close()


def _closed_by_proxy(worker: WorkerProcess) -> None:
    import socket

    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        try:
            sock.sendall(b"\x16")
            assert sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass


def test_fronting_replay_concurrency_and_blocklist_counters(
    exporter: Exporter,
    start_worker: StartWorker,
    test_secret: KitSecret,
    website: Website,
    tmp_path: Path,
) -> None:
    netset = tmp_path / "block.netset"
    netset.write_text("10.0.0.0/8\n127.0.0.0/8\n192.0.2.1\n")
    guarded = start_worker(
        0,
        {"concurrency": 4, "defense": {"anti-replay": {"enabled": True}}},
        wait=False,
    )
    blocking = start_worker(
        1, {"defense": {"blocklist": {"enabled": True, "urls": [str(netset)]}}}, wait=False
    )
    guarded.wait_listening()
    blocking.wait_listening()
    port = exporter.address[1]
    before = scrape_series(port, "/metrics")
    for name in ("mtg_domain_fronting", "mtg_replay_attacks", "mtg_concurrency_limited"):
        assert value(before, name + "_total") == 0
        assert value(before, name) == 0  # mtg's plain counters exist from the start

    # Two probes with a wrong key are fronted to the website.
    probes = []
    for _ in range(2):
        probe = _client(guarded, test_secret, key=os.urandom(16))
        probes.append((probe, probe.send_client_hello()))
    for index in range(2):
        website.wait_for_bytes(index, len(probes[index][1]))
    # A replayed hello: the first copy is served, the second one is fronted.
    original = _client(guarded, test_secret)
    hello = original.send_client_hello()
    original.read_server_hello()
    original.send_obfs2_frame()  # a relayed session from now on (no handshake timeout)
    replayed = _client(guarded, test_secret)
    replayed.send_raw(hello)
    website.wait_for_bytes(2, len(hello))
    # concurrency = 4: four sessions are open now, so two more are refused.
    for _ in range(2):
        _closed_by_proxy(guarded)
    # Every connection to the blocking worker is refused (127.0.0.0/8 is listed).
    wait_until(
        lambda: value(scrape_series(port, "/metrics"), "mtg_iplist_size", ip_list="blocklist") == 3,
        5,
        "the blocklist to load",
    )
    for _ in range(3):
        _closed_by_proxy(blocking)

    series = wait_until(
        lambda: (
            (s := scrape_series(port, "/metrics"))
            and value(s, "mtg_ip_blocklisted_total", ip_list="blocklist") == 3
            and value(s, "mtg_concurrency_limited_total") == 2
            and s
        ),
        5,
        "the refused connections",
    )
    assert value(series, "mtg_domain_fronting_total") == 3  # 2 probes + 1 replay
    assert value(series, "mtg_domain_fronting") == 3
    assert value(series, "mtg_replay_attacks_total") == 1
    assert value(series, "mtg_replay_attacks") == 1
    assert value(series, "mtg_domain_fronting_connections", ip_family="ipv4") == 3
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 4
    assert value(series, "mtg_iplist_size", ip_list="allowlist") == 2
    assert value(series, "mtg_ip_blocklisted", ip_list="blocklist") == 3
    assert total(series, "mtg_ip_blocklisted_total") == 3

    for probe, _ in probes:
        probe.close()
    replayed.close()
    original.close()
    series = wait_until(
        lambda: (
            (s := scrape_series(port, "/metrics"))
            and value(s, "mtg_client_connections", ip_family="ipv4") == 0
            and s
        ),
        5,
        "the fronted sessions to end",
    )
    fronted = sum(len(h) for _, h in probes) + len(hello)
    assert value(series, "mtg_domain_fronting_traffic_total", direction="from_client") == fronted
    assert value(series, "mtg_domain_fronting_connections", ip_family="ipv4") == 0

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    status, _, body = scrape(port, "/metrics")
    assert status == 200
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()


def test_a_hung_scraper_does_not_block_workers_or_other_scrapes(
    exporter: Exporter, start_worker: StartWorker, test_secret: KitSecret
) -> None:
    import socket

    worker = start_worker(0)
    port = exporter.address[1]
    # A scraper that sends half a request and never reads.
    hung = socket.create_connection(("127.0.0.1", port))
    hung.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    with _session(worker, test_secret, 4096):
        pass
    series = wait_until(
        lambda: (
            (s := scrape_series(port, "/metrics"))
            and value(s, TRAFFIC, telegram_ip="127.0.0.1", dc="2", direction="to_client") == 4096
            and s
        ),
        5,
        "a scrape next to the hung one",
    )
    assert time.monotonic() - started < 3
    assert series
    hung.close()
