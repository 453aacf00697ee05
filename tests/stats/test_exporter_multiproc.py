"""The multiprocess-file reader: files that grow, are replaced, are damaged or are being
created while a scrape reads them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mtgworkers import events as ev
from mtgworkers.stats.prometheus import PrometheusObserver
from supervisor.exporter.multiproc import MultiprocReader


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


def test_files_being_created_are_not_errors(metrics_dir: str, caplog: Any) -> None:
    # prometheus-client creates a file, then sizes it, then writes its header: a scrape
    # may see any of these steps.
    Path(metrics_dir, "counter_1.db").write_bytes(b"")
    Path(metrics_dir, "counter_2.db").write_bytes(bytes(65536))
    with caplog.at_level(logging.ERROR, logger="mtgworkers.exporter"):
        assert MultiprocReader(metrics_dir).read() == {}
    assert caplog.records == []
