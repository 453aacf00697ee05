"""End to end: the doppelganger paces records to Telegram clients ([defense.doppelganger]).

With pacing on (the default) each record leaves after a Weibull delay with mtg's
parameters (mean ~6.7 ms), so a bulk download is capped near 2.4 MB/s per connection;
``pacing = false`` lifts the cap. The bounds here are wide on purpose: they tell a paced
stream from an unpaced one on a busy machine, the benchmark measures the figures.
"""

from __future__ import annotations

import itertools
import statistics
import time

import pytest

from mtgworkers.defense.doppel import WeibullParams
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.fakedc import FakeDC
from tests.support.wire import PATTERN, recv_exactly

pytestmark = pytest.mark.e2e

WINDOW = 2.0  # seconds of download measured
MTG_CAP = 16379 / (WeibullParams().mean_ms / 1000)  # bytes/s: one full record per mean gap


SOURCE = 64 * 1024 * 1024  # more than a paced connection moves in WINDOW


def _download(client: FakeTLSClient, seconds: float) -> tuple[float, list[float], list[int]]:
    """Read raw records for ``seconds`` or until the source is done: (bytes per second,
    arrival times, record sizes)."""
    got = 0
    arrivals: list[float] = []
    sizes: list[int] = []
    client.sock.settimeout(10)
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline and got < SOURCE:
        header = recv_exactly(client.sock, 5)
        arrivals.append(time.monotonic())
        length = int.from_bytes(header[3:5], "big")
        recv_exactly(client.sock, length)
        if header[0] == 0x17:
            got += length
            sizes.append(length)
    return got / (time.monotonic() - started), arrivals, sizes


def _bulk(
    proxy_factory: ProxyPool, fake_dc: FakeDC, secret: KitSecret, pacing: bool
) -> tuple[float, list[float], list[int]]:
    proxy = proxy_factory({"defense": {"doppelganger": {"pacing": pacing}}})
    with (
        fake_dc.configured(mode="source", source_size=SOURCE),
        FakeTLSClient(*proxy.address, secret.key, secret.host) as client,
    ):
        client.handshake(dc=2)
        return _download(client, WINDOW)


def test_a_paced_download_is_capped_and_pacing_off_lifts_the_cap(
    proxy_factory: ProxyPool, fake_dc: FakeDC, test_secret: KitSecret
) -> None:
    paced_rate, arrivals, sizes = _bulk(proxy_factory, fake_dc, test_secret, pacing=True)
    free_rate, _, _ = _bulk(proxy_factory, fake_dc, test_secret, pacing=False)
    assert 0.25 * MTG_CAP < paced_rate < 2.0 * MTG_CAP, f"paced {paced_rate / 1e6:.2f} MB/s"
    assert free_rate > 4 * paced_rate, f"unpaced {free_rate / 1e6:.1f} MB/s"
    # with a DC that always has data, records go out full, one per delay
    assert statistics.median(sizes) == 16379
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    # Weibull(k=0.38): most gaps are short, a few are long (P(X > 10 ms) is about 0.14)
    assert sum(g < 2.0 for g in gaps) > 0.3 * len(gaps), gaps[:50]
    assert sum(g > 10.0 for g in gaps) > 0.04 * len(gaps), gaps[:50]


def test_what_waits_is_flushed_when_the_dc_closes(
    proxy_factory: ProxyPool, fake_dc: FakeDC, test_secret: KitSecret
) -> None:
    proxy = proxy_factory()
    size = 1024 * 1024
    with (
        fake_dc.configured(mode="source", source_size=size, close_after_source=True),
        FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client,
    ):
        client.sock.settimeout(15)
        client.handshake(dc=2)
        received = bytearray()
        while chunk := client.recv_some():
            received += chunk
    assert len(received) == size
    assert PATTERN.mismatch(0, received) is None


def test_an_echo_session_stays_interactive(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    # small messages wait for at most one delay each (mtg's distribution: median ~0.7 ms)
    proxy = proxy_factory()
    with FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client:
        client.handshake(dc=2)
        took = []
        for i in range(40):
            started = time.monotonic()
            client.send(bytes([i]) * 100)
            assert client.recv_exactly(100) == bytes([i]) * 100
            took.append(time.monotonic() - started)
    assert statistics.median(took) < 0.05
