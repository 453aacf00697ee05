"""The exporter's HTTP server: Go ServeMux paths, HEAD, gzip, OpenMetrics negotiation, and
run_exporter stopping when its parent is gone."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from mtgworkers import events as ev
from mtgworkers.stats.prometheus import PrometheusObserver
from supervisor.exporter.httpd import path_matches, run_exporter
from tests.stats.helpers import parse, scrape, value


def test_go_servemux_paths() -> None:
    assert path_matches("/", "/")
    assert path_matches("/", "/anything/at/all")
    assert path_matches("/metrics", "/metrics")
    assert not path_matches("/metrics", "/metrics/")
    assert not path_matches("/metrics", "/")
    assert not path_matches("/metrics", "/metricsx")


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


def test_exporter_stops_when_its_parent_is_gone(metrics_dir: str) -> None:
    # run_exporter watches the parent PID it was given: a wrong one stops it at once.
    sock = socket.create_server(("127.0.0.1", 0))
    finished = threading.Event()

    def run() -> None:
        run_exporter(sock, "/", "mtg", metrics_dir, parent_pid=1)
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    assert finished.wait(5)
