"""End to end: scouting raids teach the doppelganger the fronting site's timing and size.

A local TLS site (trustme, on loopback) serves a page; the proxy's raider fetches it
``repeats-per-raid`` times, refits the pacing delays from the gaps between its records and
sizes the ServerHello's noise record like the site's encrypted handshake (which grows with
its certificate chain). One raid per ``raid-each`` for the whole pool, reloads included.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.supervisor.helpers import signal_proxy, worker_pids
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.fakedc import closed_port
from tests.support.proxy import ProxyProcess
from tests.support.website import Website

pytestmark = pytest.mark.e2e

PAGE = bytes(range(256)) * 1200  # ~300 KB: many records per fetch, so gaps to fit
REPEATS = 10
NOISE = re.compile(r"updated noise params: mean=(\d+) jitter=(\d+) samples=(\d+)")


@pytest.fixture(scope="module")
def root_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[trustme.CA, Path]]:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    pem = tmp_path_factory.mktemp("ca") / "root.pem"
    ca.cert_pem.write_to_path(str(pem))
    yield ca, pem


def _site(ca: trustme.CA, big_chain: bool) -> Website:
    if big_chain:  # three RSA intermediates and an RSA leaf: a few KB of certificates
        issuer = ca
        for _ in range(3):
            issuer = issuer.create_child_ca(key_type=trustme.KeyType.RSA)
        cert = issuer.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    else:
        cert = ca.issue_cert("127.0.0.1")  # one small ECDSA certificate
    site = Website(ca, "127.0.0.1", body=PAGE, cert=cert)
    site.start()
    return site


def _raiding_proxy(
    proxy_factory: ProxyPool, site: Website, ca_pem: Path, **more: object
) -> ProxyProcess:
    proxy = proxy_factory(
        {
            "supervisor": {"workers": 2},
            "defense": {
                "doppelganger": {
                    "urls": [f"https://127.0.0.1:{site.port}/page"],
                    "repeats-per-raid": REPEATS,
                    **more,
                }
            },
        },
        start=False,
    )
    proxy.start(env={"SSL_CERT_FILE": str(ca_pem)})
    return proxy


def _calibrated(proxy: ProxyProcess) -> tuple[int, int]:
    found = proxy.wait_for_records(
        lambda records: any(NOISE.match(str(r.get("message", ""))) for r in records),
        "the noise calibration",
        timeout=30,
    )
    match = next(m for r in found if (m := NOISE.match(str(r.get("message", "")))))
    return int(match.group(1)), int(match.group(2))


def _noise_lengths(proxy: ProxyProcess, secret: KitSecret, count: int = 12) -> list[int]:
    lengths = []
    for _ in range(count):
        with FakeTLSClient(proxy.host, proxy.port, secret.key, secret.host) as client:
            client.send_client_hello()
            lengths.append(client.read_server_hello().noise_len)
    return lengths


def test_the_noise_record_follows_the_sites_certificate_chain(
    proxy_factory: ProxyPool, test_secret: KitSecret, root_ca: tuple[trustme.CA, Path]
) -> None:
    ca, pem = root_ca
    means = {}
    for big in (False, True):
        site = _site(ca, big)
        try:
            proxy = _raiding_proxy(proxy_factory, site, pem)
            mean, jitter = _calibrated(proxy)
            # what workers answer now: around the measured size (they re-read each second)
            deadline = time.monotonic() + 10
            while True:
                lengths = _noise_lengths(proxy, test_secret)
                inside = all(mean - jitter <= n <= mean + jitter for n in lengths)
                if inside or time.monotonic() > deadline:
                    break
            assert inside, (mean, jitter, lengths)
            means[big] = mean
            assert len(site.connections) == REPEATS  # one raid, by one of the two workers
            proxy.stop()
        finally:
            site.stop()
    assert means[True] > means[False] + 1500, means  # the chain, not a fixed number


def test_timing_is_refitted_and_raids_are_not_repeated_by_reloads(
    proxy_factory: ProxyPool, root_ca: tuple[trustme.CA, Path]
) -> None:
    ca, pem = root_ca
    site = _site(ca, big_chain=False)
    try:
        proxy = _raiding_proxy(proxy_factory, site, pem)
        timing = re.compile(r"updated timing params: k=[0-9.]+ lambda=[0-9.]+ms samples=\d+$")
        proxy.wait_for_records(
            lambda records: any(timing.match(str(r.get("message", ""))) for r in records),
            "the timing refit",
            timeout=30,
        )
        assert len(site.connections) == REPEATS
        # the same raid learned the fronting site's ServerHello shape without complaint
        assert proxy.logs_matching("cannot learn") == []
        first = worker_pids(proxy)
        mark = proxy.mark()
        signal_proxy(proxy, signal.SIGHUP)
        proxy.wait_for_log("configuration reloaded", since=mark, timeout=15)
        deadline = time.monotonic() + 10
        while not worker_pids(proxy).isdisjoint(first):  # the old generation drains
            assert time.monotonic() < deadline, "the old workers did not go"
            time.sleep(0.05)
        # the new generation's raider found the last raid recent: it waits for raid-each
        time.sleep(1.0)
        assert len(site.connections) == REPEATS
    finally:
        site.stop()


def test_a_site_that_is_down_costs_clients_nothing(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = proxy_factory(
        {"defense": {"doppelganger": {"urls": [f"https://127.0.0.1:{closed_port()}/"]}}}
    )
    proxy.wait_for_log("cannot learn", timeout=15, level="warn")
    lengths = _noise_lengths(proxy, test_secret, count=3)
    assert all(2500 <= n < 4700 for n in lengths)  # the built-in range: nothing learned
