"""End to end: FireHOL block/allow lists from files (URLs are covered in unit tests)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.support.env import ClientFactory, ProxyPool
from tests.support.website import Website

pytestmark = pytest.mark.e2e

# Every worker loads the lists itself: wait until all of them have.
WORKERS = 2


def _closed_without_reply(host: str, port: int) -> float:
    """Connect, send a byte, and return how long the proxy took to close on us."""
    with socket.create_connection((host, port), timeout=5) as sock:
        started = time.monotonic()
        try:
            sock.sendall(b"\x16")
            assert sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
        return time.monotonic() - started


def test_blocklisted_client_is_closed_without_fronting(
    proxy_factory: ProxyPool, tmp_path: Path, website: Website
) -> None:
    netset = tmp_path / "block.netset"
    netset.write_text("# firehol style\n10.0.0.0/8\n127.0.0.0/8 # loopback\n192.0.2.1\n")
    proxy = proxy_factory(
        {
            "supervisor": {"workers": WORKERS},
            "defense": {"blocklist": {"enabled": True, "urls": [str(netset)]}},
        }
    )
    proxy.wait_for_log("ip list was updated", logger="blocklist.ipblockist.firehol", count=WORKERS)
    assert _closed_without_reply(proxy.host, proxy.port) < 2.0
    proxy.wait_for_log("ip was blacklisted", ip="127.0.0.1")
    assert website.connections == []  # blocked clients are not fronted


def test_allowlist_admits_only_listed_networks(
    proxy_factory: ProxyPool, client_factory: ClientFactory, tmp_path: Path
) -> None:
    netset = tmp_path / "allow.netset"
    netset.write_text("198.51.100.0/24\n")
    proxy = proxy_factory(
        {
            "supervisor": {"workers": WORKERS},
            "defense": {"allowlist": {"enabled": True, "urls": [str(netset)], "update-each": "1s"}},
        }
    )
    proxy.wait_for_log("ip list was updated", logger="allowlist.ipblockist.firehol", count=WORKERS)
    assert _closed_without_reply(proxy.host, proxy.port) < 2.0
    proxy.wait_for_log("ip was rejected by allowlist", ip="127.0.0.1")

    # the list is re-read every update-each: allow loopback and a client gets through
    netset.write_text("198.51.100.0/24\n127.0.0.1\n")
    mark = proxy.mark()
    # the round in flight may have read the old file: wait for one more
    proxy.wait_for_log("ip list was updated", since=mark, timeout=10, count=2 * WORKERS)
    client = client_factory(proxy)
    client.handshake()
    client.send(b"allowed")
    assert client.recv_exactly(7) == b"allowed"


def test_a_bad_line_is_skipped_and_the_entries_after_it_apply(
    proxy_factory: ProxyPool, tmp_path: Path
) -> None:
    netset = tmp_path / "block.netset"
    netset.write_text("10.0.0.0/8\nnot-an-address\n192.0.2.0/24\nbad/too\n127.0.0.1\n")
    proxy = proxy_factory(
        {
            "supervisor": {"workers": WORKERS},
            "defense": {"blocklist": {"enabled": True, "urls": [str(netset)]}},
        }
    )
    proxy.wait_for_log("ip list was updated", logger="blocklist.ipblockist.firehol", count=WORKERS)
    # one line per worker and load, not one per bad line
    lines = proxy.logs_matching("ip list has bad lines; they were skipped")
    assert len(lines) == WORKERS
    skipped = lines[0]
    assert skipped["filename"] == str(netset)
    assert skipped["bad_lines"] == 2
    assert skipped["first_bad_line"] == 2
    assert "not-an-address" in skipped["error"]
    assert skipped["level"] == "warn"
    assert _closed_without_reply(proxy.host, proxy.port) < 2.0  # listed after the bad lines
    proxy.wait_for_log("ip was blacklisted", ip="127.0.0.1")
