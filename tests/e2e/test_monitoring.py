"""The shipped dashboard and alert rules against a real Prometheus.

A 2-worker proxy (anti-replay on, an allowlist, listening on ``[::]`` for both families)
serves traffic of every kind the dashboard shows: relayed sessions over IPv4 and IPv6, a
probe with a wrong key (fronted), a replayed hello (fronted, counted as a replay) and a
connection refused by the allowlist. A Prometheus server (Debian's ``prometheus``) on
loopback scrapes its exporter every second with ``deploy/prometheus/alerts.yml`` loaded;
then every query of ``deploy/grafana/mtgworkers.json`` and every rule is evaluated
through Prometheus's HTTP API and must return data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from tests.stats.helpers import scrape, scrape_series, value, wait_until
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.fakedc import FakeDC
from tests.support.proxy import REPO_ROOT, ProxyProcess, free_port
from tests.support.website import Website

pytestmark = pytest.mark.e2e

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "mtgworkers.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Grafana's variables as Prometheus needs them: every instance, a window of a few scrapes.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "20s"}
METRIC = re.compile(r"(?<![:\w])mtg_[a-z0-9_]+(?![:\w])")
RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(mtg_[a-z0-9_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)(\{[^}]*\})?")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard, Grafana variables filled."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, replacement)
            queries.append((panel["title"], expr))
    return queries


@dataclass
class Monitored:
    proxy: ProxyProcess
    exporter_port: int
    prometheus: str  # base URL


def _prometheus_api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    data = _prometheus_api(base, "query", query=expr)
    assert data["resultType"] == "vector", (expr, data)
    return list(data["result"])


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def monitored(
    tmp_path_factory: pytest.TempPathFactory, trustme_ca: trustme.CA
) -> Iterator[Monitored]:
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip("prometheus not installed (Debian/Ubuntu package: prometheus)")
    workdir = tmp_path_factory.mktemp("monitoring")
    secret = KitSecret(os.urandom(16), "monitoring.test")
    dc = FakeDC("echo")
    dc.start()
    site = Website(trustme_ca)
    site.start()
    pool = ProxyPool(workdir, secret, dc.port, site.port)
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        allowlist = workdir / "allow.netset"
        allowlist.write_text("127.0.0.1\n::1\n")
        exporter_port = free_port()
        proxy = pool(
            {
                "bind-to": f"[::]:{free_port()}",
                "debug": False,
                "supervisor": {"workers": 2},
                "defense": {
                    "anti-replay": {"enabled": True},
                    "allowlist": {"enabled": True, "urls": [str(allowlist)]},
                },
                "stats": {
                    "prometheus": {
                        "enabled": True,
                        "bind-to": f"127.0.0.1:{exporter_port}",
                        "http-path": "/metrics",
                    }
                },
            }
        )
        wait_until(
            lambda: (
                value(scrape_series(exporter_port, "/metrics"), "mtg_workers", state="ready") == 2
            ),
            15,
            "2 ready workers",
        )
        # The shipped scrape config, pointed at this exporter and scraping every second.
        config = SCRAPE_CONFIG.read_text()
        config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
        config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        config = config.replace('"127.0.0.1:3129"', f'"127.0.0.1:{exporter_port}"')
        config = config.replace("- alerts.yml", f"- {ALERTS}")
        assert f"127.0.0.1:{exporter_port}" in config and str(ALERTS) in config
        (workdir / "prometheus.yml").write_text(config)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        prometheus = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(
            lambda: _ready(base) or prometheus.poll() is not None, 30, "Prometheus to be ready"
        )
        assert prometheus.poll() is None, (workdir / "prometheus.log").read_text()
        # A sample from before the traffic: increase() starts from the counters' zeros.
        wait_until(
            lambda: _query(base, "mtg_replay_attacks_total"), 20, "Prometheus's first scrape"
        )
        yield Monitored(proxy, exporter_port, base)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(5)
        try:
            pool.close()
        finally:
            site.stop()
            dc.stop()


def _traffic(env: Monitored, secret_key: bytes, host: str) -> list[FakeTLSClient]:
    """Relayed sessions over IPv4 and IPv6 (one left open), a fronted probe, a replay and
    a connection refused by the allowlist; returns the clients to close."""
    port = env.proxy.port
    open_clients: list[FakeTLSClient] = []
    for address in ("127.0.0.1", "::1"):
        with FakeTLSClient(address, port, secret_key, host) as client:
            client.handshake(dc=2)
            data = os.urandom(4096)
            client.send(data)
            assert client.recv_exactly(len(data)) == data
        kept = FakeTLSClient(address, port, secret_key, host)
        kept.handshake(dc=4)
        open_clients.append(kept)
    # A probe with a wrong key is fronted.
    probe = FakeTLSClient("127.0.0.1", port, os.urandom(16), host)
    probe.send_client_hello()
    open_clients.append(probe)
    # The same hello twice: the second is a replay (fronted).
    original = FakeTLSClient("127.0.0.1", port, secret_key, host)
    hello = original.send_client_hello()
    original.read_server_hello()
    original.send_obfs2_frame()
    replayed = FakeTLSClient("127.0.0.1", port, secret_key, host)
    replayed.send_raw(hello)
    open_clients += [original, replayed]
    # 127.0.0.2 is not on the allowlist: closed at once.
    with socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
    ) as sock:
        try:
            sock.sendall(b"\x16")
            assert sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    return open_clients


@pytest.fixture(scope="module")
def with_traffic(monitored: Monitored, request: pytest.FixtureRequest) -> Iterator[Monitored]:
    secret = monitored.proxy.config["secret"]
    key = bytes.fromhex(secret[2:34])
    host = bytes.fromhex(secret[34:]).decode()
    clients = _traffic(monitored, key, host)
    port = monitored.exporter_port
    wait_until(
        lambda: (
            (s := scrape_series(port, "/metrics"))
            and value(s, "mtg_replay_attacks_total") == 1
            and value(s, "mtg_ip_blocklisted_total", ip_list="allowlist") == 1
            and value(s, "mtg_client_connections", ip_family="ipv6") == 1
        ),
        10,
        "the traffic in the exporter's metrics",
    )
    yield monitored
    for client in clients:
        client.close()


def _empty_queries(base: str, queries: list[tuple[str, str]]) -> list[str]:
    return [f"{title}: {expr}" for title, expr in queries if not _query(base, expr)]


def test_every_dashboard_query_returns_data(with_traffic: Monitored) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30
    base = with_traffic.prometheus
    # Rates need two scrapes after the traffic; counters first seen now need a few more.
    empty: list[str] = []

    def all_answer() -> bool:
        nonlocal empty
        empty = _empty_queries(base, queries)
        return not empty

    try:
        wait_until(all_answer, 30, "every dashboard query to return data")
    except AssertionError:
        pytest.fail("queries without data:\n" + "\n".join(empty), pytrace=False)
    # The "what to watch" panels show what the traffic did.
    ipv6_share = _query(base, dict(queries)["IPv6 share of clients"])
    assert 0 < float(ipv6_share[0]["value"][1]) < 1


def _rules(base: str) -> list[dict[str, Any]]:
    groups = _prometheus_api(base, "rules")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_rule_evaluates_and_its_series_exist(with_traffic: Monitored) -> None:
    base = with_traffic.prometheus
    wait_until(
        lambda: (
            all(r.get("lastEvaluation", "").startswith("2") for r in _rules(base))
            and all(r["health"] == "ok" for r in _rules(base))
        ),
        20,
        "every rule evaluated once without error",
    )
    rules = _rules(base)
    names = {rule["name"] for rule in rules}
    assert {
        "MTGWorkersProbeCampaign",
        "MTGWorkersReplayAttacks",
        "MTGWorkersConcurrencyLimited",
        "MTGWorkersRestartStorm",
        "MTGWorkersExporterDown",
        "MTGWorkersAcceptQueueDrops",
    } <= names
    missing: list[str] = []

    def selectors_answer() -> bool:
        nonlocal missing
        missing = []
        for rule in rules:
            if rule["type"] == "recording" and not _query(base, rule["name"]):
                missing.append(f"recording rule {rule['name']}")
            for match in SELECTOR.finditer(rule["query"]):
                if not _query(base, match.group(0)):
                    missing.append(f"{rule['name']}: {match.group(0)}")
            _query(base, rule["query"])  # evaluates (an error would fail the API call)
        return not missing

    try:
        wait_until(selectors_answer, 20, "every series the rules read")
    except AssertionError:
        pytest.fail("series without data:\n" + "\n".join(missing), pytrace=False)
    # Alerts that see a live proxy stay quiet; the replay is reported at once.
    assert _query(base, 'up{job="mtgworkers"}')[0]["value"][1] == "1"

    def firing() -> set[str]:
        alerts = _prometheus_api(base, "alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    assert wait_until(lambda: "MTGWorkersReplayAttacks" in firing(), 20, "the replay alert")
    assert not firing() & {
        "MTGWorkersExporterDown",
        "MTGWorkersExporterAbsent",
        "MTGWorkersNoReadyWorker",
        "MTGWorkersRestartStorm",
    }


def _served_names(port: int) -> tuple[set[str], set[str]]:
    """(every sample name of a classic scrape, the names of typed families): the bare
    untyped copies of mtg's counters are in the first set only."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = scrape(port, "/metrics")
    assert status == 200
    samples: set[str] = set()
    typed: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.add(sample.name)
            if family.type != "unknown":
                typed.add(sample.name)
    return samples, typed


def test_dashboard_and_rules_use_only_served_names_and_cover_them_all(
    with_traffic: Monitored,
) -> None:
    served, typed = _served_names(with_traffic.exporter_port)
    in_dashboard = {m for _, expr in dashboard_queries() for m in METRIC.findall(expr)}
    in_rules = set(METRIC.findall(ALERTS.read_text()))
    assert in_dashboard - served == set(), "dashboard names the exporter does not serve"
    assert in_rules - served == set(), "alert rules name metrics the exporter does not serve"
    # Every metric (mtg's, ours, the pool's, the kernel's) has a panel.
    assert typed - in_dashboard == set(), "served metrics without a dashboard panel"
    # Recorded series used by alerts are defined in the same file.
    recorded = set(RECORDED.findall(ALERTS.read_text()))
    defined = set(re.findall(r"record: (\S+)", ALERTS.read_text()))
    assert recorded == defined
