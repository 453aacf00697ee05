"""End to end: the kernel's view of the proxy's listening sockets in a real scrape.

A worker stopped with SIGSTOP accepts nothing, so connections pile up in its slot's
accept queue: the scrape shows that slot's queue (and only that slot's) filling, and
once the queue is full the kernel drops new connection attempts, which moves
``TcpExtListenOverflows`` / ``ListenDrops`` in the same scrape.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import socket
from collections.abc import Iterator

import pytest

from mtgworkers.server import LISTEN_BACKLOG
from tests.stats.helpers import Series, scrape_series, value, wait_until
from tests.support.env import ProxyPool
from tests.support.proxy import ProxyProcess, free_port

pytestmark = pytest.mark.e2e


def _proxy(proxy_factory: ProxyPool, workers: int) -> tuple[ProxyProcess, int]:
    port = free_port()
    proxy = proxy_factory(
        {
            "debug": False,  # thousands of clients that send nothing: no line for each
            "concurrency": 16384,
            "supervisor": {"workers": workers, "worker-timeout": "60s"},
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{port}"}},
        }
    )
    wait_until(
        lambda: value(scrape_series(port), "mtg_workers", state="ready") == workers,
        10,
        f"{workers} ready workers",
    )
    return proxy, port


def _worker_of_slot(series: Series, slot: int) -> int:
    for labels in series["mtg_worker_sessions"]:
        fields = dict(labels)
        if fields["slot"] == str(slot):
            return int(fields["pid"])
    raise AssertionError(f"no worker of slot {slot} in {series['mtg_worker_sessions']}")


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def _connections() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _connect(sockets: list[socket.socket], address: tuple[str, int], count: int) -> None:
    """Start ``count`` non-blocking connects (the kernel completes them or drops their
    SYNs; nothing here waits)."""
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(address)
        assert code in (0, errno.EINPROGRESS), os.strerror(code)
        sockets.append(sock)


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as stream:
        return int(stream.read())


def test_each_slot_reports_its_own_accept_queue(proxy_factory: ProxyPool) -> None:
    proxy, port = _proxy(proxy_factory, workers=2)
    series = scrape_series(port)
    backlog = min(LISTEN_BACKLOG, _somaxconn())
    for slot in ("0", "1"):
        assert value(series, "mtg_listen_queue_backlog", slot=slot) == backlog
        assert value(series, "mtg_listen_queue_length", slot=slot) == 0
    stopped = _worker_of_slot(series, 1)
    count = 64
    with _stopped(stopped), _connections() as sockets:
        _connect(sockets, proxy.address, count)
        # The kernel spreads the connections over both slots' sockets: the running
        # worker of slot 0 accepts its share (sessions waiting for a hello), the rest
        # waits in slot 1's queue.
        series = wait_until(
            lambda: (
                (s := scrape_series(port))
                and value(s, "mtg_listen_queue_length", slot="0") == 0
                and value(s, "mtg_listen_queue_length", slot="1")
                + value(s, "mtg_worker_sessions", slot="0", pid=str(_worker_of_slot(s, 0)))
                == count
                and s
            ),
            8,
            f"{count} connections split between slot 0's sessions and slot 1's queue",
        )
        assert value(series, "mtg_listen_queue_length", slot="1") > 0
    proxy.assert_alive()


def test_a_full_accept_queue_moves_the_listen_drop_counters(proxy_factory: ProxyPool) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = LISTEN_BACKLOG + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"filling a {LISTEN_BACKLOG}-connection queue needs {needed} descriptors")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        proxy, port = _proxy(proxy_factory, workers=1)
        before = scrape_series(port)
        backlog = int(value(before, "mtg_listen_queue_backlog", slot="0"))
        assert backlog == min(LISTEN_BACKLOG, _somaxconn())
        extra = 40
        with _stopped(_worker_of_slot(before, 0)), _connections() as sockets:
            # The kernel holds one connection more than the backlog before it drops.
            _connect(sockets, proxy.address, backlog + 1 + extra)

            def moved() -> Series | None:
                s = scrape_series(port)
                overflows = value(s, "mtg_kernel_tcp_listen_overflows_total") - value(
                    before, "mtg_kernel_tcp_listen_overflows_total"
                )
                drops = value(s, "mtg_kernel_tcp_listen_drops_total") - value(
                    before, "mtg_kernel_tcp_listen_drops_total"
                )
                full = value(s, "mtg_listen_queue_length", slot="0") == backlog + 1
                return s if full and overflows >= extra and drops >= extra else None

            series = wait_until(moved, 10, "a full queue and the dropped connections counted")
            assert value(series, "mtg_kernel_tcp_passive_opens_total") >= value(
                before, "mtg_kernel_tcp_passive_opens_total"
            ) + min(backlog, 1000)
        # Resumed, the worker empties its queue.
        wait_until(
            lambda: value(scrape_series(port), "mtg_listen_queue_length", slot="0") == 0,
            15,
            "the resumed worker to accept its queue",
        )
        proxy.assert_alive()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
