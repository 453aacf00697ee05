"""End-to-end: memory stays bounded with slow readers; nothing leaks after abuse.

The bulk tests move 64 MiB through one session towards a reader that is much slower than
the writer. A proxy without back-pressure would buffer most of that in memory; ours must
stay within a few MiB (relay.py bounds each transport's write buffer), so the RSS growth
limit below is far under the transfer size.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from tests.support.client import FakeTLSClient, run_concurrently
from tests.support.env import KitSecret, ProxyPool
from tests.support.fakedc import FakeDC, closed_port
from tests.support.proxy import ProxyProcess, RssSampler
from tests.support.website import HOSTNAME, Website, https_get
from tests.support.wire import PATTERN

pytestmark = pytest.mark.e2e

BULK = 64 * 1024 * 1024  # a multiple of READ_CHUNK
MAX_RSS_GROWTH = 32 * 1024 * 1024
# Slow reader: 64 KiB per 5 ms at most (~13 MB/s), so a 64 MiB transfer takes >= 5 s.
READ_CHUNK = 65536
READ_PAUSE = 0.005


def _warm_up(proxy: ProxyProcess, secret: KitSecret) -> None:
    """One full session first, so lazily created state does not count as growth."""
    with FakeTLSClient(*proxy.address, secret.key, secret.host) as client:
        client.handshake(dc=2)
        client.send(b"warm")
        assert client.recv_exactly(4) == b"warm"


def test_bulk_upload_to_slow_dc_keeps_memory_bounded(
    proxy: ProxyProcess, fake_dc: FakeDC, test_secret: KitSecret
) -> None:
    _warm_up(proxy, test_secret)
    first = len(fake_dc.connections)
    settings = {"mode": "sink", "sink_delay": READ_PAUSE, "read_size": READ_CHUNK}
    with (
        fake_dc.configured(**settings),
        RssSampler(proxy) as rss,
        FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client,
    ):
        client.sock.settimeout(30)
        client.handshake(dc=2)
        step = 1024 * 1024
        for offset in range(0, BULK, step):
            client.send(PATTERN.chunk(offset, step))
        conn = fake_dc.wait_for_connection(first)
        deadline = time.monotonic() + 30
        while conn.bytes_in < BULK:
            assert time.monotonic() < deadline, f"DC got {conn.bytes_in} of {BULK} bytes"
            time.sleep(0.05)
    assert conn.bytes_in == BULK
    assert conn.mismatch_at is None, f"wrong byte at offset {conn.mismatch_at}"
    assert rss.growth < MAX_RSS_GROWTH, (
        f"proxy RSS grew by {rss.growth / 2**20:.1f} MiB while relaying to a slow DC"
    )
    proxy.assert_alive()


def test_bulk_download_to_slow_client_keeps_memory_bounded(
    proxy_factory: ProxyPool, fake_dc: FakeDC, test_secret: KitSecret
) -> None:
    # Unpaced: the fast path is the one that can outrun a slow client.
    proxy = proxy_factory({"defense": {"doppelganger": {"pacing": False}}})
    _warm_up(proxy, test_secret)
    with (
        fake_dc.configured(mode="source", source_size=BULK),
        RssSampler(proxy) as rss,
        FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client,
    ):
        client.sock.settimeout(30)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        client.handshake(dc=2)
        received = 0
        while received < BULK:
            chunk = client.recv_exactly(READ_CHUNK)
            bad = PATTERN.mismatch(received, chunk)
            assert bad is None, f"wrong byte at offset {bad}"
            received += len(chunk)
            time.sleep(READ_PAUSE)
    assert rss.growth < MAX_RSS_GROWTH, (
        f"proxy RSS grew by {rss.growth / 2**20:.1f} MiB while relaying to a slow client"
    )
    proxy.assert_alive()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_survives_abuse_and_returns_to_fd_baseline(
    proxy_factory: ProxyPool,
    fake_dc: FakeDC,
    website: Website,
    test_secret: KitSecret,
) -> None:
    proxy = proxy_factory(
        {
            "network": {"timeout": {"handshake": "1s"}},
            "defense": {"anti-replay": {"enabled": True}},
        }
    )
    mark = proxy.mark()
    _warm_up(proxy, test_secret)
    proxy.wait_for_log("Stream has been finished", since=mark)
    baseline = proxy.fd_count()
    key, host = test_secret.key, test_secret.host

    def good(i: int) -> None:
        with FakeTLSClient(*proxy.address, key, host) as client:
            client.handshake(dc=1 + i % 5, tag=("dd", "ee", "ef")[i % 3])
            payload = os.urandom(20_000)
            client.send(payload)
            assert client.recv_exactly(len(payload)) == payload

    def wrong_secret(_: int) -> None:
        with FakeTLSClient(*proxy.address, os.urandom(16), host) as client:
            client.send_client_hello()
            assert client.sock.recv(5)[:1] == b"\x16"

    def garbage(_: int) -> None:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(os.urandom(1000))

    def https(_: int) -> None:
        assert https_get(*proxy.address, website.ca, HOSTNAME).status_line.endswith(b"200 OK")

    def replay(_: int) -> None:
        with FakeTLSClient(*proxy.address, key, host) as first:
            first.handshake(dc=2)
        with FakeTLSClient(*proxy.address, key, host) as again:
            assert first.hello is not None
            again.send_client_hello(raw=first.hello)
            assert again.sock.recv(5)[:1] == b"\x16"

    def unknown_dc(_: int) -> None:
        with FakeTLSClient(*proxy.address, key, host) as client:
            client.handshake(dc=777)
            assert client.wait_closed(5) == "eof"

    def silent(_: int) -> None:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            assert sock.recv(10) == b""

    def reset_mid_download(_: int) -> None:
        client = FakeTLSClient(*proxy.address, key, host)
        client.handshake(dc=2)
        client.send(os.urandom(100_000))
        client.recv_exactly(1000)
        _reset(client.sock)

    def reset_during_hello(_: int) -> None:
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        _reset(sock)

    jobs = (
        [good] * 20
        + [wrong_secret] * 5
        + [garbage] * 5
        + [https] * 3
        + [replay] * 3
        + [unknown_dc] * 3
        + [silent] * 3
        + [reset_mid_download] * 5
        + [reset_during_hello] * 5
    )
    run_concurrently(len(jobs), lambda i: jobs[i](i), max_workers=32)

    proxy.assert_alive()
    proxy.wait_fd_count(baseline, timeout=5)
    deadline = time.monotonic() + 5
    while fake_dc.stats()["open"] or any(not c.closed.is_set() for c in website.connections):
        assert time.monotonic() < deadline, "proxy left upstream connections open"
        time.sleep(0.05)
    assert proxy.logs_matching("replay attack has been detected!")
    # Still serving normally afterwards.
    good(0)
    proxy.assert_alive()


def test_sigterm_with_open_sessions_exits_cleanly(
    proxy: ProxyProcess, test_secret: KitSecret
) -> None:
    clients = [FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) for _ in range(5)]
    try:
        for client in clients:
            client.handshake(dc=2)
            client.send(b"x")
            assert client.recv_exactly(1) == b"x"
        assert proxy.stop(timeout=10) == 0
        for client in clients:
            assert client.wait_closed(5) in ("eof", "reset")
    finally:
        for client in clients:
            client.close()


def test_unreachable_everything_does_not_kill_the_proxy(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = proxy_factory(
        dc_port=closed_port(),
        fronting_port=None,
        overrides={"domain-fronting": {"ip": "127.0.0.1", "port": closed_port()}},
    )

    def attempt(i: int) -> None:
        key = test_secret.key if i % 2 else os.urandom(16)
        with FakeTLSClient(*proxy.address, key, test_secret.host) as client:
            if i % 2:
                client.handshake(dc=2)
            else:
                client.send_client_hello()
            assert client.wait_closed(5) in ("eof", "reset")

    run_concurrently(20, attempt)
    proxy.assert_alive()
    assert proxy.logs_matching("cannot dial to telegram")
    assert proxy.logs_matching("cannot dial to the fronting domain")
