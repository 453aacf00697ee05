"""End-to-end: handshake and idle timeouts, Telegram dial failures (protocol.md §0, §5.3, §13, §15)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support.client import FakeTLSClient, build_client_hello, run_concurrently
from tests.support.env import ProxyPool
from tests.support.fakedc import FakeDC, closed_port
from tests.support.website import Website

pytestmark = pytest.mark.e2e


def _closed_after(sock: socket.socket, timeout: float) -> tuple[float, str]:
    """Seconds until the peer closed ``sock`` (reading and discarding), and how."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        how = "eof"
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout} s") from None
    return time.monotonic() - start, how


def test_handshake_timeout_cuts_silent_and_slow_clients(
    proxy_factory: ProxyPool, test_secret, website: Website
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory({"network": {"timeout": {"handshake": "1s"}}})
    sites_before = len(website.connections)

    def silent(_: int) -> float:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            elapsed, _how = _closed_after(sock, 5)
            return elapsed

    def half_hello(_: int) -> float:
        with FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client:
            client.send_raw(build_client_hello(test_secret.key, test_secret.host)[:200])
            elapsed, _how = _closed_after(client.sock, 5)
            return elapsed

    def no_frame(_: int) -> float:
        with FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client:
            client.send_client_hello()
            client.read_server_hello()
            elapsed, _how = _closed_after(client.sock, 5)
            return elapsed

    timings = run_concurrently(3, lambda i: (silent, half_hello, no_frame)[i](i))
    for name, elapsed in zip(("silent", "half hello", "no obfuscated2 frame"), timings):
        assert 0.8 <= elapsed <= 3.0, f"{name} client closed after {elapsed:.2f} s"
    proxy.assert_alive()
    # A timeout is not a reason to front (the proxy closes instead).
    assert len(website.connections) == sites_before


def test_idle_timeout(proxy_factory: ProxyPool, client_factory, fake_dc: FakeDC) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory({"network": {"timeout": {"idle": "1s"}}})
    idle = client_factory(proxy)
    busy = client_factory(proxy)
    for client in (idle, busy):
        client.handshake(dc=2)
        client.send(b"hi")
        assert client.recv_exactly(2) == b"hi"

    def watch_idle() -> float:
        return _closed_after(idle.sock, 5)[0]

    def keep_busy() -> float:
        # Traffic every 0.25 s for 2.5 s: never idle for 1 s, so never cut.
        start = time.monotonic()
        while time.monotonic() - start < 2.5:
            busy.send(b"ping")
            assert busy.recv_exactly(4) == b"ping"
            time.sleep(0.25)
        return time.monotonic() - start

    idle_after, _busy_for = run_concurrently(2, lambda i: (watch_idle, keep_busy)[i]())
    assert 0.8 <= idle_after <= 3.0, f"idle session closed after {idle_after:.2f} s"
    busy.send(b"still there")
    assert busy.recv_exactly(11) == b"still there"
    idle_dc = fake_dc.wait_for_connection(0)
    assert idle_dc.closed.wait(3), "the idle session's DC connection was not closed"
    proxy.assert_alive()


def test_unknown_dc_with_fallback_goes_to_dc2(
    proxy_factory: ProxyPool, client_factory, fake_dc: FakeDC
) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory({"allow-fallback-on-unknown-dc": True})
    client = client_factory(proxy)
    client.handshake(dc=99)
    payload = os.urandom(10_000)
    client.send(payload)
    assert client.recv_exactly(len(payload)) == payload
    record = proxy.wait_for_log("unknown DC, fallbacks")
    assert record.get("original_dc") == 99
    conn = fake_dc.wait_for_connection(0)
    assert conn.dc == 2


def test_dc_down(proxy_factory: ProxyPool, client_factory) -> None:  # type: ignore[no-untyped-def]
    proxy = proxy_factory(dc_port=closed_port())
    client = client_factory(proxy)
    client.handshake(dc=2)
    record = proxy.wait_for_log("cannot dial to telegram")
    assert str(record.get("error", "")).startswith("no addresses to call")
    assert client.wait_closed(5) == "eof"
    proxy.assert_alive()
