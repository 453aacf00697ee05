"""End to end: dynamic record sizing ([defense.doppelganger] drs), mtg's record sizes."""

from __future__ import annotations

import os

import pytest

from tests.support.env import ClientFactory, ProxyPool
from tests.support.wire import recv_exactly

pytestmark = pytest.mark.e2e


def _record_sizes(client, total: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Read raw application-data records until ``total`` payload bytes came back."""
    sizes: list[int] = []
    got = 0
    while got < total:
        header = recv_exactly(client.sock, 5)
        length = int.from_bytes(header[3:5], "big")
        recv_exactly(client.sock, length)
        if header[0] == 0x17:
            sizes.append(length)
            got += length
    return sizes


@pytest.mark.parametrize("drs", [True, False])
def test_records_to_the_client_start_small_with_drs(
    proxy_factory: ProxyPool, client_factory: ClientFactory, drs: bool
) -> None:
    proxy = proxy_factory({"defense": {"doppelganger": {"drs": drs}}})
    client = client_factory(proxy)
    client.handshake()
    total = 300_000  # enough for 40 small + 20 medium records and more
    client.send(os.urandom(total))
    sizes = _record_sizes(client, total)
    assert sum(sizes) == total
    assert max(sizes) <= 16379
    if drs:
        # A record carries at most the phase's size; the last one of a chunk may be shorter.
        assert all(n <= 1450 for n in sizes[:40]), sizes[:40]
        assert sum(n >= 1351 for n in sizes[:40]) >= 30, sizes[:40]
        assert all(n <= 4096 for n in sizes[40:60]), sizes[40:60]
        assert sum(n >= 3997 for n in sizes[40:60]) >= 10, sizes[40:60]
        assert max(sizes[60:]) > 4096, sizes[60:]
    else:
        assert max(sizes[:40]) > 1450, sizes[:40]
