"""State shared by all workers: the replay cache (also across reloads) and the global
concurrency limit."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.supervisor.helpers import (
    open_client,
    owner_of,
    ready_workers,
    signal_proxy,
    start_proxy,
    wait_until,
    worker_pids,
)
from tests.support.client import FakeTLSClient
from tests.support.env import KitSecret, ProxyPool
from tests.support.proxy import ProxyProcess
from tests.support.website import Website

pytestmark = pytest.mark.e2e


def _client_on_other_worker(
    proxy: ProxyProcess, secret: KitSecret, avoid: int, attempts: int = 60
) -> tuple[FakeTLSClient, int]:
    """A connected (silent) client whose connection another worker than ``avoid`` holds.

    The kernel hashes each connection's 4-tuple: new source ports reach new workers.
    """
    for _ in range(attempts):
        client = FakeTLSClient(proxy.host, proxy.port, secret.key, secret.host)
        owner = owner_of(proxy, client)
        if owner != avoid:
            return client, owner
        client.close()
    raise AssertionError(f"{attempts} connections all landed on worker {avoid}")


def _replay_to_another_worker(
    proxy: ProxyProcess, secret: KitSecret, website: Website, hello: bytes, avoid: int
) -> int:
    """Send ``hello`` on a connection held by another worker; assert it is caught."""
    client, owner = _client_on_other_worker(proxy, secret, avoid)
    slot = ready_workers(proxy)[owner]
    mark = proxy.mark()
    with client:
        client.send_raw(hello)
        proxy.wait_for_log("replay attack has been detected!", since=mark, worker=slot)
        # ... and the replayed bytes went to the fronting website, as mtg does
        wait_until(
            lambda: any(bytes(c.received).startswith(hello) for c in website.connections),
            5,
            "the replayed hello at the website",
        )
    return owner


def test_hello_replayed_to_another_worker_is_caught_also_after_a_reload(
    proxy_factory: ProxyPool, test_secret: KitSecret, website: Website
) -> None:
    proxy = start_proxy(
        proxy_factory,
        workers=2,
        overrides={
            "defense": {"anti-replay": {"enabled": True}},
            "tolerate-time-skewness": "1m",
        },
    )
    original = open_client(proxy, test_secret.key, test_secret.host)
    first_owner = owner_of(proxy, original)
    hello = original.hello
    assert hello is not None
    original.close()
    assert not proxy.logs_matching("replay attack has been detected!")

    other = _replay_to_another_worker(proxy, test_secret, website, hello, avoid=first_owner)
    assert other != first_owner

    # The cache lives in the supervisor's shared memory: a new generation still knows it.
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=mark)
    wait_until(lambda: not worker_pids(proxy) & {first_owner, other}, 5, "old workers gone")
    new_owner = _replay_to_another_worker(proxy, test_secret, website, hello, avoid=0)
    assert new_owner not in (first_owner, other)
    # a fresh hello is no replay, on any worker
    open_client(proxy, test_secret.key, test_secret.host).close()


def _refused_at_once(proxy: ProxyProcess) -> None:
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as extra:
        started = time.monotonic()
        try:
            assert extra.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 2.0


def test_concurrency_limit_is_global_across_workers(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    limit = 3
    proxy = start_proxy(proxy_factory, workers=2, overrides={"concurrency": limit})
    pids = worker_pids(proxy)
    clients: list[FakeTLSClient] = []
    owners: list[int] = []
    try:
        # K sessions spread over both workers (re-draw the last one if they all share one)
        for _ in range(30):
            while len(clients) < limit:
                client = open_client(proxy, test_secret.key, test_secret.host)
                clients.append(client)
                owners.append(owner_of(proxy, client))
            if len(set(owners)) == 2:
                break
            finished = len(proxy.logs_matching("Stream has been finished"))
            clients.pop().close()
            owners.pop()
            proxy.wait_for_log("Stream has been finished", count=finished + 1)
        assert set(owners) == pids, owners

        # The (K+1)th client is closed at once, whichever worker the kernel gives it to.
        refused_by: set[int] = set()
        mark = proxy.mark()
        for attempt in range(40):
            _refused_at_once(proxy)
            record = proxy.wait_for_log(
                "connection was concurrency limited", since=mark, count=attempt + 1
            )
            refused_by.add(record["worker"])
            if len(refused_by) == 2:
                break
        assert refused_by == {0, 1}
        assert not proxy.logs_matching("Stream has been started", since=mark)

        # the admitted sessions are untouched; one ending frees a place for the next client
        for client in clients:
            client.send(b"ok")
            assert client.recv_exactly(2) == b"ok"
        finished = len(proxy.logs_matching("Stream has been finished"))
        clients.pop().close()
        proxy.wait_for_log("Stream has been finished", count=finished + 1)
        clients.append(open_client(proxy, test_secret.key, test_secret.host))
    finally:
        for client in clients:
            client.close()
