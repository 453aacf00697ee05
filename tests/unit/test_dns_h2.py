"""DNS-over-HTTPS over HTTP/2: a small h2 server of the test's own on a loopback TLS socket
(ALPN h2), for the answers and every error path; the HTTP/1.1 fallback by ALPN."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
import trustme

from mtgworkers.net.dns import DOH_ALPN, HttpsResolver, ResolveError, make_resolver
from tests.unit.test_dns import DohBehaviour, Zone, doh_server, run

MEDIA_TYPE = "application/dns-message"


@dataclass(frozen=True)
class H2Pki:
    ca: trustme.CA
    client: ssl.SSLContext  # trusts the CA, offers DOH_ALPN
    cert: trustme.LeafCert

    def server(self, *alpn: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        context.set_alpn_protocols(list(alpn))
        return context


@pytest.fixture(scope="module")
def h2pki() -> H2Pki:
    ca = trustme.CA()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(list(DOH_ALPN))
    return H2Pki(ca, client, ca.issue_cert("127.0.0.1", "doh.test"))


@dataclass
class H2Behaviour:
    """What the server does once a request has arrived whole (``mode``), and what it saw."""

    mode: str = "answer"
    reset_streams: tuple[int, ...] = (1, 3)  # mode "reset": the streams it resets
    connections: int = 0
    closed_by_client: int = 0  # connections that ended with the client's EOF
    alpn: list[str | None] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)  # headers per request


def _respond(
    conn: h2.connection.H2Connection,
    how: H2Behaviour,
    zone: Zone,
    stream_id: int,
    body: bytes,
    pending: dict[int, bytes],
) -> bool:
    """Answer one request per ``how.mode``; False = close the connection now."""
    mode = how.mode
    if mode == "stall":
        return True
    if mode == "eof":
        return False
    if mode == "reset" and stream_id in how.reset_streams:
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        return True
    if mode == "goaway":
        conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, b"slow down", 0)
        return True
    reply = zone.answer(body, "h2") or b""
    headers = [(":status", "200"), ("content-type", MEDIA_TYPE)]
    if mode == "status":
        headers = [(":status", "500"), ("content-type", "text/plain")]
        reply = b"internal error"
    elif mode == "no-content-type":
        headers = [(":status", "200")]
    elif mode == "wrong-content-type":
        headers = [(":status", "200"), ("content-type", "text/html; charset=utf-8")]
    elif mode == "declared-oversized":
        conn.send_headers(stream_id, [*headers, ("content-length", "99999")])
        return True  # and never a body
    elif mode == "oversized":
        reply = b"\0" * 70000  # no content-length: only the body tells
    elif mode == "bad-dns":
        reply = b"hello"
    conn.send_headers(stream_id, headers)
    pending[stream_id] = reply
    return True


def _flush(conn: h2.connection.H2Connection, pending: dict[int, bytes]) -> None:
    """Send what the flow-control windows let through of the pending bodies."""
    for stream_id in list(pending):
        rest = pending[stream_id]
        try:
            while True:
                size = min(
                    len(rest),
                    conn.local_flow_control_window(stream_id),
                    conn.max_outbound_frame_size,
                )
                if size <= 0 and rest:
                    break
                conn.send_data(stream_id, rest[:size], end_stream=size == len(rest))
                rest = rest[size:]
                if not rest:
                    break
        except h2.exceptions.ProtocolError:  # the client reset the stream
            rest = b""
        if rest:
            pending[stream_id] = rest
        else:
            del pending[stream_id]


async def _serve_h2(
    zone: Zone, how: H2Behaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    how.connections += 1
    how.alpn.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    bodies: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    go_on = True
    try:
        while go_on:
            data = await reader.read(65536)
            if not data:
                how.closed_by_client += 1
                break
            if how.mode == "garbage":  # a CONTINUATION frame that follows no HEADERS
                writer.write(b"\x00\x00\x04\x09\x00\x00\x00\x00\x01this is not HTTP/2")
                await writer.drain()
                await asyncio.sleep(3600)
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    how.requests.append({str(k): str(v) for k, v in event.headers})
                    bodies[event.stream_id] = b""
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    body = bodies.pop(event.stream_id)
                    go_on = go_on and _respond(conn, how, zone, event.stream_id, body, pending)
            _flush(conn, pending)
            if how.mode == "answer-goaway" and len(how.requests) == 2 and not bodies | pending:
                conn.close_connection()  # NO_ERROR, after both answers
            writer.write(conn.data_to_send())
            await writer.drain()
    except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def h2_server(zone: Zone, context: ssl.SSLContext, how: H2Behaviour) -> AsyncIterator[int]:
    server = await asyncio.start_server(
        lambda r, w: _serve_h2(zone, how, r, w), "127.0.0.1", 0, ssl=context
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def h2_resolve(
    h2pki: H2Pki,
    how: H2Behaviour,
    host: str = "both.test",
    *,
    timeout: float = 5.0,
    client: ssl.SSLContext | None = None,
) -> list[str]:
    async def main() -> list[str]:
        async with h2_server(Zone(), h2pki.server("h2"), how) as port:
            resolver = make_resolver(
                f"https://127.0.0.1:{port}",
                ssl_context=client or h2pki.client,
                timeout=timeout,
            )
            return await resolver.resolve(host)

    return run(main())


# --- answers --------------------------------------------------------------------------


def test_h2_both_queries_are_streams_of_one_connection(h2pki: H2Pki) -> None:
    how = H2Behaviour()
    assert h2_resolve(h2pki, how) == ["192.0.2.1", "2001:db8::1"]
    assert how.connections == 1
    assert how.alpn == ["h2"]
    assert len(how.requests) == 2
    for request in how.requests:
        assert request[":method"] == "POST"
        assert request[":scheme"] == "https"
        assert request[":path"] == "/dns-query"
        assert request[":authority"].startswith("127.0.0.1:")
        assert request["content-type"] == MEDIA_TYPE
        assert request["accept"] == MEDIA_TYPE


def test_h2_cname_and_nxdomain(h2pki: H2Pki) -> None:
    assert h2_resolve(h2pki, H2Behaviour(), "alias.test") == ["192.0.2.1", "2001:db8::1"]
    with pytest.raises(ResolveError, match=r"^cannot resolve missing\.test: NXDOMAIN$"):
        h2_resolve(h2pki, H2Behaviour(), "missing.test")


def test_h2_goaway_after_the_answers_is_fine(h2pki: H2Pki) -> None:
    how = H2Behaviour(mode="answer-goaway")
    assert h2_resolve(h2pki, how) == ["192.0.2.1", "2001:db8::1"]


def test_default_context_offers_h2(h2pki: H2Pki) -> None:
    context = HttpsResolver._default_context()  # the production context, plus the test CA
    h2pki.ca.configure_trust(context)
    how = H2Behaviour()
    assert h2_resolve(h2pki, how, client=context) == ["192.0.2.1", "2001:db8::1"]
    assert how.alpn == ["h2"]


def test_server_preferring_h2_among_both_gets_h2(h2pki: H2Pki) -> None:
    how = H2Behaviour()

    async def main() -> list[str]:
        async with h2_server(Zone(), h2pki.server("h2", "http/1.1"), how) as port:
            resolver = HttpsResolver("127.0.0.1", port, ssl_context=h2pki.client)
            return await resolver.resolve("v6only.test")

    assert run(main()) == ["2001:db8::6"]
    assert how.alpn == ["h2"]


@pytest.mark.parametrize("server_alpn", [("http/1.1",), ()])
def test_http1_server_still_works_when_h2_is_offered(
    h2pki: H2Pki, server_alpn: tuple[str, ...]
) -> None:
    """A server that picks http/1.1, or no ALPN at all, is spoken to in HTTP/1.1."""
    how = DohBehaviour()

    async def main() -> list[str]:
        async with doh_server(Zone(), h2pki.server(*server_alpn), how) as port:
            resolver = HttpsResolver("127.0.0.1", port, ssl_context=h2pki.client)
            return await resolver.resolve("both.test")

    assert run(main()) == ["192.0.2.1", "2001:db8::1"]
    assert how.connections == 1
    assert [r["request-line"] for r in how.requests] == ["POST /dns-query HTTP/1.1"] * 2


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("reset", "DNS-over-HTTPS server reset the HTTP/2 stream (REFUSED_STREAM)"),
        (
            "goaway",
            "DNS-over-HTTPS server closed the HTTP/2 connection (GOAWAY ENHANCE_YOUR_CALM)",
        ),
        ("status", "DNS-over-HTTPS server answered HTTP 500"),
        ("no-content-type", "DNS-over-HTTPS server sent no Content-Type"),
        (
            "wrong-content-type",
            "DNS-over-HTTPS server sent Content-Type 'text/html', not application/dns-message",
        ),
        ("declared-oversized", "DNS-over-HTTPS answer too large: 99999 bytes"),
        ("oversized", "DNS-over-HTTPS answer too large"),
        ("eof", "DNS-over-HTTPS server closed the connection early"),
    ],
)
def test_h2_errors(h2pki: H2Pki, mode: str, reason: str) -> None:
    how = H2Behaviour(mode=mode)
    with pytest.raises(ResolveError) as info:
        h2_resolve(h2pki, how)
    assert str(info.value) == f"cannot resolve both.test: {reason}"
    assert how.alpn == ["h2"]


def test_h2_bad_dns_message(h2pki: H2Pki) -> None:
    with pytest.raises(ResolveError, match=r"^cannot resolve both\.test: bad DNS message from "):
        h2_resolve(h2pki, H2Behaviour(mode="bad-dns"))


def test_h2_protocol_error(h2pki: H2Pki) -> None:
    pattern = r"^cannot resolve both\.test: HTTP/2 protocol error from DNS-over-HTTPS server: "
    with pytest.raises(ResolveError, match=pattern):
        h2_resolve(h2pki, H2Behaviour(mode="garbage"))


def test_h2_one_reset_stream_does_not_hide_the_other(h2pki: H2Pki) -> None:
    # Stream 1 asks for A, stream 3 for AAAA; only the A stream is refused.
    how = H2Behaviour(mode="reset", reset_streams=(1,))
    assert h2_resolve(h2pki, how) == ["2001:db8::1"]


def test_h2_server_that_stalls_times_out_and_is_hung_up_on(h2pki: H2Pki) -> None:
    how = H2Behaviour(mode="stall")

    async def main() -> None:
        async with h2_server(Zone(), h2pki.server("h2"), how) as port:
            resolver = HttpsResolver("127.0.0.1", port, ssl_context=h2pki.client, timeout=0.5)
            started = time.monotonic()
            with pytest.raises(ResolveError) as info:
                await resolver.resolve("both.test")
            assert str(info.value) == "cannot resolve both.test: timeout after 0.5s"
            assert time.monotonic() - started < 3
            for _ in range(200):  # the client closes its side of the connection
                if how.closed_by_client:
                    break
                await asyncio.sleep(0.01)

    run(main())
    assert how.alpn == ["h2"]
    assert len(how.requests) == 2
    assert how.closed_by_client == 1
