"""mtgworkers.net.http against loopback servers: framing, limits, TLS, redirects, SOCKS5."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import trustme
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.config import KeepAlive, Network, ProxyURL, Timeouts
from mtgworkers.net.dial import Dialer
from mtgworkers.net.dns import make_resolver
from mtgworkers.net.http import (
    MAX_HEADER_LINES,
    MAX_INTERIM,
    USER_AGENT,
    HTTPError,
    HTTPResponse,
    ResponseError,
    Wording,
    http_get,
    read_response,
    redact_url,
    url_fetcher,
)

T = TypeVar("T")

# (request head) -> raw answer bytes; None: stay silent until the client gives up.
Responder = Callable[[bytes], Awaitable[bytes | None]]


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    """Run one test coroutine on a fresh uvloop loop, bounded in time."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@contextlib.asynccontextmanager
async def http_server(
    respond: Responder, tls: ssl.SSLContext | None = None, *, hold: bool = False
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server reading one request head per connection and writing ``respond(head)``;
    with ``hold`` it then keeps the connection open until the client closes it."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            answer = await respond(head)
            if answer is None:
                await reader.read()  # hold the connection until the client leaves
            else:
                writer.write(answer)
                await writer.drain()
                if hold:
                    await reader.read()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", heads
    finally:
        server.close()
        await server.wait_closed()


def fixed(answer: bytes | None) -> Responder:
    async def respond(head: bytes) -> bytes | None:
        return answer

    return respond


def ok(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def head_lines(head: bytes) -> list[str]:
    return head.decode("latin-1").split("\r\n")


async def get_once(answer: bytes | None, **kwargs: Any) -> tuple[HTTPResponse, list[bytes]]:
    kwargs.setdefault("timeout", 3.0)
    async with http_server(fixed(answer)) as (url, heads):
        response = await http_get(url + "/path", **kwargs)
    return response, heads


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- framing ------------------------------------------------------------------------------


def test_content_length_body_and_request_head() -> None:
    async def main() -> None:
        async with http_server(fixed(ok(b"hello"))) as (url, heads):
            response = await http_get(url + "/a%20b/c d?x=1&y=é", timeout=3.0)
        assert (response.status, response.body) == (200, b"hello")
        assert response.headers["content-length"] == "5"
        (head,) = heads
        lines = head_lines(head)
        assert lines[0] == "GET /a%20b/c%20d?x=1&y=%C3%A9 HTTP/1.1"
        port = url.rsplit(":", 1)[1]
        assert f"Host: 127.0.0.1:{port}" in lines
        assert f"User-Agent: {USER_AGENT}" in lines
        assert USER_AGENT == "curl/8.5.0"
        assert "Accept: */*" in lines
        assert "Connection: close" in lines

    run(main())


def test_caller_headers_replace_defaults() -> None:
    async def main() -> None:
        response, heads = await get_once(
            ok(b"x"), headers={"accept": "text/plain", "X-Extra": "1", "User-Agent": "me/1"}
        )
        assert response.body == b"x"
        lines = head_lines(heads[0])
        assert "accept: text/plain" in lines
        assert "X-Extra: 1" in lines
        assert "User-Agent: me/1" in lines
        assert not any(
            line.startswith(("Accept: */*", f"User-Agent: {USER_AGENT}")) for line in lines
        )

    run(main())


@pytest.mark.parametrize(
    "headers",
    [
        {"X-A": "1\r\nInjected: yes"},
        {"Bad Name": "1"},
        {"Connection": "keep-alive"},
        {"": "x"},
        {"X-A": "\u20ac"},
        {"X-\u00e9": "1"},
    ],
)
def test_bad_request_headers_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        run(http_get("http://127.0.0.1:9/", timeout=1.0, headers=headers))


def test_chunked_body_with_extensions_and_trailers() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;name=value\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    response, _ = run(get_once(answer))
    assert response.body == b"hello 0123456789"


def test_body_until_the_connection_closes() -> None:
    body = bytes(range(256)) * 1000
    response, _ = run(get_once(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n" + body))
    assert response.body == body


def test_interim_answers_are_skipped_and_no_body_statuses() -> None:
    response, _ = run(get_once(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final")))
    assert (response.status, response.body) == (200, b"final")
    response, _ = run(get_once(b"HTTP/1.1 204 No Content\r\n\r\n"))
    assert (response.status, response.body) == (204, b"")


def test_error_statuses_are_answers_for_http_get_and_errors_for_url_fetcher() -> None:
    async def main() -> None:
        async with http_server(fixed(ok(b"nope", "404 Not Found"))) as (url, _):
            response = await http_get(url + "/x", timeout=3.0)
            assert (response.status, response.body) == (404, b"nope")
            fetch = url_fetcher(timeout=3.0)
            with pytest.raises(HTTPError, match=r'^Get ".*/x": unexpected status code 404$'):
                await fetch(url + "/x")
        async with http_server(fixed(ok(b"fine", "302 Found"))) as (url, _):
            # a redirect without Location is a final answer; below 400 it is a body
            assert await url_fetcher(timeout=3.0)(url) == b"fine"

    run(main())


def test_repeated_headers_are_joined() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2, 2\r\n\r\nhi"
    response, _ = run(get_once(answer))
    assert response.headers["x-a"] == "1, 2"
    assert response.body == b"hi"


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "connection closed without an answer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "malformed HTTP response 'SSH-2.0-OpenSSH_9.6'"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", "malformed header line 'NoColon'"),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\n", "connection closed inside the headers"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", "after 5 of 10 body bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length '-1'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "inside the chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", "malformed chunked"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "line too long"),
        (b"HTTP/1.1 200 OK\r\n" + b"A: 1\r\n" * 101 + b"\r\n", "more than 100 header lines"),
    ],
)
def test_malformed_answers(answer: bytes, message: str) -> None:
    with pytest.raises(HTTPError, match=r'^Get "http://127\.0\.0\.1:\d+/path": ') as info:
        run(get_once(answer))
    assert message in str(info.value)
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize(
    "answer",
    [
        ok(b"x" * 101),
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 101,
    ],
)
def test_oversize_bodies_are_refused(answer: bytes) -> None:
    with pytest.raises(HTTPError, match="body too large"):
        run(get_once(answer, max_body=100))
    # exactly at the limit is fine
    response, _ = run(get_once(ok(b"x" * 100), max_body=100))
    assert len(response.body) == 100


def test_timeout_covers_a_silent_server() -> None:
    started = time.monotonic()
    expected = r'^Get "http://127\.0\.0\.1:\d+/path": timeout after 0\.3s$'
    with pytest.raises(HTTPError, match=expected):
        run(get_once(None, timeout=0.3))
    assert time.monotonic() - started < 3


def test_timeout_covers_a_slow_body() -> None:
    async def main() -> None:
        async def respond(head: bytes) -> bytes | None:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"

        async with http_server(respond, hold=True) as (url, _):
            with pytest.raises(HTTPError, match=r"timeout after 0\.3s$"):
                await http_get(url, timeout=0.3)

    started = time.monotonic()
    run(main())
    assert time.monotonic() - started < 3


def test_connection_refused_and_bad_urls() -> None:
    port = closed_port()
    with pytest.raises(HTTPError) as info:
        run(http_get(f"http://127.0.0.1:{port}/", timeout=3.0))
    assert str(info.value) == (
        f'Get "http://127.0.0.1:{port}/": cannot connect to 127.0.0.1:{port}: connection refused'
    )
    with pytest.raises(HTTPError, match="unsupported protocol scheme 'ftp'"):
        run(http_get("ftp://127.0.0.1/x", timeout=1.0))
    with pytest.raises(HTTPError, match="no host in the URL"):
        run(http_get("http:///x", timeout=1.0))
    with pytest.raises(HTTPError, match="invalid URL"):
        run(http_get("http://127.0.0.1:99999/", timeout=1.0))


def test_passwords_never_appear_in_errors() -> None:
    port = closed_port()
    with pytest.raises(HTTPError) as info:
        run(http_get(f"http://user:s3cret@127.0.0.1:{port}/list", timeout=3.0))
    assert "s3cret" not in str(info.value)
    assert f'"http://user:xxxxx@127.0.0.1:{port}/list"' in str(info.value)
    assert redact_url("https://a:b@h/p?q") == "https://a:xxxxx@h/p?q"
    assert redact_url("https://h/p") == "https://h/p"


def test_family_restriction() -> None:
    async def main() -> None:
        async with http_server(fixed(ok(b"x"))) as (url, heads):
            with pytest.raises(HTTPError):
                await http_get(url, timeout=3.0, family=socket.AF_INET6)
            assert heads == []
            response = await http_get(url, timeout=3.0, family=socket.AF_INET)
            assert response.body == b"x"

    run(main())

    async def opener(host: str, port: int) -> socket.socket:
        raise AssertionError("not called")

    with pytest.raises(ValueError, match="family"):
        run(http_get("http://127.0.0.1/", timeout=1.0, family=socket.AF_INET, open_socket=opener))


# --- redirects ----------------------------------------------------------------------------


def test_redirects_are_followed_and_bounded() -> None:
    async def main() -> None:
        async def respond(head: bytes) -> bytes | None:
            target = head_lines(head)[0].split()[1]
            if target == "/start":
                return b"HTTP/1.1 301 Moved\r\nLocation: /next?n=1\r\nContent-Length: 0\r\n\r\n"
            if target == "/next?n=1":
                return b"HTTP/1.1 307 Temporary\r\nLocation: final\r\n\r\n"
            if target == "/final":
                return ok(b"arrived")
            return b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n"

        async with http_server(respond) as (url, heads):
            response = await http_get(url + "/start", timeout=3.0)
            assert (response.status, response.body) == (200, b"arrived")
            assert response.url == url + "/final"
            assert len(heads) == 3

            heads.clear()
            with pytest.raises(HTTPError, match=r'^Get ".*/loop": stopped after 10 redirects$'):
                await http_get(url + "/loop", timeout=3.0)
            assert len(heads) == 11

            response = await http_get(url + "/start", timeout=3.0, max_redirects=0)
            assert response.status == 301
            assert response.headers["location"] == "/next?n=1"

    run(main())


# --- TLS ----------------------------------------------------------------------------------


def tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def test_https(trustme_ca: trustme.CA) -> None:
    server_context, client_context = tls_contexts(trustme_ca)

    async def main() -> None:
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        async with http_server(fixed(chunked), tls=server_context) as (url, heads):
            response = await http_get(url + "/tls", timeout=3.0, ssl_context=client_context)
            assert (response.status, response.body) == (200, b"abc")
            assert head_lines(heads[0])[0] == "GET /tls HTTP/1.1"
            # the default context does not trust the test CA
            with pytest.raises(HTTPError, match="certificate verify failed"):
                await http_get(url, timeout=3.0)
        big = b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 200000
        async with http_server(fixed(big), tls=server_context) as (url, _):
            response = await http_get(url, timeout=3.0, ssl_context=client_context)
            assert response.body == b"z" * 200000

    run(main())


def test_plain_http_to_a_tls_server_and_tls_to_a_plain_server(trustme_ca: trustme.CA) -> None:
    server_context, _ = tls_contexts(trustme_ca)

    async def blurt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(blurt, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(HTTPError, match="TLS handshake failed"):
                await http_get(f"https://127.0.0.1:{port}/", timeout=3.0)
        finally:
            server.close()
        async with http_server(fixed(ok(b"x")), tls=server_context) as (url, heads):
            plain_url = url.replace("https://", "http://")
            with pytest.raises(HTTPError, match="connection closed without an answer"):
                await http_get(plain_url, timeout=3.0)
            assert heads == []

    run(main())


# --- through SOCKS5 -----------------------------------------------------------------------


@dataclass
class TinySocks:
    """No-auth SOCKS5, CONNECT only; records the targets it was asked for."""

    targets: list[tuple[str, int]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, count = await reader.readexactly(2)
            await reader.readexactly(count)
            writer.write(b"\x05\x00")
            _, _, _, atyp = await reader.readexactly(4)
            if atyp == 1:
                host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
            else:
                host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            port = int.from_bytes(await reader.readexactly(2), "big")
            self.targets.append((host, port))
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1" if host == "files.example" else host, port
            )
            writer.write(b"\x05\x00\x00\x01" + bytes(6))
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def socks_dialer() -> AsyncIterator[tuple[Dialer, TinySocks]]:
    socks = TinySocks()
    server = await asyncio.start_server(socks.handle, "127.0.0.1", 0)
    socks.port = server.sockets[0].getsockname()[1]
    cfg = Network(
        proxies=(ProxyURL(scheme="socks5", host="127.0.0.1", port=socks.port),),
        timeout=Timeouts(tcp=2.0),
        keep_alive=KeepAlive(),
    )
    try:
        yield Dialer(cfg, make_resolver(None)), socks
    finally:
        server.close()


def test_through_socks5_via_the_dialer(trustme_ca: trustme.CA) -> None:
    server_context, client_context = tls_contexts(trustme_ca)

    async def main() -> None:
        async with socks_dialer() as (dialer, socks):
            async with http_server(fixed(ok(b"via socks"))) as (url, heads):
                port = int(url.rsplit(":", 1)[1])
                response = await http_get(url + "/p", timeout=3.0, open_socket=dialer.open_socket)
                assert response.body == b"via socks"
                assert socks.targets == [("127.0.0.1", port)]
                assert len(heads) == 1
                # a host name goes to the proxy unresolved, and is the Host header
                fetch = url_fetcher(timeout=3.0, open_socket=dialer.open_socket)
                assert await fetch(f"http://files.example:{port}/p") == b"via socks"
                assert socks.targets[-1] == ("files.example", port)
                assert f"Host: files.example:{port}" in head_lines(heads[-1])
            async with http_server(fixed(ok(b"tls via socks")), tls=server_context) as (url, _):
                response = await http_get(
                    url, timeout=3.0, open_socket=dialer.open_socket, ssl_context=client_context
                )
                assert response.body == b"tls via socks"
                assert len(socks.targets) == 3

    run(main())


def test_sockets_from_open_socket_are_released(trustme_ca: trustme.CA) -> None:
    server_context, client_context = tls_contexts(trustme_ca)

    async def main() -> None:
        async with socks_dialer() as (dialer, _):
            given: list[socket.socket] = []

            async def open_socket(host: str, port: int) -> socket.socket:
                sock = await dialer.open_socket(host, port)
                given.append(sock)
                return sock

            async def settled() -> bool:
                # Closing finishes in loop callbacks; a few turns of the loop are enough.
                for _ in range(20):
                    if all(sock.fileno() == -1 for sock in given):
                        return True
                    await asyncio.sleep(0)
                return False

            async with http_server(fixed(ok(b"x")), tls=server_context) as (url, _):
                for _ in range(3):
                    with pytest.raises(HTTPError, match="certificate verify failed"):
                        await http_get(url, timeout=3.0, open_socket=open_socket)
                    assert await settled()
                    response = await http_get(
                        url, timeout=3.0, open_socket=open_socket, ssl_context=client_context
                    )
                    assert response.body == b"x"
                    assert await settled()
            async with http_server(fixed(None)) as (url, _):
                for _ in range(3):
                    with pytest.raises(HTTPError, match="timeout"):
                        await http_get(url, timeout=0.3, open_socket=open_socket)
                    assert await settled()
            assert len(given) >= 6  # the last three may time out before the dial ends

    run(main())


def test_socks5_failure_is_an_http_error() -> None:
    async def main() -> None:
        cfg = Network(
            proxies=(ProxyURL(scheme="socks5", host="127.0.0.1", port=closed_port()),),
            timeout=Timeouts(tcp=2.0),
        )
        dialer = Dialer(cfg, make_resolver(None))
        expected = r'^Get "http://127\.0\.0\.1:80/": cannot dial to 127\.0\.0\.1:80 via socks5://'
        with pytest.raises(HTTPError, match=expected):
            await http_get("http://127.0.0.1:80/", timeout=3.0, open_socket=dialer.open_socket)

    run(main())


# --- hostile answers ----------------------------------------------------------------------


class CannedPeer:
    """An ``open_socket`` whose peer has already written ``data`` and closed its side."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.peers: list[socket.socket] = []

    async def open_socket(self, host: str, port: int) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.sendall(self.data)
        theirs.shutdown(socket.SHUT_WR)
        ours.setblocking(False)
        self.peers.append(theirs)  # the request it receives is never read
        return ours

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


_PREFIXES = [
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 301 Moved\r\nLocation: ",
    b"HTTP/1.0 100 Continue\r\n\r\n",
    b"",
]


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from(_PREFIXES), data=st.binary(max_size=300))
def test_random_answers_give_responses_or_http_errors(prefix: bytes, data: bytes) -> None:
    peer = CannedPeer(prefix + data)

    async def main() -> None:
        try:
            response = await http_get(
                "http://fuzz.invalid/",
                timeout=2.0,
                open_socket=peer.open_socket,
                max_body=64,
                max_redirects=2,
            )
        except HTTPError as exc:
            assert str(exc).startswith('Get "')
        else:
            assert 100 <= response.status <= 999
            assert len(response.body) <= 64

    try:
        run(main())
    finally:
        peer.close()


# --- read_response on its own (no sockets) ------------------------------------------------


def read(data: bytes, *, limit: int = 64 * 1024, **kwargs: Any) -> HTTPResponse:
    """read_response over a stream that holds ``data`` and then ends."""

    async def main() -> HTTPResponse:
        stream = asyncio.StreamReader(limit=limit)
        stream.feed_data(data)
        stream.feed_eof()
        kwargs.setdefault("max_body", 1000)
        return await read_response(stream, **kwargs)

    return run(main())


def read_error(data: bytes, **kwargs: Any) -> ResponseError:
    with pytest.raises(ResponseError) as info:
        read(data, **kwargs)
    return info.value


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_reader_leaves_the_stream_at_the_next_answer() -> None:
    """Trailers are consumed: a kept-alive connection's next answer reads cleanly."""

    async def main() -> list[HTTPResponse]:
        stream = asyncio.StreamReader()
        stream.feed_data(
            CHUNKED + b"3;ext=1;x\r\nabc\r\n0;last\r\nX-Sum: 1\r\nX-More: 2\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + CHUNKED + b"0\r\n\r\n"
        )
        stream.feed_eof()
        return [await read_response(stream, max_body=100) for _ in range(3)]

    first, second, third = run(main())
    assert first.body == b"abc"
    assert "x-sum" not in first.headers  # trailers are dropped
    assert (second.status, second.body) == (200, b"ok")
    assert third.body == b""


def test_reader_framing_rules() -> None:
    # chunked wins over Content-Length; a body whose last coding is not chunked has no
    # framing we could find the end of
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert read(both + b"2\r\nhi\r\n0\r\n\r\n").body == b"hi"
    assert read_error(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").kind == (
        "bad_encoding"
    )
    # 204 and 304 have no body even when more bytes follow
    assert read(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n").body == b""
    # bare LF line endings are tolerated; hex chunk sizes in either case
    lf_only = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\nA\r\n0123456789\r\n0\n\n"
    assert read(lf_only).body == b"0123456789"
    assert read(CHUNKED + b"a\r\n0123456789\r\n0\r\n\r\n").body == b"0123456789"
    assert read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").body == b""
    assert read(b"HTTP/1.1 200 OK\r\n\r\n").body == b""  # to the end of the stream


def test_reader_interim_answers() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    response = read(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert (response.status, response.body) == (200, b"x")
    assert "link" not in response.headers  # the interim answer's fields are not kept
    many = b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM
    assert read(many + b"HTTP/1.1 200 OK\r\n\r\n").status == 200
    error = read_error(many + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert (error.kind, str(error)) == (
        "many_interim",
        f"more than {MAX_INTERIM} interim (1xx) answers",
    )


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (b"", "no_answer", "connection closed without an answer"),
        (b"HTTP/1.1 2", "closed", "connection closed inside the status line"),
        (b"HTTP/1.1 200 OK\r\nA: 1", "closed", "connection closed inside the headers"),
        (CHUNKED + b"5;ext=1\r\nab", "closed", "connection closed inside the chunked body"),
        (CHUNKED + b"5\r\nabcde", "closed", "connection closed inside the chunked body"),
        (CHUNKED + b"5\r\nabcde\r\n", "closed", "connection closed inside the chunked body"),
        (CHUNKED + b"0\r\n", "closed", "connection closed inside the trailers"),
        (CHUNKED + b"0\r\nX-T: 1\r\n", "closed", "connection closed inside the trailers"),
        (CHUNKED + b"0\r\nbroken\r\n\r\n", "bad_header", "malformed header line 'broken'"),
        (CHUNKED + b"zz\r\n", "bad_chunk_size", "bad chunk size 'zz'"),
        (CHUNKED + b"\r\n", "bad_chunk_size", "bad chunk size ''"),
        (CHUNKED + b"-1\r\n", "bad_chunk_size", "bad chunk size '-1'"),
        (CHUNKED + b"+1\r\n", "bad_chunk_size", "bad chunk size '+1'"),
        (CHUNKED + b"1 1\r\n", "bad_chunk_size", "bad chunk size '1 1'"),
        (CHUNKED + b"1" * 17 + b"\r\n", "bad_chunk_size", "bad chunk size '11111111111111111'"),
        (CHUNKED + b"3\r\nabcX\r\n", "bad_chunk_end", "malformed chunked body"),
        (CHUNKED + b"3\r\nabc\n0\r\n\r\n", "bad_chunk_end", "malformed chunked body"),
        (CHUNKED + b"3e9\r\n", "body_over_limit", "body too large: more than 1000 bytes"),
        (
            CHUNKED + b"3e8\r\n" + b"x" * 1000 + b"\r\n1\r\n",
            "body_over_limit",
            "body too large: more than 1000 bytes",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n",
            "body_too_large",
            "body too large: 1001 bytes (at most 1000)",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
            "truncated",
            "connection closed after 3 of 9 body bytes",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1001, "body_over_limit", "more than 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", "bad_length", "'+5'"),
        (b"HTTP/2 200\r\n\r\n", "bad_status", "malformed HTTP response 'HTTP/2 200'"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "bad_status", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n", "bad_header", "malformed header line"),
    ],
)
def test_reader_failures(data: bytes, kind: str, message: str) -> None:
    error = read_error(data)
    assert error.kind == kind
    assert message in str(error)


def test_reader_head_limits() -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADER_LINES))
    assert len(read(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n").headers) == MAX_HEADER_LINES
    error = read_error(b"HTTP/1.1 200 OK\r\n" + fields + b"X-Y: 1\r\n\r\n")
    assert (error.kind, str(error)) == ("many_lines", "more than 100 header lines")
    # the byte limit covers the status line and the headers together, and the trailers
    head = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 80 + b"\r\n\r\n"
    assert read(head, max_head=len(head)).status == 200
    error = read_error(head, max_head=len(head) - 1)
    assert (error.kind, str(error)) == ("long_head", f"headers longer than {len(head) - 1} bytes")
    trailers = CHUNKED + b"0\r\nX: " + b"a" * 200 + b"\r\n\r\n"
    assert read_error(trailers, max_head=100).kind == "long_head"
    # one line is bounded by the stream's own limit
    error = read_error(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 300 + b"\r\n\r\n", limit=128)
    assert (error.kind, str(error)) == ("long_line", "line too long in the headers")
    error = read_error(CHUNKED + b"1" + b" " * 300 + b"\r\n", limit=128)
    assert (error.kind, str(error)) == ("long_line", "line too long in the chunked body")


def test_reader_speaks_in_the_callers_words() -> None:
    wording = Wording(bad_chunk_size="peer sent chunk size {line}", closed="peer hung up ({part})")
    assert str(read_error(CHUNKED + b"q\r\n", wording=wording)) == "peer sent chunk size 'q'"
    assert str(read_error(CHUNKED + b"0\r\n", wording=wording)) == "peer hung up (trailers)"
    # the fields it does not replace keep the default words
    assert str(read_error(b"", wording=wording)) == "connection closed without an answer"


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from([b"", CHUNKED, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"]),
    data=st.binary(max_size=200),
)
def test_reader_random_input_gives_answers_or_response_errors(prefix: bytes, data: bytes) -> None:
    try:
        response = read(prefix + data, limit=256, max_body=64, max_head=512)
    except ResponseError as exc:
        assert exc.kind in Wording.__dataclass_fields__
    else:
        assert 200 <= response.status <= 999
        assert len(response.body) <= 64
        assert all(key == key.lower() for key in response.headers)
