"""Dialer with real loopback sockets: direct, through local SOCKS5 servers, failures (uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop

from mtgworkers.config import KeepAlive, Network, ProxyURL, Timeouts
from mtgworkers.net import dial as mdial
from mtgworkers.net.dial import Dialer, DialError
from mtgworkers.net.dns import ResolveError, Resolver

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    """Run one test coroutine on a fresh uvloop event loop, bounded in time."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _cancel_leftovers() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeResolver(Resolver):
    """Names from a table (IP literals pass through untouched); anything else NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.table = table or {}
        self.asked: list[str] = []

    async def _query(self, host: str) -> tuple[list[str], float]:
        self.asked.append(host)
        if host not in self.table:
            raise ResolveError(f"cannot resolve {host}: NXDOMAIN")
        return self.table[host], 0


def network(
    *proxies: ProxyURL, tcp: float | None = 2.0, keep_alive: KeepAlive | None = None
) -> Network:
    return Network(
        dns=None,
        proxies=tuple(proxies),
        timeout=Timeouts(tcp=tcp, http=None, idle=300.0, handshake=10.0),
        keep_alive=keep_alive or KeepAlive(disabled=False, idle=15.0, interval=15.0, count=9),
    )


def socks(
    port: int, host: str = "127.0.0.1", user: str | None = None, pw: str | None = None
) -> ProxyURL:
    return ProxyURL(scheme="socks5", host=host, port=port, username=user, password=pw)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port whose kernel completes handshakes but nobody ever reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@dataclass
class SocksServer:
    """A small SOCKS5 server: no auth or user/pass, CONNECT only, scripted refusals."""

    credentials: tuple[str, str] | None = None
    reply: int = 0  # non-zero: refuse CONNECT with this code
    names: dict[str, str] = field(default_factory=dict)  # domain -> IP for CONNECT
    requests: list[tuple[int, str, int]] = field(default_factory=list)  # (atyp, host, port)
    auths: list[tuple[str, str]] = field(default_factory=list)
    greetings: list[bytes] = field(default_factory=list)
    port: int = 0
    finished: asyncio.Queue[None] = field(default_factory=asyncio.Queue)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._exchange(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self.finished.put_nowait(None)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        self.greetings.append(bytes((version, count)) + methods)
        if self.credentials is not None:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x02")
            _, ulen = await reader.readexactly(2)
            user = (await reader.readexactly(ulen)).decode()
            plen = (await reader.readexactly(1))[0]
            password = (await reader.readexactly(plen)).decode()
            self.auths.append((user, password))
            if (user, password) != self.credentials:
                writer.write(b"\x01\x01")
                return
            writer.write(b"\x01\x00")
        else:
            writer.write(b"\x05\x00")
        _, cmd, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        port = int.from_bytes(await reader.readexactly(2), "big")
        self.requests.append((atyp, host, port))
        if self.reply or cmd != 1:
            writer.write(bytes((5, self.reply or 7, 0, 1)) + bytes(6))
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.names.get(host, host), port)
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))
            return
        bound = up_writer.get_extra_info("sockname")
        writer.write(b"\x05\x00\x00\x01" + socket.inet_aton(bound[0]) + bound[1].to_bytes(2, "big"))
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def socks_server(behaviour: SocksServer) -> AsyncIterator[SocksServer]:
    server = await asyncio.start_server(behaviour.handle, "127.0.0.1", 0)
    behaviour.port = server.sockets[0].getsockname()[1]
    try:
        yield behaviour
    finally:
        server.close()


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.got = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got.set()


async def ping(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    """Use the dialled socket the way the proxy does and read the echo back."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_Client, sock=sock)
    try:
        transport.write(payload)
        while len(client.data) < len(payload):
            client.got.clear()
            await client.got.wait()
        return bytes(client.data)
    finally:
        transport.close()


def dial(cfg: Network, host: str, port: int) -> Awaitable[socket.socket]:
    return Dialer(cfg, FakeResolver()).open_socket(host, port)


# --- direct ---------------------------------------------------------------------------


def test_direct_dial_gives_a_ready_socket_with_options() -> None:
    async def main() -> None:
        async with echo_server() as port:
            sock = await Dialer(network(), FakeResolver()).open_socket("127.0.0.1", port)
            assert sock.getpeername() == ("127.0.0.1", port)
            assert sock.getblocking() is False
            assert sock.type == socket.SOCK_STREAM
            opt = sock.getsockopt
            assert opt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert opt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
            assert opt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
            assert opt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9
            assert opt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 150_000
            assert await ping(sock) == b"ping"

    run(main())


def test_keep_alive_settings_and_disabled() -> None:
    async def main() -> None:
        async with echo_server() as port:
            custom = network(keep_alive=KeepAlive(disabled=False, idle=30.0, interval=2.5, count=4))
            sock = await Dialer(custom, FakeResolver()).open_socket("127.0.0.1", port)
            with sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3  # rounded up
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 40_000
            off = network(keep_alive=KeepAlive(disabled=True, idle=15.0, interval=15.0, count=9))
            sock = await Dialer(off, FakeResolver()).open_socket("127.0.0.1", port)
            with sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
                # mtg sets the user timeout even with keep-alive off.
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 150_000
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1

    run(main())


def test_zero_keep_alive_values_mean_go_defaults() -> None:
    async def main() -> None:
        async with echo_server() as port:
            zero = network(keep_alive=KeepAlive(disabled=False, idle=0.0, interval=0.0, count=0))
            with await Dialer(zero, FakeResolver()).open_socket("127.0.0.1", port) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 150_000

    run(main())


def test_refused_port_gives_dial_error_and_leaks_nothing() -> None:
    async def main() -> None:
        with closed_port() as port:
            before = open_fds()
            with pytest.raises(DialError) as info:
                await Dialer(network(), FakeResolver()).open_socket("127.0.0.1", port)
            assert open_fds() == before
            assert str(info.value) == f"cannot dial to 127.0.0.1:{port}: connection refused"
            assert isinstance(info.value, OSError)

    run(main())


def test_host_name_addresses_are_tried_in_turn() -> None:
    resolver = FakeResolver({"svc.test": ["127.0.0.2", "127.0.0.1"]})

    async def main() -> None:
        async with echo_server() as port:  # listens on 127.0.0.1 only: .2 refuses
            sock = await Dialer(network(), resolver).open_socket("svc.test", port)
            assert sock.getpeername() == ("127.0.0.1", port)
            assert await ping(sock) == b"ping"

    run(main())
    assert resolver.asked == ["svc.test"]


def test_all_addresses_failing_are_all_reported() -> None:
    async def main() -> None:
        with closed_port() as port:
            resolver = FakeResolver({"svc.test": ["127.0.0.1", "::1"]})
            before = open_fds()
            with pytest.raises(DialError) as info:
                await Dialer(network(), resolver).open_socket("svc.test", port)
            assert open_fds() == before
            text = str(info.value)
            assert text.startswith("cannot dial to any address: ")
            assert f"cannot dial to 127.0.0.1:{port} (svc.test): connection refused; " in text
            assert f"cannot dial to [::1]:{port} (svc.test): " in text

    run(main())


def test_unresolvable_host() -> None:
    async def main() -> None:
        with pytest.raises(DialError) as info:
            await Dialer(network(), FakeResolver()).open_socket("nx.test", 443)
        assert str(info.value) == "cannot dial to nx.test:443: cannot resolve nx.test: NXDOMAIN"

    run(main())


def test_connect_timeout_on_a_full_backlog() -> None:
    """A listener whose accept queue is full drops SYNs: connect hangs until our bound."""

    async def main() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            fillers = []
            try:
                for _ in range(4):  # more than the queue holds
                    filler = socket.socket()
                    filler.setblocking(False)
                    filler.connect_ex(("127.0.0.1", port))
                    fillers.append(filler)
                before = open_fds()
                started = time.monotonic()
                with pytest.raises(DialError) as info:
                    await Dialer(network(tcp=0.3), FakeResolver()).open_socket("127.0.0.1", port)
                assert time.monotonic() - started < 2
                assert open_fds() == before
                assert str(info.value) == f"cannot dial to 127.0.0.1:{port}: timeout after 0.3s"
            finally:
                for filler in fillers:
                    filler.close()

    run(main())


def test_cancelled_dial_closes_its_socket() -> None:
    async def main() -> None:
        greeted = asyncio.Event()
        finished = asyncio.Event()

        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(3)
            greeted.set()
            await reader.read()  # until the dialer's socket is closed
            writer.close()
            await writer.wait_closed()
            finished.set()

        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            before = open_fds()
            cfg = network(socks(port), tcp=None)
            task = asyncio.ensure_future(Dialer(cfg, FakeResolver()).open_socket("1.2.3.4", 443))
            await greeted.wait()  # the dial is in the middle of the SOCKS5 exchange
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await finished.wait()  # the server saw our socket close
            assert open_fds() == before
        finally:
            server.close()

    run(main())


# --- through SOCKS5 -------------------------------------------------------------------


def test_socks5_no_auth_to_ip_target() -> None:
    resolver = FakeResolver()

    async def main() -> None:
        async with echo_server() as target, socks_server(SocksServer()) as proxy:
            dialer = Dialer(network(socks(proxy.port)), resolver)
            sock = await dialer.open_socket("127.0.0.1", target)
            assert sock.getpeername() == ("127.0.0.1", proxy.port)
            assert sock.getblocking() is False
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert await ping(sock, b"hello through socks") == b"hello through socks"
            assert proxy.greetings == [b"\x05\x01\x00"]
            assert proxy.requests == [(1, "127.0.0.1", target)]

    run(main())
    assert resolver.asked == []


def test_socks5_domain_target_is_not_resolved_locally() -> None:
    resolver = FakeResolver({"socks.test": ["127.0.0.1"]})

    async def main() -> None:
        behaviour = SocksServer(names={"echo.test": "127.0.0.1"})
        async with echo_server() as target, socks_server(behaviour) as proxy:
            dialer = Dialer(network(socks(proxy.port, host="socks.test")), resolver)
            sock = await dialer.open_socket("echo.test", target)
            assert await ping(sock) == b"ping"
            assert proxy.requests == [(3, "echo.test", target)]

    run(main())
    assert resolver.asked == ["socks.test"]  # the proxy's name only


def test_socks5_ipv6_target_is_sent_as_ipv6() -> None:
    async def main() -> None:
        async with socks_server(SocksServer(reply=4)) as proxy:
            with pytest.raises(DialError, match=r"host unreachable \(reply 0x04\)"):
                await dial(network(socks(proxy.port)), "2001:db8::1", 443)
            assert proxy.requests == [(4, "2001:db8::1", 443)]

    run(main())


def test_socks5_user_pass() -> None:
    async def main() -> None:
        behaviour = SocksServer(credentials=("alice", "s3cret"))
        async with echo_server() as target, socks_server(behaviour) as proxy:
            cfg = network(socks(proxy.port, user="alice", pw="s3cret"))
            sock = await Dialer(cfg, FakeResolver()).open_socket("127.0.0.1", target)
            assert await ping(sock) == b"ping"
            assert proxy.greetings == [b"\x05\x02\x00\x02"]
            assert proxy.auths == [("alice", "s3cret")]

    run(main())


def test_socks5_auth_failure_leaks_nothing_and_hides_password() -> None:
    async def main() -> None:
        behaviour = SocksServer(credentials=("alice", "s3cret"))
        async with socks_server(behaviour) as proxy:
            before = open_fds()
            cfg = network(socks(proxy.port, user="alice", pw="wrong-pass"))
            with pytest.raises(DialError) as info:
                await Dialer(cfg, FakeResolver()).open_socket("149.154.167.51", 443)
            await proxy.finished.get()
            assert open_fds() == before
            assert str(info.value) == (
                f"cannot dial to 149.154.167.51:443 via socks5://127.0.0.1:{proxy.port}: "
                "SOCKS5 handshake failed: SOCKS5 username/password authentication failed "
                "(status 0x01)"
            )
            assert "wrong-pass" not in str(info.value)

    run(main())


def test_socks5_server_wants_auth_we_have_none() -> None:
    async def main() -> None:
        async with socks_server(SocksServer(credentials=("a", "b"))) as proxy:
            with pytest.raises(DialError, match="accepts none of our authentication methods"):
                await dial(network(socks(proxy.port)), "1.2.3.4", 443)

    run(main())


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (5, "connection refused"),
        (2, "connection not allowed by ruleset"),
        (1, "general SOCKS server failure"),
    ],
)
def test_socks5_refusal_codes(code: int, text: str) -> None:
    async def main() -> None:
        async with socks_server(SocksServer(reply=code)) as proxy:
            before = open_fds()
            with pytest.raises(DialError) as info:
                await dial(network(socks(proxy.port)), "149.154.167.51", 443)
            await proxy.finished.get()
            assert open_fds() == before
            assert str(info.value).endswith(
                ": SOCKS5 handshake failed: "
                f"SOCKS5 server refused CONNECT: {text} (reply 0x{code:02x})"
            )

    run(main())


def test_socks5_target_refused_by_the_proxy() -> None:
    async def main() -> None:
        with closed_port() as target:
            async with socks_server(SocksServer()) as proxy:
                with pytest.raises(DialError, match=r"connection refused \(reply 0x05\)"):
                    await dial(network(socks(proxy.port)), "127.0.0.1", target)

    run(main())


def test_socks5_silent_server_times_out_without_leaks() -> None:
    async def main() -> None:
        with silent_listener() as port:
            before = open_fds()
            started = time.monotonic()
            with pytest.raises(DialError) as info:
                await dial(network(socks(port), tcp=0.3), "149.154.167.51", 443)
            assert time.monotonic() - started < 2
            assert open_fds() == before
            assert str(info.value) == (
                f"cannot dial to 149.154.167.51:443 via socks5://127.0.0.1:{port}: "
                "SOCKS5 handshake failed: timeout after 0.3s"
            )

    run(main())


def test_socks5_handshake_is_bounded_without_tcp_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdial, "SOCKS_HANDSHAKE_TIMEOUT", 0.2)

    async def main() -> None:
        with silent_listener() as port, pytest.raises(DialError, match=r"timeout after 0\.2s$"):
            await dial(network(socks(port), tcp=None), "149.154.167.51", 443)

    run(main())


def test_socks5_server_closing_early() -> None:
    async def main() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(3)
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(DialError, match=r"SOCKS5 server closed the connection$"):
                await dial(network(socks(port)), "149.154.167.51", 443)
        finally:
            server.close()

    run(main())


def test_socks5_proxy_down() -> None:
    async def main() -> None:
        with closed_port() as port:
            with pytest.raises(DialError) as info:
                await dial(network(socks(port)), "149.154.167.51", 443)
            assert str(info.value) == (
                f"cannot dial to 149.154.167.51:443 via socks5://127.0.0.1:{port}: "
                f"cannot dial to 127.0.0.1:{port}: connection refused"
            )

    run(main())


def test_socks5_proxy_name_unresolvable() -> None:
    async def main() -> None:
        cfg = network(socks(1080, host="nx.test", user="u", pw="hidden"))
        with pytest.raises(DialError) as info:
            await dial(cfg, "149.154.167.51", 443)
        assert str(info.value) == (
            "cannot dial to 149.154.167.51:443 via socks5://nx.test:1080: "
            "cannot dial to nx.test:1080: cannot resolve nx.test: NXDOMAIN"
        )

    run(main())


class _NoShuffle(random.Random):
    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        pass


def test_two_proxies_first_down() -> None:
    async def main() -> None:
        with closed_port() as down:
            async with echo_server() as target, socks_server(SocksServer()) as up:
                cfg = network(socks(down), socks(up.port))
                dialer = Dialer(cfg, FakeResolver(), rng=_NoShuffle())
                sock = await dialer.open_socket("127.0.0.1", target)
                assert sock.getpeername() == ("127.0.0.1", up.port)
                assert await ping(sock) == b"ping"

    run(main())


def test_all_proxies_down_errors_are_joined() -> None:
    async def main() -> None:
        with closed_port() as first, closed_port() as second:
            cfg = network(socks(first), socks(second, user="bob", pw="pw-not-shown"))
            with pytest.raises(DialError) as info:
                await Dialer(cfg, FakeResolver(), rng=_NoShuffle()).open_socket("1.2.3.4", 443)
            assert str(info.value) == (
                "cannot dial to any address: "
                f"cannot dial to 1.2.3.4:443 via socks5://127.0.0.1:{first}: "
                f"cannot dial to 127.0.0.1:{first}: connection refused; "
                f"cannot dial to 1.2.3.4:443 via socks5://127.0.0.1:{second}: "
                f"cannot dial to 127.0.0.1:{second}: connection refused"
            )

    run(main())


def test_proxies_are_shuffled_per_dial() -> None:
    async def main() -> None:
        first, second = SocksServer(), SocksServer()
        async with echo_server() as target, socks_server(first), socks_server(second):
            cfg = network(socks(first.port), socks(second.port))
            dialer = Dialer(cfg, FakeResolver(), rng=random.Random(7))
            for _ in range(16):
                (await dialer.open_socket("127.0.0.1", target)).close()
            assert len(first.requests) + len(second.requests) == 16
            assert first.requests and second.requests

    run(main())


def test_use_proxies_false_dials_directly() -> None:
    async def main() -> None:
        with closed_port() as proxy_port:
            async with echo_server() as target:
                cfg = network(socks(proxy_port))
                sock = await Dialer(cfg, FakeResolver()).open_socket(
                    "127.0.0.1", target, use_proxies=False
                )
                assert sock.getpeername() == ("127.0.0.1", target)
                sock.close()

    run(main())


def test_no_proxies_means_direct() -> None:
    cfg = network()
    assert cfg.proxies == ()

    async def main() -> None:
        async with echo_server() as target:
            with await Dialer(cfg, FakeResolver()).open_socket("127.0.0.1", target) as sock:
                assert sock.getpeername() == ("127.0.0.1", target)

    run(main())


def test_tests_run_on_uvloop() -> None:
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run(loop_type()) is uvloop.Loop
