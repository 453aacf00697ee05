"""End to end: a client that stops reading makes the proxy hold back, not buffer.

A client asks for a 64 MiB download and reads nothing. The fake DC's writes must block
once the kernel's socket queues are full and the proxy holds at most its write-buffer
mark plus one read (plus the paced side's queue with pacing): every byte the DC wrote
is either still in a kernel queue (``ss``), in the fake DC's own buffer, or in the
proxy's bounded user-space buffers.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from mtgworkers.protocol.faketls import MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN
from mtgworkers.relay import PACED_PENDING_HIGH, READ_CHUNK, WRITE_BUFFER_HIGH
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.fakedc import FakeDC

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)"),
]

DOWNLOAD = 64 * 1024 * 1024
# The fake DC (asyncio streams) writes 64 KiB chunks and waits while its transport holds
# more than the default 64 KiB high-water mark.
FAKE_DC_BUFFER = 2 * 65536


def _tls_overhead(payload: int) -> int:
    return (payload // MAX_RECORD_PAYLOAD + 2) * RECORD_HEADER_LEN


def _kernel_queued(ports: set[int]) -> int:
    """Bytes in the receive and send queues of the loopback TCP sockets with a local
    port in ``ports`` (both ends of a connection, when both ports are given)."""
    out = subprocess.run(["ss", "-tnH"], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and int(fields[3].rsplit(":", 1)[1]) in ports:
            total += int(fields[1]) + int(fields[2])
    return total


def _wait_stalled(conn_bytes: Callable[[], int], timeout: float = 30.0) -> int:
    """Wait until the DC's byte count stops moving (five polls in a row); return it."""
    deadline = time.monotonic() + timeout
    last, same = -1, 0
    while same < 5:
        assert time.monotonic() < deadline, "the fake DC never stopped writing"
        time.sleep(0.1)
        now = conn_bytes()
        same = same + 1 if now == last and now > 0 else 0
        last = now
    return last


@pytest.mark.parametrize("pacing", [False, True], ids=["unpaced", "paced"])
def test_a_stalled_reader_makes_the_dc_wait(
    proxy_factory: ProxyPool, fake_dc: FakeDC, test_secret: KitSecret, pacing: bool
) -> None:
    proxy = proxy_factory({"defense": {"doppelganger": {"pacing": pacing}}})
    first = len(fake_dc.connections)
    with (
        fake_dc.configured(mode="source", source_size=DOWNLOAD),
        FakeTLSClient(*proxy.address, test_secret.key, test_secret.host) as client,
    ):
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.handshake(dc=2)  # ... and never reads again
        conn = fake_dc.wait_for_connection(first)
        written = _wait_stalled(lambda: conn.bytes_out)
        assert written < DOWNLOAD
        ports = {client.sock.getsockname()[1], proxy.port, conn.peer[1], fake_dc.port}
        kernel = _kernel_queued(ports)
        # what the proxy holds: written - kernel - (0 .. FAKE_DC_BUFFER)
        held = written - kernel - FAKE_DC_BUFFER
        limit = WRITE_BUFFER_HIGH + READ_CHUNK + _tls_overhead(READ_CHUNK)
        if pacing:
            limit += PACED_PENDING_HIGH + MAX_RECORD_PAYLOAD
        assert held <= limit, (
            f"the DC wrote {written} bytes, the kernel queues hold {kernel}: the proxy "
            f"buffers about {held} bytes, more than {limit}"
        )
        assert not conn.closed.is_set()
    proxy.assert_alive()
