"""End to end: admission (concurrency, PROXY protocol), fronting self-loop, open-files
limit, SOCKS5 upstream, simple-run and the start-up link."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.client import FakeTLSClient
from tests.support.env import ClientFactory, KitSecret, ProxyPool
from tests.support.fakedc import FakeDC
from tests.support.proxy import REPO_ROOT, free_port
from tests.support.website import HOSTNAME, Website

pytestmark = pytest.mark.e2e

PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def test_concurrency_limit_closes_the_extra_client_at_once(
    proxy_factory: ProxyPool, client_factory: ClientFactory
) -> None:
    proxy = proxy_factory({"concurrency": 1})
    first = client_factory(proxy)
    first.handshake()
    first.send(b"ping")
    assert first.recv_exactly(4) == b"ping"

    mark = proxy.mark()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as extra:
        started = time.monotonic()
        try:
            assert extra.recv(1) == b""  # closed without a byte
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 2.0
    proxy.wait_for_log("connection was concurrency limited", since=mark)

    # the running session is untouched, and a slot frees up when it ends
    first.send(b"still here")
    assert first.recv_exactly(10) == b"still here"
    first.close()
    proxy.wait_for_log("Stream has been finished", since=mark)
    second = client_factory(proxy)
    second.handshake()
    second.send(b"next")
    assert second.recv_exactly(4) == b"next"


def _pp2_source(data: bytes) -> tuple[str, int]:
    assert data.startswith(PP2_SIGNATURE), data[:16].hex()
    assert data[12] == 0x21  # version 2, PROXY
    family, length = data[13], int.from_bytes(data[14:16], "big")
    body = data[16 : 16 + length]
    if family == 0x11:
        return str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big")
    assert family == 0x21
    return str(ipaddress.IPv6Address(body[0:16])), int.from_bytes(body[32:34], "big")


def test_proxy_protocol_from_the_balancer_to_the_fronting_website(
    proxy_factory: ProxyPool, client_factory: ClientFactory, website: Website
) -> None:
    proxy = proxy_factory(
        {"proxy-protocol-listener": True, "domain-fronting": {"proxy-protocol": True}}
    )
    garbage = b"\x16\x03\x01\x00\x05hello"  # a TLS record that is no ClientHello
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40123 443\r\n"
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(header + garbage)
        conn = website.wait_for_bytes(0, 28 + len(garbage))
    data = bytes(conn.received)
    # the website learns the client's address from the balancer's header, then gets the
    # client's bytes unchanged (the balancer's own header is not replayed)
    assert _pp2_source(data) == ("203.0.113.7", 40123)
    assert data[28:] == garbage

    # a valid client behind the balancer still reaches Telegram
    client = client_factory(proxy)
    client.send_raw(b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 443\r\n")
    client.handshake()
    client.send(b"through the balancer")
    assert client.recv_exactly(20) == b"through the balancer"
    proxy.wait_for_log("Stream has been started", **{"client-ip": "198.51.100.9"})


def test_fronting_to_itself_is_refused_at_start(proxy_factory: ProxyPool) -> None:
    proxy = proxy_factory(start=False)
    proxy.config["domain-fronting"] = {"ip": "127.0.0.1", "port": proxy.port}
    with pytest.raises(RuntimeError) as failed:
        proxy.start(timeout=10)
    assert "would loop" in str(failed.value)
    assert f"127.0.0.1:{proxy.port}" in str(failed.value)
    assert proxy.proc is not None and proxy.proc.returncode == 1
    proxy_factory.started.remove(proxy)  # it never ran: nothing to stop at teardown


def test_low_open_files_limit_is_reported(tmp_path, test_secret: KitSecret) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "c.toml"
    port = free_port()
    config.write_text(
        f'secret = "{test_secret.hex}"\nbind-to = "127.0.0.1:{port}"\n'
        'public-ipv4 = "127.0.0.1"\nconcurrency = 4096\n'
        '[network]\ndns = "udp://127.0.0.1:9"\n'
        f'[domain-fronting]\nip = "127.0.0.1"\nport = {free_port()}\n'
    )

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen(
        [sys.executable, "-m", "mtgworkers", "run", str(config)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=low_limit,
    )
    try:
        assert proc.stdout is not None
        lines = _read_lines_until(proc, b"proxy is listening", 15)
        warning = [line for line in lines if b"open files limit is too low" in line]
        assert warning, b"\n".join(lines)
        assert b'"nofile_limit": 256' in warning[0] or b'"nofile_limit":256' in warning[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def _read_lines_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> list[bytes]:
    assert proc.stdout is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines.extend(done)
            if any(needle in line for line in done):
                return lines
    raise AssertionError(f"{needle!r} not seen in {timeout} s:\n" + b"\n".join(lines).decode())


class _Socks5Server:
    """A minimal SOCKS5 server (no auth) on 127.0.0.1 that records CONNECT targets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.targets: list[tuple[str, int]] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            greeting = conn.recv(2)
            conn.recv(greeting[1])
            conn.sendall(b"\x05\x00")
            head = conn.recv(4)
            assert head[3] == 1, head
            ip = socket.inet_ntoa(conn.recv(4))
            port = struct.unpack(">H", conn.recv(2))[0]
            self.targets.append((ip, port))
            upstream = socket.create_connection((ip, port))
            conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")
            with upstream:
                pipes = [
                    threading.Thread(target=_pipe, args=(conn, upstream), daemon=True),
                    threading.Thread(target=_pipe, args=(upstream, conn), daemon=True),
                ]
                for pipe in pipes:
                    pipe.start()
                for pipe in pipes:
                    pipe.join(30)

    def close(self) -> None:
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def socks5() -> Iterator[_Socks5Server]:
    server = _Socks5Server()
    yield server
    server.close()


def test_telegram_connections_go_through_the_socks5_proxy(
    proxy_factory: ProxyPool,
    client_factory: ClientFactory,
    socks5: _Socks5Server,
    fake_dc: FakeDC,
) -> None:
    proxy = proxy_factory({"network": {"proxies": [f"socks5://127.0.0.1:{socks5.port}"]}})
    client = client_factory(proxy)
    client.handshake(dc=4)
    payload = os.urandom(100_000)
    client.send(payload)
    assert client.recv_exactly(len(payload)) == payload
    assert socks5.targets == [("127.0.0.1", fake_dc.port)]
    assert fake_dc.wait_for_connection(0).dc == 4


def test_simple_run_serves_clients_and_logs_the_link(
    test_secret: KitSecret, fake_dc: FakeDC, website: Website
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtgworkers",
            "simple-run",
            "--debug",
            "--doh-ip",  # name look-ups stay on loopback (refused at once)
            "127.0.0.1",
            "--domain-fronting-ip",
            "127.0.0.1",
            "-p",
            str(website.port),
            "--dc-override",
            f"2=127.0.0.1:{fake_dc.port}",
            f"127.0.0.1:{port}",
            test_secret.hex,
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        lines = _read_lines_until(proc, b"proxy is listening", 15)
        with FakeTLSClient("127.0.0.1", port, test_secret.key, HOSTNAME) as client:
            # DC 7 is unknown: simple-run always falls back to DC 2
            client.handshake(dc=7)
            client.send(b"simple")
            assert client.recv_exactly(6) == b"simple"
        assert fake_dc.wait_for_connection(0).dc == 2
        lines += _read_lines_until(proc, b"unknown DC, fallbacks", 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    links = [line for line in lines if b"proxy link" in line]
    assert links and b"server=127.0.0.1" in links[0], b"\n".join(lines)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss from iproute2")
def test_client_sockets_get_keepalive(
    proxy_factory: ProxyPool, client_factory: ClientFactory
) -> None:
    proxy = proxy_factory()
    client = client_factory(proxy)
    client.handshake()
    client.send(b"x")
    assert client.recv_exactly(1) == b"x"
    client_port = client.sock.getsockname()[1]
    # The proxy's end of this connection (local port = proxy port, peer port = ours) shows
    # a keepalive timer once no retransmission timer is pending.
    deadline = time.monotonic() + 5
    line = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ss", "-tnoH", "state", "established", f"( sport = :{proxy.port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(line for line in out.splitlines() if f":{client_port}" in line)
        if "timer:(keepalive" in line:
            break
        time.sleep(0.05)
    assert "timer:(keepalive" in line, line
