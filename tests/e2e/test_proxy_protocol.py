"""End to end: who may send a PROXY header, and connections that carry no client.

With ``proxy-protocol-listener = true`` a PROXY header names the client. Only the
networks in ``proxy-protocol-trusted`` (the load balancers) may send one: from anyone
else it is a forgery that would get a blocked client past the IP lists. Connections with
no client behind them (reset while queued, HAProxy's PROXY v2 LOCAL health checks, v1
UNKNOWN) are closed quietly: never counted, never checked against the lists, never fronted.
"""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mtgworkers.config import UNTRUSTED_PROXY_HEADERS
from tests.supervisor.helpers import worker_pids
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import LogRecord, ProxyProcess
from tests.support.website import Website

pytestmark = pytest.mark.e2e

BALANCER = "127.0.0.2"  # the trusted load balancer's address; clients come from 127.0.0.1
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"  # what HAProxy's check-send-proxy sends
UNTRUSTED = "proxy protocol header from an untrusted address"
NO_CLIENT = "proxy protocol header without a client (LOCAL or UNKNOWN)"
RESET = "connection was reset before it was accepted"


def _v1(src: str, sport: int = 40000) -> bytes:
    return f"PROXY TCP4 {src} 127.0.0.1 {sport} 443\r\n".encode()


def _errors(proxy: ProxyProcess, since: int) -> list[LogRecord]:
    return [r for r in proxy.records(since) if r.get("level") == "error" or r.get("_raw")]


def _wait_quiet_closes(proxy: ProxyProcess, since: int, count: int, *messages: str) -> None:
    """Wait for ``count`` debug lines, each one of ``messages``."""

    def done(records: list[LogRecord]) -> bool:
        quiet = [r for r in records if r.get("message") in messages]
        assert all(r["level"] == "debug" for r in quiet), quiet
        return len(quiet) >= count

    proxy.wait_for_records(done, f"{count} of {messages}", since=since)


def _served(proxy: ProxyProcess, secret: KitSecret, header: bytes, source: str) -> None:
    with FakeTLSClient(proxy.host, proxy.port, secret.key, secret.host, source=source) as client:
        if header:
            client.send_raw(header)
        client.handshake()
        client.send(b"relayed")
        assert client.recv_exactly(7) == b"relayed"


def _refused(proxy: ProxyProcess, data: bytes) -> bytes:
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(data)
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""


@pytest.fixture
def blocklist(tmp_path: Path) -> Path:
    netset = tmp_path / "block.netset"
    netset.write_text("127.0.0.1/32\n")  # direct clients from 127.0.0.1 are blocked
    return netset


def _with_lists(netset: Path, **more: Any) -> dict[str, Any]:
    return {
        "proxy-protocol-listener": True,
        "supervisor": {"workers": 1},
        "defense": {"blocklist": {"enabled": True, "urls": [str(netset)]}},
        **more,
    }


def test_forged_header_from_an_untrusted_address_is_refused(
    proxy_factory: ProxyPool, test_secret: KitSecret, blocklist: Path, website: Website
) -> None:
    proxy = proxy_factory(_with_lists(blocklist, **{"proxy-protocol-trusted": [BALANCER]}))
    proxy.wait_for_log("ip list was updated", logger="blocklist.ipblockist.firehol")

    # a blocked client claims to be 8.8.8.8: refused, and the claim is not believed
    mark = proxy.mark()
    assert _refused(proxy, _v1("8.8.8.8") + b"\x16\x03\x01") == b""
    proxy.wait_for_log(UNTRUSTED, since=mark, ip="127.0.0.1")
    assert proxy.logs_matching("Stream has been started", since=mark) == []
    # the same client without a header is what it is: blocked
    assert _refused(proxy, b"\x16\x03\x01\x00\x05hello") == b""
    proxy.wait_for_log("ip was blacklisted", since=mark, ip="127.0.0.1")
    assert website.connections == []

    # the balancer's header is believed, and the balancer itself may connect without one
    _served(proxy, test_secret, _v1("198.51.100.9"), BALANCER)
    proxy.wait_for_log("Stream has been started", since=mark, **{"client-ip": "198.51.100.9"})
    _served(proxy, test_secret, b"", BALANCER)
    proxy.wait_for_log("Stream has been started", since=mark, **{"client-ip": BALANCER})
    assert _errors(proxy, 0) == []


def test_without_a_trusted_list_headers_are_believed_with_a_warning(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = proxy_factory({"proxy-protocol-listener": True})
    proxy.wait_for_log(UNTRUSTED_PROXY_HEADERS, level="warn")
    _served(proxy, test_secret, _v1("203.0.113.4"), "127.0.0.1")
    proxy.wait_for_log("Stream has been started", **{"client-ip": "203.0.113.4"})


def test_no_warning_with_a_trusted_list(proxy_factory: ProxyPool) -> None:
    proxy = proxy_factory({"proxy-protocol-listener": True, "proxy-protocol-trusted": []})
    proxy.wait_for_log("proxy is listening")
    assert proxy.logs_matching(UNTRUSTED_PROXY_HEADERS) == []


def test_an_empty_trusted_list_trusts_nobody(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = proxy_factory({"proxy-protocol-listener": True, "proxy-protocol-trusted": []})
    assert _refused(proxy, _v1("198.51.100.9") + b"\x16") == b""
    proxy.wait_for_log(UNTRUSTED, ip="127.0.0.1")
    _served(proxy, test_secret, b"", "127.0.0.1")


# -- connections without a client ----------------------------------------------------------


@pytest.fixture(params=["lists", "no-lists"])
def quiet_proxy(
    request: pytest.FixtureRequest, proxy_factory: ProxyPool, tmp_path: Path
) -> ProxyProcess:
    overrides: dict[str, Any] = {"proxy-protocol-listener": True, "supervisor": {"workers": 1}}
    if request.param == "lists":
        allowed, blocked = tmp_path / "allow.netset", tmp_path / "block.netset"
        allowed.write_text("127.0.0.0/8\n")
        blocked.write_text("192.0.2.0/24\n")
        overrides["defense"] = {
            "blocklist": {"enabled": True, "urls": [str(blocked)]},
            "allowlist": {"enabled": True, "urls": [str(allowed)]},
        }
    proxy = proxy_factory(overrides)
    if request.param == "lists":
        proxy.wait_for_log("ip list was updated", logger="allowlist.ipblockist.firehol")
        proxy.wait_for_log("ip list was updated", logger="blocklist.ipblockist.firehol")
    return proxy


def _assert_quiet(proxy: ProxyProcess, mark: int, website: Website, sessions: int = 0) -> None:
    assert _errors(proxy, mark) == []
    assert len(proxy.logs_matching("Stream has been started", since=mark)) == sessions
    for message in (
        "cannot read client hello",
        "ip was blacklisted",
        "ip was rejected by allowlist",
    ):
        assert proxy.logs_matching(message, since=mark) == [], message
    assert website.connections == []


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
@pytest.mark.parametrize("ending", ["close", "reset"])
def test_health_checks_are_closed_quietly(
    quiet_proxy: ProxyProcess, website: Website, test_secret: KitSecret, header: bytes, ending: str
) -> None:
    proxy = quiet_proxy
    mark = proxy.mark()
    for _ in range(3):
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.sendall(header)
        if ending == "reset":
            _reset(sock)
        else:
            assert sock.recv(1) == b""  # the proxy closes first
            sock.close()
    if ending == "reset":  # the reset may come before the worker reads the header
        _wait_quiet_closes(proxy, mark, 3, NO_CLIENT, RESET)
    else:
        _wait_quiet_closes(proxy, mark, 3, NO_CLIENT)
    _served(proxy, test_secret, b"", "127.0.0.1")  # the worker still serves
    _assert_quiet(proxy, mark, website, sessions=1)  # the last client's session only


@pytest.fixture
def frozen_workers(quiet_proxy: ProxyProcess) -> Iterator[list[psutil.Process]]:
    workers = [psutil.Process(pid) for pid in worker_pids(quiet_proxy)]
    assert workers
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    try:
        yield workers
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGCONT)


def test_a_connection_reset_in_the_accept_queue_is_closed_quietly(
    quiet_proxy: ProxyProcess, website: Website, frozen_workers: list[psutil.Process]
) -> None:
    proxy = quiet_proxy
    mark = proxy.mark()
    for _ in range(3):
        _reset(socket.create_connection(proxy.address, timeout=5))
    for worker in frozen_workers:
        worker.send_signal(signal.SIGCONT)
    _wait_quiet_closes(proxy, mark, 3, RESET)
    _assert_quiet(proxy, mark, website)


def test_reset_clients_are_not_counted(quiet_proxy: ProxyProcess, website: Website) -> None:
    # the same without frozen workers: whatever the timing, no error and no session
    proxy = quiet_proxy
    mark = proxy.mark()
    for _ in range(20):
        _reset(socket.create_connection(proxy.address, timeout=5))
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(V2_LOCAL)
        assert sock.recv(1) == b""
    _wait_quiet_closes(proxy, mark, 1, NO_CLIENT)
    _assert_quiet(proxy, mark, website)
