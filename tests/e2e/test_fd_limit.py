"""End to end: a worker at its open files limit refuses clients visibly, then recovers."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tests.stats.helpers import scrape_series, value, wait_until
from tests.support.env import ClientFactory, ProxyPool
from tests.support.proxy import free_port

pytestmark = pytest.mark.e2e

# The worker needs about 30 descriptors of its own: with this limit it holds a few dozen
# idle clients and refuses the rest.
NOFILE = 64
CONNECTIONS = NOFILE + 16
REFUSED_LINE = (
    "connections were refused: too many open files; raise LimitNOFILE (systemd) or "
    "'ulimit -n', or lower concurrency"
)
METRIC = "mtg_accept_refused_total"


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the proxy has closed ``sock`` (EOF or reset); never blocks."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_refusals_at_the_open_files_limit_are_counted_and_logged_sparingly(
    proxy_factory: ProxyPool, client_factory: ClientFactory
) -> None:
    metrics_port = free_port()
    proxy = proxy_factory(
        {
            "supervisor": {"workers": 1},
            # idle clients stay until the handshake timeout: keep them for the whole test
            "network": {"timeout": {"handshake": "60s"}},
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{metrics_port}"}},
        },
        start=False,
    )
    proxy.start(nofile=NOFILE)
    proxy.wait_for_log("proxy is listening", timeout=10)
    # the start-up check's DNS query is over: nothing but clients takes descriptors now
    proxy.wait_for_log("SNI-DNS check: cannot resolve secret hostname", timeout=10)
    assert value(scrape_series(metrics_port, "/metrics"), METRIC, reason="emfile") == 0

    started = time.monotonic()
    socks = [socket.create_connection(proxy.address, timeout=5) for _ in range(CONNECTIONS)]
    for sock in socks:
        sock.setblocking(False)
    try:
        # each connection is either a session (held, waiting for its ClientHello) or
        # closed by the proxy at once
        def settled() -> bool:
            held = len(proxy.logs_matching("Stream has been started"))
            return held + sum(map(_closed_by_peer, socks)) == CONNECTIONS

        wait_until(settled, 10, "every connection to be held or refused")
        refused = [sock for sock in socks if _closed_by_peer(sock)]
        held = [sock for sock in socks if sock not in refused]
        assert len(held) > 10 and len(refused) > 10, (len(held), len(refused))

        lines = proxy.logs_matching(REFUSED_LINE)
        assert lines, proxy.output()
        first = lines[0]
        assert (first["level"], first["logger"]) == ("warn", "proxy")
        assert first["refused"] == first["emfile"] == 1  # the first refusal is logged at once
        assert first["enfile"] == 0 and first["nofile_limit"] == NOFILE
        # ... the next ones only add to the count of the next line, at most every 10 s
        assert len(lines) <= 1 + (time.monotonic() - started) // 10 < len(refused)

        # every refusal is counted, in a real scrape of the exporter
        wait_until(
            lambda: (
                value(scrape_series(metrics_port, "/metrics"), METRIC, reason="emfile")
                == len(refused)
            ),
            5,
            f"{METRIC} to reach {len(refused)}",
        )

        # descriptors freed: the worker serves again
        for sock in held:
            sock.close()
        proxy.wait_for_log("Stream has been finished", count=len(held), timeout=10)
        client = client_factory(proxy)
        client.handshake(dc=2)
        client.send(b"served again")
        assert client.recv_exactly(12) == b"served again"
        client.close()
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()

    # the refusals not reported yet are logged when the worker stops
    proxy.stop()
    lines = proxy.logs_matching(REFUSED_LINE)
    assert len(lines) >= 2
    assert sum(line["refused"] for line in lines) == len(refused)
