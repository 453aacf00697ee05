"""Prometheus observer and the multiprocess directory: events -> values, worker ids, dead
workers, restarts (a killed writer's counters are continued, its gauges dropped)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtgworkers import config as config_module
from mtgworkers import events as ev
from mtgworkers.config import ConfigError
from mtgworkers.stats import StatsError, make_observers
from mtgworkers.stats.prometheus import (
    MULTIPROC_ENV,
    PrometheusObserver,
    claim_worker_id,
    create_multiproc_dir,
    ip_family,
    reap_dead_workers,
)
from mtgworkers.stats.statsd import StatsdObserver
from supervisor.exporter.exposition import Scraper, render_text
from tests.stats.helpers import Series, parse, value
from tests.support.proxy import REPO_ROOT

SECRET = "ee" + "ab" * 16 + b"example.com".hex()


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Iterator[str]:
    saved = os.environ.get(MULTIPROC_ENV)
    directory = create_multiproc_dir(str(tmp_path))
    yield directory
    if saved is None:
        os.environ.pop(MULTIPROC_ENV, None)
    else:
        os.environ[MULTIPROC_ENV] = saved


def _scrape(directory: str) -> Series:
    return parse(render_text(Scraper(directory, "mtg").families()).decode())


def test_ip_family_is_gos_to4() -> None:
    assert ip_family("192.0.2.1") == "ipv4"
    assert ip_family("::ffff:192.0.2.1") == "ipv4"
    assert ip_family("::ffff:c000:201") == "ipv4"
    assert ip_family("2001:db8::1") == "ipv6"
    assert ip_family("64:ff9b::192.0.2.1") == "ipv6"  # NAT64 is not IPv4-mapped
    assert ip_family("::1") == "ipv6"


def test_events_become_mtgs_exposition(metrics_dir: str) -> None:
    observer = PrometheusObserver("mtg", 0, metrics_dir)
    for event in (
        ev.EventIPListSize(2, is_blocklist=False),
        ev.EventStart("a", "10.0.0.7"),
        ev.EventConnectedToDC("a", "10.0.0.1", 4),
        ev.EventTraffic("a", 200, True),
        ev.EventTraffic("a", 1_500_000, False),
        ev.EventStart("b", "2001:db8::2"),
        ev.EventDomainFronting("b"),
        ev.EventTraffic("b", 100, False),
        ev.EventConcurrencyLimited(),
        ev.EventIPBlocklisted("192.0.2.9", is_blocklist=True),
        ev.EventTraffic("unknown", 7, True),  # no such stream: ignored
        ev.EventFinish("unknown"),
    ):
        observer(event)
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    observer.close()
    # mtg's samples (docs/mtg-compat.md c.2): names without _total, labels sorted, Go numbers.
    for line in (
        'mtg_client_connections{ip_family="ipv4"} 1',
        'mtg_client_connections{ip_family="ipv6"} 1',
        'mtg_telegram_connections{dc="4",telegram_ip="10.0.0.1"} 1',
        'mtg_telegram_traffic{dc="4",direction="to_client",telegram_ip="10.0.0.1"} 200',
        'mtg_telegram_traffic{dc="4",direction="from_client",telegram_ip="10.0.0.1"} 1.5e+06',
        'mtg_domain_fronting_traffic{direction="from_client"} 100',
        'mtg_domain_fronting_connections{ip_family="ipv6"} 1',
        "mtg_concurrency_limited 1",
        "mtg_domain_fronting 1",
        "mtg_replay_attacks 0",
        'mtg_ip_blocklisted{ip_list="blocklist"} 1',
        'mtg_iplist_size{ip_list="allowlist"} 2',
        # ... and the Prometheus names of the counters
        'mtg_telegram_traffic_total{dc="4",direction="to_client",telegram_ip="10.0.0.1"} 200',
        "mtg_concurrency_limited_total 1",
        "# HELP mtg_client_connections A number of actively processing client connections.",
        "# TYPE mtg_client_connections gauge",
        "# TYPE mtg_telegram_traffic_total counter",
        "# TYPE mtg_telegram_traffic untyped",
        "# HELP mtg_iplist_size A size of the ip list (blocklist or allowlist)",
        "# HELP mtg_ip_blocklisted A number of rejected sessions due to ip blocklisting.",
    ):
        assert line in text.splitlines(), f"missing {line!r} in\n{text}"
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)  # families sorted by name, like client_golang


def test_accept_refusals_are_our_counter_with_every_reason(metrics_dir: str) -> None:
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    assert 'mtg_accept_refused_total{reason="emfile"} 0' in text.splitlines()
    observer = PrometheusObserver("mtg", 0, metrics_dir)
    observer(ev.EventAcceptRefused("emfile"))
    observer(ev.EventAcceptRefused("emfile"))
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    observer.close()
    lines = text.splitlines()
    for line in (
        "# TYPE mtg_accept_refused_total counter",
        'mtg_accept_refused_total{reason="emfile"} 2',
        'mtg_accept_refused_total{reason="enfile"} 0',
    ):
        assert line in lines, f"missing {line!r} in\n{text}"
    # ours, not mtg's: no bare-name copy
    assert not [line for line in lines if line.startswith("mtg_accept_refused{")]
    assert "# TYPE mtg_accept_refused untyped" not in lines


def test_evictions_are_our_counter_from_zero(metrics_dir: str) -> None:
    observer = PrometheusObserver("mtg", 0, metrics_dir)
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    assert "mtg_concurrency_evicted_total 0" in text.splitlines()
    observer(ev.EventConcurrencyEvicted())
    observer(ev.EventConcurrencyEvicted())
    observer.flush()
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    observer.close()
    lines = text.splitlines()
    assert "# TYPE mtg_concurrency_evicted_total counter" in lines
    assert "mtg_concurrency_evicted_total 2" in lines
    assert "mtg_concurrency_limited_total 0" in lines  # an eviction is no refusal
    assert not [line for line in lines if line.startswith("mtg_concurrency_evicted ")]


def test_finish_undoes_exactly_what_the_stream_counted(metrics_dir: str) -> None:
    observer = PrometheusObserver("mtg", 0, metrics_dir)
    observer(ev.EventStart("a", "10.0.0.7"))
    observer(ev.EventDomainFronting("a"))  # fronted, never connected to a DC
    observer(ev.EventStart("b", "10.0.0.8"))
    observer(ev.EventConnectedToDC("b", "10.0.0.1", 2))
    observer(ev.EventStart("c", "10.0.0.9"))  # neither (e.g. a bad obfuscated2 frame)
    series = _scrape(metrics_dir)
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 3
    for stream in ("a", "b", "c"):
        observer(ev.EventFinish(stream))
        observer(ev.EventFinish(stream))  # a duplicate finish changes nothing
    series = _scrape(metrics_dir)
    observer.close()
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 0
    assert value(series, "mtg_domain_fronting_connections", ip_family="ipv4") == 0
    assert value(series, "mtg_telegram_connections", telegram_ip="10.0.0.1", dc="2") == 0
    assert value(series, "mtg_domain_fronting_total") == 1


def test_close_drops_live_gauges_and_keeps_counters(metrics_dir: str) -> None:
    observer = PrometheusObserver("mtg", 3, metrics_dir)
    observer(ev.EventStart("a", "10.0.0.7"))
    observer(ev.EventReplayAttack("a"))
    observer.close()
    series = _scrape(metrics_dir)
    assert "mtg_client_connections" not in series
    assert value(series, "mtg_replay_attacks_total") == 1
    assert sorted(os.listdir(metrics_dir)) == ["counter_3.db", "worker-3.lock"]


_WRITER = textwrap.dedent(
    """
    import sys, time
    from mtgworkers import events as ev
    from mtgworkers.stats.prometheus import PrometheusObserver
    observer = PrometheusObserver("mtg", sys.argv[2], sys.argv[1])
    observer(ev.EventIPListSize(5, is_blocklist=True))
    for n in range(4):
        observer(ev.EventStart(f"s{n}", "10.0.0.7"))
        observer(ev.EventConnectedToDC(f"s{n}", "10.0.0.1", 2))
        observer(ev.EventTraffic(f"s{n}", 1000, True))
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _writer(directory: str, worker_id: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, directory, worker_id],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_killed_writers_counters_continue_and_its_gauges_go(metrics_dir: str) -> None:
    proc = _writer(metrics_dir, "5")
    try:
        series = _scrape(metrics_dir)
        assert value(series, "mtg_client_connections", ip_family="ipv4") == 4
        assert value(series, "mtg_iplist_size", ip_list="blocklist") == 5
        with pytest.raises(StatsError, match="in use"):
            claim_worker_id(metrics_dir, "5", timeout=0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    labels = {"telegram_ip": "10.0.0.1", "dc": "2", "direction": "to_client"}
    series = _scrape(metrics_dir)  # reaps the dead writer's live gauges
    assert "mtg_client_connections" not in series
    assert "mtg_iplist_size" not in series
    assert value(series, "mtg_telegram_traffic_total", **labels) == 4000

    # The replacement takes the same id: it continues from the dead writer's totals.
    observer = PrometheusObserver("mtg", 5, metrics_dir)
    observer(ev.EventStart("new", "10.0.0.7"))
    observer(ev.EventConnectedToDC("new", "10.0.0.1", 2))
    observer(ev.EventTraffic("new", 1, True))
    series = _scrape(metrics_dir)
    observer.close()
    assert value(series, "mtg_telegram_traffic_total", **labels) == 4001
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 1
    assert value(series, "mtg_telegram_connections", telegram_ip="10.0.0.1", dc="2") == 1


def test_a_replacement_drops_the_live_gauges_its_dead_predecessor_left(metrics_dir: str) -> None:
    proc = _writer(metrics_dir, "2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    # No scrape in between: the new owner of id 2 must not inherit 4 connections.
    observer = PrometheusObserver("mtg", 2, metrics_dir)
    observer(ev.EventStart("x", "10.0.0.7"))
    series = _scrape(metrics_dir)
    observer.close()
    assert value(series, "mtg_client_connections", ip_family="ipv4") == 1


def test_reap_keeps_live_workers_and_drops_dead_and_orphaned_files(metrics_dir: str) -> None:
    live = PrometheusObserver("mtg", 1, metrics_dir)
    live(ev.EventStart("a", "10.0.0.7"))
    # id 8: its lock file exists but nobody holds it (the process died).
    Path(metrics_dir, "worker-8.lock").touch()
    Path(metrics_dir, "gauge_livesum_8.db").write_bytes(b"")
    # id 9: files without any lock file.
    Path(metrics_dir, "gauge_livemostrecent_9.db").write_bytes(b"")
    assert reap_dead_workers(metrics_dir) == ["8", "9"]
    names = sorted(os.listdir(metrics_dir))
    live.close()
    assert "gauge_livesum_1.db" in names
    assert not any(n.endswith(("_8.db", "_9.db")) for n in names)


def test_worker_ids_cannot_break_file_names(metrics_dir: str) -> None:
    for bad in ("a_b", "../x", "", "x" * 33):
        with pytest.raises(StatsError):
            PrometheusObserver("mtg", bad, metrics_dir)


def test_multiproc_dir_is_private_and_stale_ones_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "mtgworkers-metrics-999999999-abc"  # no such PID
    stale.mkdir()
    (stale / "counter_0.db").write_bytes(b"x")
    live = tmp_path / f"mtgworkers-metrics-{os.getppid()}-abc"
    live.mkdir()
    directory = create_multiproc_dir(str(tmp_path))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.listdir(directory) == []
    assert not stale.exists()
    assert live.exists()


def _config(**stats: object) -> config_module.Config:
    return config_module.parse({"secret": SECRET, "bind-to": "127.0.0.1:3128", "stats": stats})


def test_make_observers(metrics_dir: str) -> None:
    assert make_observers(_config(), 0) == []
    both = make_observers(
        _config(
            prometheus={"enabled": True},
            statsd={"enabled": True, "address": "127.0.0.1:8125"},
        ),
        4,
        multiproc_dir=metrics_dir,
    )
    assert [type(o) for o in both] == [PrometheusObserver, StatsdObserver]
    for observer in both:
        observer.close()
    os.environ.pop(MULTIPROC_ENV, None)
    with pytest.raises(StatsError, match="PROMETHEUS_MULTIPROC_DIR"):
        make_observers(_config(prometheus={"enabled": True}), 0)
    # statsd without an address is refused when the config is read
    with pytest.raises(ConfigError, match=r"^stats\.statsd\.address: "):
        _config(statsd={"enabled": True})


def test_hellos_without_sni_are_our_counter_from_zero(metrics_dir: str) -> None:
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    assert "mtg_client_hellos_without_sni_total 0" in text.splitlines()
    observer = PrometheusObserver("mtg", 0, metrics_dir)
    observer(ev.EventHelloWithoutSNI("s1"))
    observer(ev.EventHelloWithoutSNI("s2"))
    text = render_text(Scraper(metrics_dir, "mtg").families()).decode()
    observer.close()
    lines = text.splitlines()
    assert "mtg_client_hellos_without_sni_total 2" in lines
    assert "# TYPE mtg_client_hellos_without_sni untyped" not in lines  # ours: no bare copy
