"""End to end: a flood of idle connections does not lock real clients out.

When ``concurrency`` is reached, the worker closes its oldest session that has not sent a
valid ClientHello yet and admits the newcomer (mtgworkers/admission.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.support.client import FakeTLSClient
from tests.support.env import ClientFactory, KitSecret, ProxyPool
from tests.support.proxy import ProxyProcess

pytestmark = pytest.mark.e2e

# Eviction picks the oldest session of the worker that accepts: one worker makes the
# order visible. Handshakes may last longer than the suite's 5 s.
ONE_WORKER = {"supervisor": {"workers": 1}, "network": {"timeout": {"handshake": "60s"}}}


def _idle(proxy: ProxyProcess) -> socket.socket:
    """A connection that sends nothing, once the proxy has admitted it."""
    mark = proxy.mark()
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    proxy.wait_for_log("Stream has been started", since=mark)
    return sock


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)


def test_the_oldest_idle_connection_makes_room_for_a_client(
    proxy_factory: ProxyPool, client_factory: ClientFactory
) -> None:
    proxy = proxy_factory({"concurrency": 4, **ONE_WORKER})
    holders = [_idle(proxy) for _ in range(4)]
    try:
        mark = proxy.mark()
        client = client_factory(proxy)
        client.handshake()
        client.send(b"through")
        assert client.recv_exactly(7) == b"through"

        # the oldest holder was closed with a FIN (what a web server does with idle
        # connections it needs the room of), the others are untouched
        holders[0].settimeout(5)
        assert holders[0].recv(1) == b""
        assert [_still_open(sock) for sock in holders[1:]] == [True, True, True]
        proxy.wait_for_log("connection was evicted by the concurrency limit", since=mark)
        warning = proxy.wait_for_log(
            "concurrency limit reached: 0 refused, 1 evicted in the last 10 s", since=mark
        )
        assert warning["level"] == "warn"
        assert (warning["refused"], warning["evicted"]) == (0, 1)
        assert not proxy.logs_matching("connection was concurrency limited", since=mark)

        # the evicted session ended like any other; its place went to the client, so the
        # count is still 4: the next idle connection evicts the second oldest holder
        proxy.wait_for_log("Stream has been finished", since=mark)
        holders.append(_idle(proxy))
        holders[1].settimeout(5)
        assert holders[1].recv(1) == b""
        assert _still_open(holders[2])
        client.send(b"still")
        assert client.recv_exactly(5) == b"still"
        # no second warning within 10 s: the next one will sum up what happened
        assert (
            len(
                proxy.logs_matching(
                    "concurrency limit reached: 0 refused, 1 evicted in the last 10 s"
                )
            )
            == 1
        )
        client.close()
    finally:
        for sock in holders:
            sock.close()


def test_a_client_past_its_hello_is_never_evicted(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = proxy_factory({"concurrency": 2, **ONE_WORKER})
    # one client got its ServerHello and has not sent its obfuscated2 frame yet, one
    # runs a session: both proved they know the secret
    waiting = FakeTLSClient(proxy.host, proxy.port, test_secret.key, test_secret.host)
    waiting.send_client_hello()
    waiting.read_server_hello()
    relaying = FakeTLSClient(proxy.host, proxy.port, test_secret.key, test_secret.host)
    relaying.handshake()
    try:
        mark = proxy.mark()
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as extra:
            try:
                assert extra.recv(1) == b""  # refused: nobody may be evicted
            except ConnectionResetError:
                pass
        proxy.wait_for_log("connection was concurrency limited", since=mark)
        warning = proxy.wait_for_log(
            "concurrency limit reached: 1 refused, 0 evicted in the last 10 s", since=mark
        )
        assert warning["level"] == "warn"
        assert not proxy.logs_matching("connection was evicted by the concurrency limit")

        waiting.send_obfs2_frame()
        for client in (waiting, relaying):
            client.send(b"alive")
            assert client.recv_exactly(5) == b"alive"
    finally:
        waiting.close()
        relaying.close()


@contextlib.contextmanager
def _idle_flood(proxy: ProxyProcess, holders: int) -> Iterator[list[int]]:
    """``holders`` connections that send nothing, each opened again as soon as the proxy
    closes it. Yields a one-item list with the number of re-openings so far."""
    reopened = [0]
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
                    sock.settimeout(0.5)
                    while not stop.is_set():
                        try:
                            if sock.recv(1) == b"":
                                break
                        except TimeoutError:
                            continue
            except OSError:
                pass
            reopened[0] += 1

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(holders)]
    for thread in threads:
        thread.start()
    try:
        yield reopened
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_clients_get_through_an_idle_flood(
    proxy_factory: ProxyPool, client_factory: ClientFactory
) -> None:
    limit = 20
    # two workers: each evicts its own idle sessions, the limit is global
    proxy = proxy_factory({"concurrency": limit, "supervisor": {"workers": 2}})
    with _idle_flood(proxy, holders=limit + limit // 5) as reopened:  # as bench idle_flood
        # the flood fills every place and keeps knocking
        proxy.wait_for_log("Stream has been started", count=limit)
        proxy.wait_for_log("connection was evicted by the concurrency limit", count=limit)
        for round_ in range(5):
            # a client can still lose the race when the limit's worth of newer connections
            # arrives before its hello is read (a machine shared with other work): like a
            # Telegram client, it connects again
            for attempt in range(3):
                client = client_factory(proxy)
                try:
                    client.handshake()
                    message = f"client {round_}".encode()
                    client.send(message)
                    assert client.recv_exactly(len(message)) == message
                    break
                except (ConnectionError, OSError):
                    assert attempt < 2, "a client was evicted three times in a row"
                finally:
                    client.close()
        assert reopened[0] >= limit
    proxy.assert_alive()
