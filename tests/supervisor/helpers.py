"""Helpers for the supervisor tests: worker processes, which worker holds a connection,
echo streams that check every byte, a handshake hammer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from tests.support.client import FakeTLSClient
from tests.support.env import ProxyPool
from tests.support.proxy import ProxyProcess


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def start_proxy(
    proxy_factory: ProxyPool, workers: int = 2, overrides: dict[str, Any] | None = None
) -> ProxyProcess:
    """A proxy with ``workers`` workers, returned once every worker is ready."""
    settings: dict[str, Any] = {"supervisor": {"workers": workers}}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    proxy = proxy_factory(settings)
    proxy.wait_for_log("proxy is listening", timeout=10)
    return proxy


def signal_proxy(proxy: ProxyProcess, signum: int) -> None:
    os.kill(proxy.pid, signum)


def worker_pids(proxy: ProxyProcess) -> set[int]:
    """PIDs of the supervisor's live worker processes (not the metrics exporter)."""
    try:
        children = psutil.Process(proxy.pid).children()
    except psutil.NoSuchProcess:
        return set()
    pids = set()
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "supervisor.exporter" not in " ".join(
                child.cmdline()
            ):
                pids.add(child.pid)
    return pids


def ready_workers(proxy: ProxyProcess, since: int = 0) -> dict[int, int]:
    """pid -> slot for every "worker is ready" log record (from index ``since``)."""
    return {r["pid"]: r["slot"] for r in proxy.logs_matching("worker is ready", since=since)}


def _server_side_inode(server: tuple[str, int], client: tuple[str, int]) -> int | None:
    """Inode of the accepted socket of the connection ``client`` -> ``server``.

    One sock_diag netlink query for the exact 4-tuple: /proc/net/tcp (what psutil reads)
    can hold tens of thousands of lines on a busy test machine.
    """
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET

    def address(ip: str) -> bytes:
        return socket.inet_pton(family, ip).ljust(16, b"\0")

    # struct inet_diag_req_v2 with its inet_diag_sockid (ports and addresses big-endian)
    sockid = (
        struct.pack("!HH", server[1], client[1])
        + address(server[0])
        + address(client[0])
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as netlink:
        netlink.sendto(header + request, (0, 0))
        reply = netlink.recv(65536)
    if struct.unpack_from("=H", reply, 4)[0] != _SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (yet)
    # nlmsghdr (16) + inet_diag_msg: 4 bytes, sockid (48), expires/rqueue/wqueue/uid, inode
    return int(struct.unpack_from("=I", reply, 16 + 4 + 48 + 16)[0])


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20


def owner_of(proxy: ProxyProcess, client: FakeTLSClient, timeout: float = 3.0) -> int:
    """PID of the worker process that accepted ``client``'s connection."""
    local = client.sock.getsockname()
    server = client.sock.getpeername()

    def find() -> int | None:
        inode = _server_side_inode((server[0], server[1]), (local[0], local[1]))
        if inode is None:
            return None
        target = f"socket:[{inode}]"
        for pid in worker_pids(proxy):
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                            return pid
        return None

    return int(wait_until(find, timeout, f"the worker holding client port {local[1]}"))


def open_client(proxy: ProxyProcess, key: bytes, sni: str, **options: Any) -> FakeTLSClient:
    """A client that finished the handshake and one echo round trip."""
    client = FakeTLSClient(proxy.host, proxy.port, key, sni, **options)
    try:
        client.handshake()
        client.send(b"hello")
        assert client.recv_exactly(5) == b"hello"
    except BaseException:
        client.close()
        raise
    return client


class EchoStream(threading.Thread):
    """Sends random chunks through a connected client and checks the echoed bytes."""

    def __init__(self, client: FakeTLSClient, chunk: int = 32 * 1024) -> None:
        super().__init__(daemon=True, name="echo-stream")
        self.client = client
        self.chunk = chunk
        self.stop_event = threading.Event()
        self.bytes = 0
        self.error: str | None = None
        self.progress = threading.Condition()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                payload = os.urandom(self.chunk)
                self.client.send(payload)
                echoed = self.client.recv_exactly(len(payload))
                if echoed != payload:
                    self.error = f"echo mismatch after {self.bytes} bytes"
                    return
                with self.progress:
                    self.bytes += len(payload)
                    self.progress.notify_all()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc} after {self.bytes} bytes"

    def wait_bytes(self, target: int, timeout: float) -> None:
        """Wait until ``target`` bytes went through (AssertionError with the error)."""
        deadline = time.monotonic() + timeout
        with self.progress:
            while self.bytes < target:
                assert self.error is None, self.error
                assert self.is_alive(), f"stream ended after {self.bytes} bytes"
                left = deadline - time.monotonic()
                assert left > 0, f"only {self.bytes} of {target} bytes within {timeout} s"
                self.progress.wait(min(left, 0.1))

    def finish(self) -> int:
        """Stop, join and return the bytes echoed (AssertionError on any error)."""
        self.stop_event.set()
        self.join(10)
        assert not self.is_alive(), "echo stream did not stop"
        assert self.error is None, self.error
        return self.bytes


class HandshakeHammer(threading.Thread):
    """Full handshakes + a small echo, one after the other, counting failures."""

    def __init__(self, proxy: ProxyProcess, key: bytes, sni: str) -> None:
        super().__init__(daemon=True, name="handshake-hammer")
        self.proxy = proxy
        self.key = key
        self.sni = sni
        self.stop_event = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            step = "connect"
            try:
                with FakeTLSClient(
                    self.proxy.host, self.proxy.port, self.key, self.sni, timeout=5
                ) as client:
                    step = "handshake"
                    client.handshake()
                    step = "echo"
                    payload = os.urandom(64)
                    client.send(payload)
                    if client.recv_exactly(64) != payload:
                        raise AssertionError("echo mismatch")
                self.ok += 1
            except Exception as exc:
                self.failures.append(f"{step}: {type(exc).__name__}: {exc} at {time.time():.3f}")

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)


def total_handshakes(hammers: list[HandshakeHammer]) -> int:
    return sum(hammer.ok for hammer in hammers)


def kill_quietly(pid: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
