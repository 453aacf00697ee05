"""End to end: our own fronting connections are told apart from clients by the full 4-tuple.

Linux gives the same ephemeral source port to connections towards different destinations.
When the fronting site lives on an address that clients also come from (a local nginx on
127.0.0.1, clients arriving through a local HAProxy or sslh), a client's (ip, port) often
equals the local end of one of the proxy's open fronting connections. Only an accepted
connection whose both ends mirror one of our fronting dials is our own dial coming back.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Iterator

import pytest
import uvloop

from mtgworkers.config import parse
from mtgworkers.server import build_worker
from tests.support.client import FakeTLSClient, WireError, run_concurrently
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import free_port, make_config

pytestmark = pytest.mark.e2e

HELD_FRONTED = 1000
VALID_CLIENTS = 1500
LOOP_MESSAGE = "fronting host loops back to this proxy; closing the looped connection"


@pytest.fixture
def raised_nofile() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = HELD_FRONTED + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def silent_site() -> Iterator[int]:
    """A fronting 'site' on 127.0.0.1 that completes TCP handshakes and never answers.

    The kernel finishes the connections in the accept queue, so the proxy's fronting dials
    succeed and stay open without a thread or a descriptor per connection here.
    """
    sock = socket.create_server(("127.0.0.1", 0), backlog=HELD_FRONTED + 64)
    yield sock.getsockname()[1]
    sock.close()


def _accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:port."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[4].split(":")[1], 16)  # rx_queue of a listener
    raise AssertionError(f"nothing listens on port {port}")


def _wait_accept_queue(port: int, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (queued := _accept_queue(port)) < count:
        assert time.monotonic() < deadline, f"only {queued} of {count} fronting dials arrived"
        time.sleep(0.05)


def test_clients_sharing_a_port_with_fronting_connections_are_served(
    proxy_factory: ProxyPool, test_secret: KitSecret, raised_nofile: None, silent_site: int
) -> None:
    # One worker sees every fronting connection, which makes collisions most likely.
    proxy = proxy_factory({"supervisor": {"workers": 1}}, fronting_port=silent_site)
    probes = []
    try:
        for _ in range(HELD_FRONTED):
            probe = socket.create_connection(proxy.address, timeout=10)
            probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS: fronted at once
            probes.append(probe)
        _wait_accept_queue(silent_site, HELD_FRONTED)
        mark = proxy.mark()

        def handshake(_: int) -> str:
            try:
                with FakeTLSClient(proxy.host, proxy.port, test_secret.key, test_secret.host) as c:
                    c.handshake()
                    c.send(b"ping")
                    return "ok" if c.recv_exactly(4) == b"ping" else "bad payload"
            except (OSError, WireError) as exc:
                return f"closed: {exc!r}"

        results = run_concurrently(VALID_CLIENTS, handshake, max_workers=8)
        failed = [r for r in results if r != "ok"]
        assert failed == [], f"{len(failed)} of {VALID_CLIENTS} valid clients failed: {failed[:3]}"
        assert proxy.logs_matching(LOOP_MESSAGE, since=mark) == []
        # the probes really were held open through the whole run (they collide or nothing does)
        for probe in probes:
            probe.setblocking(False)
            with pytest.raises(BlockingIOError):
                probe.recv(1)
    finally:
        for probe in probes:
            probe.close()


def test_a_fronting_dial_back_to_the_proxy_is_closed(test_secret: KitSecret) -> None:
    port = free_port("0.0.0.0")
    config = parse(
        make_config(test_secret.hex, bind_port=port, dc_port=None, fronting_port=port)
        | {"bind-to": f"0.0.0.0:{port}"}
    )
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("mtgworkers.proxy")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    loop = uvloop.new_event_loop()

    async def main() -> bytes:
        worker, _ = build_worker(config, loop, metrics_id=0)
        # As when the fronting name resolves to an address added to this host after start:
        # the worker does not know it is its own, so only the accepted-connection check is
        # left to catch the loop.
        worker._is_local = lambda ip: False  # type: ignore[method-assign]
        await worker.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")  # not TLS: fronted to ourselves
            answer = await asyncio.wait_for(reader.read(), 10)  # closed by the loop check
            writer.close()
            return answer
        finally:
            await worker.stop()

    try:
        answer = loop.run_until_complete(main())
    finally:
        loop.close()
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    looped = [r for r in seen if r.getMessage() == LOOP_MESSAGE]
    assert len(looped) == 1, [r.getMessage() for r in seen]
    assert looped[0].levelno == logging.ERROR
    assert answer == b""
