"""End-to-end: handshake/idle timeouts, Telegram dial failures.

See docs/protocol.md §0, §5.3, §13 and §15.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support.client import FakeTLSClient, build_client_hello, read_record, run_concurrently
from tests.support.env import ClientFactory, KitSecret, ProxyPool
from tests.support.fakedc import FakeDC, closed_port
from tests.support.website import BODY, HOSTNAME, HttpsClient, Website

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
    proxy_factory: ProxyPool, test_secret: KitSecret, website: Website
) -> None:
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
    for name, elapsed in zip(
        ("silent", "half hello", "no obfuscated2 frame"), timings, strict=True
    ):
        assert 0.8 <= elapsed <= 3.0, f"{name} client closed after {elapsed:.2f} s"
    proxy.assert_alive()
    # A timeout is not a reason to front (the proxy closes instead).
    assert len(website.connections) == sites_before


def test_idle_timeout(
    proxy_factory: ProxyPool, client_factory: ClientFactory, fake_dc: FakeDC, website: Website
) -> None:
    proxy = proxy_factory({"network": {"timeout": {"idle": "1s"}}})
    idle = client_factory(proxy)
    busy = client_factory(proxy)
    for client in (idle, busy):
        client.handshake(dc=2)
        client.send(b"hi")
        assert client.recv_exactly(2) == b"hi"
    # A fronted connection is cut by the same idle timeout (docs/protocol.md §6.2 step 4).
    fronted = client_factory(proxy, key=os.urandom(16))
    fronted.send_client_hello()
    assert read_record(fronted.sock)[0] == 0x16  # the website's ServerHello

    def watch_idle() -> float:
        return _closed_after(idle.sock, 5)[0]

    def watch_fronted() -> float:
        return _closed_after(fronted.sock, 5)[0]

    def keep_busy() -> float:
        # Traffic every 0.25 s for 2.5 s: never idle for 1 s, so never cut.
        start = time.monotonic()
        while time.monotonic() - start < 2.5:
            busy.send(b"ping")
            assert busy.recv_exactly(4) == b"ping"
            time.sleep(0.25)
        return time.monotonic() - start

    idle_after, _busy_for, fronted_after = run_concurrently(
        3, lambda i: (watch_idle, keep_busy, watch_fronted)[i]()
    )
    assert 0.8 <= idle_after <= 3.0, f"idle session closed after {idle_after:.2f} s"
    assert 0.8 <= fronted_after <= 3.0, f"idle fronted session closed after {fronted_after:.2f} s"
    assert website.wait_closed(0).received == fronted.sent
    busy.send(b"still there")
    assert busy.recv_exactly(11) == b"still there"
    idle_dc = fake_dc.wait_for_connection(0)
    assert idle_dc.closed.wait(3), "the idle session's DC connection was not closed"
    proxy.assert_alive()


def test_fronted_session_outlives_the_handshake_timeout(
    proxy_factory: ProxyPool, website: Website
) -> None:
    """Once fronting started, only the idle timeout applies (not the 1 s handshake one)."""
    proxy = proxy_factory({"network": {"timeout": {"handshake": "1s"}}})
    with HttpsClient(*proxy.address, website.ca, HOSTNAME) as client:
        assert client.get() == (b"HTTP/1.1 200 OK", BODY)
        time.sleep(1.5)  # longer than the handshake timeout, on purpose
        assert client.get("/again") == (b"HTTP/1.1 200 OK", BODY)
        sent = bytes(client.sent)
    conn = website.wait_closed(0)
    assert bytes(conn.received) == sent
    assert [r.split(b" ")[1] for r in conn.requests] == [b"/", b"/again"]


def test_unknown_dc_with_fallback_goes_to_dc2(
    proxy_factory: ProxyPool, client_factory: ClientFactory, fake_dc: FakeDC
) -> None:
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


def test_dc_down(proxy_factory: ProxyPool, client_factory: ClientFactory) -> None:
    proxy = proxy_factory(dc_port=closed_port())
    client = client_factory(proxy)
    client.handshake(dc=2)
    record = proxy.wait_for_log("cannot dial to telegram")
    assert str(record.get("error", "")).startswith("no addresses to call")
    assert client.wait_closed(5) == "eof"
    proxy.assert_alive()
