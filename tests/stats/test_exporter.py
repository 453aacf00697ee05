"""The exporter: number formatting, HTTP semantics (Go ServeMux paths, HEAD, gzip,
OpenMetrics negotiation), pool metrics from shared memory, the process handle."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from mtgworkers import events as ev
from mtgworkers.config import HostPort, Prometheus
from mtgworkers.stats.prometheus import MULTIPROC_ENV, PrometheusObserver, create_multiproc_dir
from supervisor import shm
from supervisor.exporter import (
    Exporter,
    ExporterError,
    Family,
    MultiprocReader,
    PoolCounters,
    Scraper,
    SharedPoolStats,
    go_float,
    path_matches,
    render_openmetrics,
    render_text,
    restart_reason,
    run_exporter,
)
from supervisor.states import WorkerState
from tests.stats.helpers import parse, scrape, scrape_series, value, wait_until


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-1.0, "-1"),
        (200.0, "200"),
        (0.25, "0.25"),
        (999999.0, "999999"),
        (100000.5, "100000.5"),
        (1e6, "1e+06"),
        (1.5e6, "1.5e+06"),
        (123456789.0, "1.23456789e+08"),
        (2.0**53, "9.007199254740992e+15"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (1e21, "1e+21"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_numbers_are_printed_like_go(number: float, text: str) -> None:
    # strconv.FormatFloat(f, 'g', -1, 64), what client_golang's text format uses.
    assert go_float(number) == text


def test_go_servemux_paths() -> None:
    assert path_matches("/", "/")
    assert path_matches("/", "/anything/at/all")
    assert path_matches("/metrics", "/metrics")
    assert not path_matches("/metrics", "/metrics/")
    assert not path_matches("/metrics", "/")
    assert not path_matches("/metrics", "/metricsx")


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Iterator[str]:
    saved = os.environ.get(MULTIPROC_ENV)
    yield create_multiproc_dir(str(tmp_path))
    if saved is None:
        os.environ.pop(MULTIPROC_ENV, None)
    else:
        os.environ[MULTIPROC_ENV] = saved


@pytest.fixture
def served(metrics_dir: str) -> Iterator[tuple[int, str]]:
    """run_exporter on a thread with http-path /metrics; yields (port, metrics_dir)."""
    observer = PrometheusObserver("mtg", 0, metrics_dir)
    observer(ev.EventStart("a", "10.0.0.7"))
    observer(ev.EventConnectedToDC("a", "10.0.0.1", 2))
    observer(ev.EventTraffic("a", 300, True))
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(
        target=run_exporter,
        args=(sock, "/metrics", "mtg", metrics_dir),
        kwargs={"stop": stop},
        daemon=True,
    )
    thread.start()
    yield sock.getsockname()[1], metrics_dir
    stop.set()
    thread.join(5)
    observer.close()


def test_http_path_and_methods(served: tuple[int, str]) -> None:
    port, _ = served
    status, head, body = scrape(port, "/metrics?x=1")
    assert status == 200
    assert head["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert value(parse(body.decode()), "mtg_client_connections", ip_family="ipv4") == 1
    for other in ("/", "/metrics/", "/other"):
        status, _, body = scrape(port, other)
        assert (status, body) == (404, b"404 page not found\n")
    status, head, body = scrape(port, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(head["content-length"]) > 0
    status, head, body = scrape(port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert head["content-encoding"] == "gzip"  # scrape() gunzipped it
    assert b"mtg_telegram_traffic_total" in body


def test_openmetrics_when_asked(served: tuple[int, str]) -> None:
    port, _ = served
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )  # what Prometheus sends
    status, head, body = scrape(port, "/metrics", headers={"Accept": accept})
    assert status == 200
    assert head["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in om_parse(text)}
    traffic = families["mtg_telegram_traffic"]
    assert traffic.type == "counter"
    assert [s.name for s in traffic.samples] == ["mtg_telegram_traffic_total"]
    assert traffic.samples[0].value == 300
    # as mtg under OpenMetrics: no bare counter names
    assert "\nmtg_telegram_traffic{" not in text


def test_pool_metrics_from_shared_memory(metrics_dir: str, tmp_path: Path) -> None:
    board = shm.Scoreboard.create(8, str(tmp_path))
    counters = PoolCounters.create(str(tmp_path), started_at=1_700_000_000.5)
    try:
        ready = board.claim(0, 1, time.time())
        board.set_pid(ready, 4242)
        board.set_state(ready, WorkerState.READY)
        board.set_sample(
            ready, rss=50 << 20, cpu_user=1.5, cpu_system=0.25, cpu_percent=3, fds=17, sampled_at=1
        )
        booting = board.claim(1, 2, time.time())  # forked a moment ago: PID not set yet
        retiring = board.claim(0, 1, time.time())
        board.set_pid(retiring, 4343)
        board.set_state(retiring, WorkerState.RETIRING)
        board.limiter(retiring, 100).try_acquire()
        counters.worker_restarted(restart_reason(-9))
        counters.worker_restarted(restart_reason(1))
        counters.worker_restarted("max_rss")
        counters.worker_restarted("signal")
        counters.worker_restarted("timeout")
        counters.reload_finished(True)
        counters.reload_finished(False)
        counters.reload_finished(True)
        with pytest.raises(ValueError):
            counters.worker_restarted("bored")
        # The exporter maps both segments read-only by path.
        source = SharedPoolStats.attach(board.path, counters.path)
        series = parse(render_text(Scraper(metrics_dir, "mtg", source).families()).decode())
        assert booting >= 0
    finally:
        counters.close()
        board.close()
    assert value(series, "mtg_workers", state="ready") == 1
    assert value(series, "mtg_workers", state="booting") == 1
    assert value(series, "mtg_workers", state="retiring") == 1
    worker = {"slot": "0", "pid": "4242"}
    assert value(series, "mtg_worker_resident_memory_bytes", **worker) == 50 << 20
    assert value(series, "mtg_worker_cpu_seconds_total", **worker) == 1.75
    assert value(series, "mtg_worker_open_fds", **worker) == 17
    assert value(series, "mtg_worker_sessions", slot="0", pid="4343") == 1
    assert ("mtg_worker_open_fds", "4343") not in {
        (name, dict(labels).get("pid")) for name, s in series.items() for labels in s
    }  # never sampled: no resource series yet
    assert value(series, "mtg_worker_restarts_total", reason="signal") == 2
    assert value(series, "mtg_worker_restarts_total", reason="exit") == 1
    assert value(series, "mtg_worker_restarts_total", reason="max_rss") == 1
    assert value(series, "mtg_worker_restarts_total", reason="timeout") == 1
    assert value(series, "mtg_reloads_total", result="success") == 2
    assert value(series, "mtg_reloads_total", result="failure") == 1
    assert value(series, "mtg_supervisor_start_time_seconds") == 1_700_000_000.5


def _prometheus(port: int = 0, path: str = "/") -> Prometheus:
    return Prometheus(
        enabled=True, bind_to=HostPort("127.0.0.1", port), http_path=path, metric_prefix="mtg"
    )


def test_exporter_process_is_restarted_and_cleaned_up(tmp_path: Path) -> None:
    saved = os.environ.get(MULTIPROC_ENV)
    exporter = Exporter(_prometheus(), directory_parent=str(tmp_path))
    try:
        assert os.environ[MULTIPROC_ENV] == exporter.multiproc_dir
        exporter.start()
        port = exporter.address[1]
        assert value(scrape_series(port), "mtg_replay_attacks_total") == 0
        first = exporter.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # The listening socket stays in this process: a scrape now waits in its queue
        # and is answered by the replacement.
        wait_until(lambda: (exporter.poll(), exporter.pid is None)[1], 5, "the exit to be seen")
        now = time.monotonic()
        exporter.poll(now + 0.5)
        assert exporter.pid is None  # back-off: 1 s after the first death
        exporter.poll(now + 1.1)
        assert exporter.pid not in (None, first)
        assert value(scrape_series(port, "/x"), "mtg_domain_fronting_total") == 0
    finally:
        exporter.close()
    assert not os.path.exists(exporter.multiproc_dir)
    assert os.environ.get(MULTIPROC_ENV) == saved
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_exporter_bind_error_names_the_address(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        before = set(os.listdir(tmp_path))
        with pytest.raises(ExporterError, match=f"127.0.0.1:{port}"):
            Exporter(_prometheus(port), directory_parent=str(tmp_path))
        assert set(os.listdir(tmp_path)) == before  # its directory was removed again
    finally:
        taken.close()


def test_exporter_stops_when_its_parent_is_gone(metrics_dir: str) -> None:
    # run_exporter watches the parent PID it was given: a wrong one stops it at once.
    sock = socket.create_server(("127.0.0.1", 0))
    finished = threading.Event()

    def run() -> None:
        run_exporter(sock, "/", "mtg", metrics_dir, parent_pid=1)
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(5)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_go_numbers_read_back_exactly(number: float) -> None:
    text = go_float(number)
    assert float(text) == number or (number == 0 and float(text) == 0)
    assert re.fullmatch(r"-?\d+(\.\d+)?(e[+-]\d{2,3})?", text), text
    mantissa = text.lstrip("-").split("e")[0]
    if "e" in text:  # Go's %e form: one digit before the point, exponent outside [-4, 6)
        assert re.fullmatch(r"\d(\.\d+)?", mantissa) and mantissa[0] != "0"
        assert not -4 <= int(text.split("e")[1]) < 6


def test_reader_follows_growing_and_replaced_files(metrics_dir: str, caplog: Any) -> None:
    reader = MultiprocReader(metrics_dir)
    first = PrometheusObserver("mtg", 0, metrics_dir)
    first(ev.EventStart("a", "10.0.0.7"))
    first(ev.EventConnectedToDC("a", "10.0.0.1", 2))
    assert reader.read()["mtg_client_connections"] == {(("ip_family", "ipv4"),): 1.0}
    # new keys appended after the first read, and a changed value
    for n in range(200):
        first(ev.EventStart(f"s{n}", "2001:db8::1"))
        first(ev.EventConnectedToDC(f"s{n}", f"10.1.{n}.1", 2))
        first(ev.EventTraffic(f"s{n}", n + 1, True))
    data = reader.read()
    assert data["mtg_client_connections"][(("ip_family", "ipv6"),)] == 200
    assert sum(data["mtg_telegram_traffic_total"].values()) == sum(range(1, 201))
    assert len(data["mtg_telegram_connections"]) == 201
    # the live gauge file is replaced (new owner of id 0): the reader starts it over
    first.close()
    second = PrometheusObserver("mtg", 0, metrics_dir)
    second(ev.EventStart("b", "10.0.0.7"))
    data = reader.read()
    assert data["mtg_client_connections"] == {(("ip_family", "ipv4"),): 1.0}
    assert sum(data["mtg_telegram_traffic_total"].values()) == sum(range(1, 201))
    second.close()
    # a damaged file is reported once and skipped; the others are still read
    Path(metrics_dir, "counter_7.db").write_bytes(b"\xff\xff\x00\x00" + bytes(60))
    with caplog.at_level(logging.ERROR, logger="mtgworkers.exporter"):
        data = reader.read()
        reader.read()
    assert sum(data["mtg_telegram_traffic_total"].values()) == sum(range(1, 201))
    assert [r.message for r in caplog.records] == ["cannot read a metrics file"]


def test_labels_and_help_are_escaped() -> None:
    family = Family("mtg_x", "gauge", 'a "help"\\ with\nnewline', [((("k", 'v"\\\n'),), 1.0)])
    text = render_text([family]).decode()
    assert '# HELP mtg_x a "help"\\\\ with\\nnewline\n' in text
    assert 'mtg_x{k="v\\"\\\\\\n"} 1\n' in text
    parsed = parse(text)
    assert parsed["mtg_x"] == {(("k", 'v"\\\n'),): 1.0}
    families = list(om_parse(render_openmetrics([family]).decode()))
    assert families[0].documentation == 'a "help"\\ with\nnewline'
    assert families[0].samples[0].labels == {"k": 'v"\\\n'}


def test_files_being_created_are_not_errors(metrics_dir: str, caplog: Any) -> None:
    # prometheus-client creates a file, then sizes it, then writes its header: a scrape
    # may see any of these steps.
    Path(metrics_dir, "counter_1.db").write_bytes(b"")
    Path(metrics_dir, "counter_2.db").write_bytes(bytes(65536))
    with caplog.at_level(logging.ERROR, logger="mtgworkers.exporter"):
        assert MultiprocReader(metrics_dir).read() == {}
    assert caplog.records == []
