"""Resolvers against real local servers: UDP/TCP DNS, DNS-over-TLS, DNS-over-HTTPS (uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trustme
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.config import DnsServer, parse_dns
from mtgworkers.net import dns as mdns
from mtgworkers.net.dns import (
    HttpsResolver,
    ResolveError,
    SystemResolver,
    TlsResolver,
    UdpResolver,
    make_resolver,
)

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 10.0) -> T:
    """Run one test coroutine on a fresh uvloop event loop, bounded in time."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        # Server-side handlers still running belong to the test: stop them quietly.
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _cancel_leftovers() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_tests_run_on_uvloop() -> None:
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run(loop_type()) is uvloop.Loop


# --- a small authoritative server for the zone "test." ---------------------------------

TTL = 300


@dataclass
class Zone:
    """Records per name; a name missing from ``records`` is NXDOMAIN."""

    records: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: {
            "both.test.": [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")],
            "v4only.test.": [("A", "192.0.2.2"), ("A", "192.0.2.3")],
            "v6only.test.": [("AAAA", "2001:db8::6")],
            "nodata.test.": [("TXT", '"hello"')],
            "alias.test.": [("CNAME", "both.test.")],
            "long.test.": [("A", "192.0.2.9")],
            "zero.test.": [("A", "192.0.2.10")],
            "servfail.test.": [],
        }
    )
    ttls: dict[str, int] = field(default_factory=lambda: {"long.test.": 86400, "zero.test.": 0})
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (proto, name, type)
    truncate_udp: bool = False  # answer UDP with TC=1 and a decoy address
    drop_first_udp: int = 0  # pretend this many UDP datagrams got lost
    silent: bool = False  # never answer

    def answer(self, wire: bytes, proto: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text().lower()
        self.queries.append((proto, name, dns.rdatatype.to_text(question.rdtype)))
        if self.silent:
            return None
        if proto == "udp" and self.drop_first_udp > 0:
            self.drop_first_udp -= 1
            return None
        response = dns.message.make_response(query)
        if proto == "udp" and self.truncate_udp:
            response.flags |= dns.flags.TC
            response.answer.append(_rrset(question.name, 1, question.rdtype, "198.51.100.1"))
            return response.to_wire()
        if name == "servfail.test.":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        qname = question.name
        for _ in range(8):
            key = qname.to_text().lower()
            if key not in self.records:
                if qname == question.name:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            ttl = self.ttls.get(key, TTL)
            cname = [v for t, v in self.records[key] if t == "CNAME"]
            if cname:
                response.answer.append(dns.rrset.from_text(qname, ttl, "IN", "CNAME", cname[0]))
                qname = dns.name.from_text(cname[0])
                continue
            wanted = [
                v for t, v in self.records[key] if t == dns.rdatatype.to_text(question.rdtype)
            ]
            if wanted:
                response.answer.append(
                    dns.rrset.from_text(qname, ttl, "IN", question.rdtype, *wanted)
                )
            break
        return response.to_wire()


def _rrset(
    name: dns.name.Name, ttl: int, rdtype: dns.rdatatype.RdataType, value: str
) -> dns.rrset.RRset:
    if rdtype == dns.rdatatype.AAAA:
        value = "2001:db8::dead"
    return dns.rrset.from_text(name, ttl, "IN", dns.rdatatype.to_text(rdtype), value)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not inherit from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.zone.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _serve_dns_stream(
    zone: Zone, proto: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = zone.answer(await reader.readexactly(size), proto)
            if reply is None:
                await asyncio.sleep(3600)
                continue
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def dns_server(zone: Zone) -> AsyncIterator[int]:
    """UDP and TCP DNS on 127.0.0.1, same port number; yields the port."""
    loop = asyncio.get_running_loop()
    for _ in range(20):
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(zone), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(
                lambda r, w: _serve_dns_stream(zone, "tcp", r, w), "127.0.0.1", port
            )
        except OSError:
            transport.close()
            continue
        break
    else:  # pragma: no cover
        raise RuntimeError("no free port pair")
    try:
        yield port
    finally:
        transport.close()
        tcp.close()


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "dns.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Pki(ca, server, client)


@contextlib.asynccontextmanager
async def dot_server(zone: Zone, context: ssl.SSLContext) -> AsyncIterator[int]:
    server = await asyncio.start_server(
        lambda r, w: _serve_dns_stream(zone, "dot", r, w), "127.0.0.1", 0, ssl=context
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@dataclass
class DohBehaviour:
    status: int = 200
    chunked: bool = False
    close_each: bool = False  # "Connection: close" after every response
    garbage: bytes | None = None  # send this instead of the HTTP response
    requests: list[dict[str, str]] = field(default_factory=list)  # head lines per request
    connections: int = 0


async def _serve_doh(
    zone: Zone, how: DohBehaviour, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    how.connections += 1
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            request = {"request-line": lines[0]}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    request[name.strip().lower()] = value.strip()
            how.requests.append(request)
            body = await reader.readexactly(int(request["content-length"]))
            if how.garbage is not None:
                writer.write(how.garbage)
                await writer.drain()
                return
            reply = zone.answer(body, "doh") or b""
            out = [f"HTTP/1.1 {how.status} Whatever", "Content-Type: application/dns-message"]
            if how.close_each:
                out.append("Connection: close")
            if how.chunked:
                out.append("Transfer-Encoding: chunked")
                half = len(reply) // 2
                payload = b"".join(
                    b"%x;ext=1\r\n%s\r\n" % (len(part), part)
                    for part in (reply[:half], reply[half:])
                )
                payload += b"0\r\nX-Trailer: 1\r\n\r\n"
            else:
                out.append(f"Content-Length: {len(reply)}")
                payload = reply
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
            await writer.drain()
            if how.close_each:
                return
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def doh_server(zone: Zone, context: ssl.SSLContext, how: DohBehaviour) -> AsyncIterator[int]:
    server = await asyncio.start_server(
        lambda r, w: _serve_doh(zone, how, r, w), "127.0.0.1", 0, ssl=context
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- make_resolver --------------------------------------------------------------------


def test_make_resolver_forms() -> None:
    assert isinstance(make_resolver(None), SystemResolver)
    udp = make_resolver("1.1.1.1")
    assert isinstance(udp, UdpResolver) and (udp.server, udp.port) == ("1.1.1.1", 53)
    udp = make_resolver("udp://[2001:db8::1]:5353")
    assert isinstance(udp, UdpResolver) and (udp.server, udp.port) == ("2001:db8::1", 5353)
    udp = make_resolver("2001:db8::53")
    assert isinstance(udp, UdpResolver) and udp.server == "2001:db8::53"
    tls = make_resolver("tls://dns.example")
    assert isinstance(tls, TlsResolver) and (tls.host, tls.port) == ("dns.example", 853)
    tls = make_resolver("tls://9.9.9.9:8853")
    assert isinstance(tls, TlsResolver) and (tls.host, tls.port) == ("9.9.9.9", 8853)
    doh = make_resolver("https://1.1.1.1")
    assert isinstance(doh, HttpsResolver)
    assert (doh.host, doh.port, doh.path) == ("1.1.1.1", 443, "/dns-query")
    doh = make_resolver("https://dns.example:8443/custom?ct=1", timeout=2)
    assert isinstance(doh, HttpsResolver)
    assert (doh.host, doh.port, doh.path, doh.timeout) == ("dns.example", 8443, "/custom?ct=1", 2)


def test_make_resolver_uses_the_configs_dns_server() -> None:
    udp = make_resolver(DnsServer("udp", "192.0.2.53", 5353))
    assert isinstance(udp, UdpResolver) and (udp.server, udp.port) == ("192.0.2.53", 5353)
    tls = make_resolver(DnsServer("tls", "dns.example", 8853))
    assert isinstance(tls, TlsResolver) and (tls.host, tls.port) == ("dns.example", 8853)
    doh = make_resolver(DnsServer("https", "2001:db8::53", 443, "/q?ct=1"), timeout=3)
    assert isinstance(doh, HttpsResolver)
    assert (doh.host, doh.port, doh.path, doh.timeout) == ("2001:db8::53", 443, "/q?ct=1", 3)
    # a string is read with the config file's rules: the same server either way
    for text in ("9.9.9.9", "tls://dns.example:8853", "https://[2001:db8::53]/q?ct=1"):
        from_text, from_config = make_resolver(text), make_resolver(parse_dns(text))
        assert type(from_text) is type(from_config)
        assert _target(from_text) == _target(from_config)
    assert isinstance(make_resolver(""), SystemResolver)
    assert isinstance(make_resolver("  "), SystemResolver)


def _target(resolver: object) -> tuple[object, ...]:
    names = ("server", "host", "port", "path")
    return tuple(getattr(resolver, name, None) for name in names)


# The reasons are the config file's (mtgworkers.config.parse_dns), after the text.
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ftp://1.1.1.1", "unsupported DNS type ftp"),
        ("udp://dns.example", "simple DNS must be an IP address"),
        ("https://user@dns.example", "user info is not supported"),
        ("tls://dns.example/path", "path is supported only for DoH"),
        ("udp://1.1.1.1/", "path is supported only for DoH"),
        ("udp://", "unsupported DNS address"),
        ("dns.example", "unsupported DNS address"),
        ("udp://1.1.1.1:99999", "incorrect port number"),
    ],
)
def test_make_resolver_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^invalid DNS address {text!r}: {reason}"):
        make_resolver(text)


def test_resolver_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SystemResolver(timeout=0)


# --- IP literals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [("192.0.2.7", "192.0.2.7"), ("2001:db8::7", "2001:db8::7"), ("[2001:db8::7]", "2001:db8::7")],
)
def test_ip_literal_needs_no_query(host: str, expected: str) -> None:
    zone = Zone()

    async def main() -> list[str]:
        async with dns_server(zone) as port:
            return await UdpResolver("127.0.0.1", port).resolve(host)

    assert run(main()) == [expected]
    assert zone.queries == []


def test_ip_literal_system_resolver_is_not_asked() -> None:
    class Refusing(SystemResolver):
        async def _getaddrinfo(self, host: str) -> Sequence[tuple[Any, ...]]:
            raise AssertionError("getaddrinfo called for a literal")

    assert run(Refusing().resolve("10.1.2.3")) == ["10.1.2.3"]


# --- UDP / TCP ------------------------------------------------------------------------


def _udp(port: int, **kwargs: Any) -> UdpResolver:
    return UdpResolver("127.0.0.1", port, **kwargs)


def resolve_with(zone: Zone, host: str, **kwargs: Any) -> list[str]:
    async def main() -> list[str]:
        async with dns_server(zone) as port:
            return await _udp(port, **kwargs).resolve(host)

    return run(main())


def test_udp_both_families_ipv4_first() -> None:
    zone = Zone()
    assert resolve_with(zone, "both.test") == ["192.0.2.1", "2001:db8::1"]
    assert sorted(zone.queries) == [("udp", "both.test.", "A"), ("udp", "both.test.", "AAAA")]


def test_udp_one_family_is_enough() -> None:
    # An RRset is a set: order within one family is the server's business.
    assert sorted(resolve_with(Zone(), "v4only.test")) == ["192.0.2.2", "192.0.2.3"]
    assert resolve_with(Zone(), "v6only.test") == ["2001:db8::6"]


def test_cname_chain_is_followed() -> None:
    assert resolve_with(Zone(), "alias.test") == ["192.0.2.1", "2001:db8::1"]


def test_nxdomain() -> None:
    with pytest.raises(ResolveError) as info:
        resolve_with(Zone(), "missing.test")
    assert str(info.value) == "cannot resolve missing.test: NXDOMAIN"
    assert isinstance(info.value, OSError)


def test_no_address_records() -> None:
    with pytest.raises(ResolveError, match=r"^cannot resolve nodata\.test: no A or AAAA records$"):
        resolve_with(Zone(), "nodata.test")


def test_servfail() -> None:
    with pytest.raises(ResolveError, match=r"^cannot resolve servfail\.test: SERVFAIL$"):
        resolve_with(Zone(), "servfail.test")


def test_invalid_name() -> None:
    with pytest.raises(ResolveError, match="invalid name"):
        resolve_with(Zone(), "a" * 64 + ".test")


def test_truncated_udp_answer_is_retried_over_tcp() -> None:
    zone = Zone(truncate_udp=True)
    assert resolve_with(zone, "both.test") == ["192.0.2.1", "2001:db8::1"]
    protos = sorted(proto for proto, _, _ in zone.queries)
    assert protos == ["tcp", "tcp", "udp", "udp"]


def test_timeout_when_server_is_silent() -> None:
    zone = Zone(silent=True)
    started = time.monotonic()
    with pytest.raises(ResolveError) as info:
        resolve_with(zone, "both.test", timeout=0.3)
    assert str(info.value) == "cannot resolve both.test: timeout after 0.3s"
    assert time.monotonic() - started < 2


def test_lost_datagram_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdns, "UDP_RETRY_INTERVAL", 0.1)
    zone = Zone(drop_first_udp=1)
    assert sorted(resolve_with(zone, "v4only.test", timeout=3)) == ["192.0.2.2", "192.0.2.3"]
    assert len(zone.queries) == 3  # A, AAAA, and the one sent again


def test_server_not_listening_is_an_error() -> None:
    # Nobody listens on this port: ICMP "port unreachable" (asyncio) or a timeout (uvloop).
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ResolveError, match=r"^cannot resolve both\.test: "):
        run(UdpResolver("127.0.0.1", port, timeout=0.5).resolve("both.test"))


# --- cache ----------------------------------------------------------------------------


def test_cache_honours_ttl_and_case() -> None:
    zone = Zone()
    clock = FakeClock()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port, clock=clock)
            first = await resolver.resolve("both.test")
            clock.now += TTL - 1
            assert await resolver.resolve("BOTH.test") == first
            assert len(zone.queries) == 2
            clock.now += 2
            assert await resolver.resolve("both.test") == first
            assert len(zone.queries) == 4

    run(main())


def test_cache_ttl_is_capped_at_one_hour() -> None:
    zone = Zone()
    clock = FakeClock()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port, clock=clock)
            await resolver.resolve("long.test")
            clock.now += 3599
            await resolver.resolve("long.test")
            assert len(zone.queries) == 2
            clock.now += 2
            await resolver.resolve("long.test")
            assert len(zone.queries) == 4

    run(main())


def test_cache_uses_smallest_ttl_of_the_chain() -> None:
    zone = Zone()
    zone.ttls["alias.test."] = 10
    clock = FakeClock()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port, clock=clock)
            await resolver.resolve("alias.test")
            clock.now += 11
            await resolver.resolve("alias.test")
            assert len(zone.queries) == 4

    run(main())


def test_zero_ttl_and_failures_are_not_cached() -> None:
    zone = Zone()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port)
            await resolver.resolve("zero.test")
            await resolver.resolve("zero.test")
            assert len(zone.queries) == 4
            for _ in range(2):
                with pytest.raises(ResolveError, match="NXDOMAIN"):
                    await resolver.resolve("missing.test")
            assert len(zone.queries) == 8
            resolver.clear_cache()

    run(main())


def test_clear_cache() -> None:
    zone = Zone()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port)
            await resolver.resolve("both.test")
            resolver.clear_cache()
            await resolver.resolve("both.test")
            assert len(zone.queries) == 4

    run(main())


def test_concurrent_lookups_share_one_query() -> None:
    zone = Zone()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port)
            results = await asyncio.gather(*(resolver.resolve("both.test") for _ in range(5)))
            assert all(r == ["192.0.2.1", "2001:db8::1"] for r in results)
            assert len(zone.queries) == 2

    run(main())


def test_cancelled_waiter_does_not_cancel_the_shared_lookup() -> None:
    zone = Zone()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port)
            first = asyncio.ensure_future(resolver.resolve("both.test"))
            second = asyncio.ensure_future(resolver.resolve("both.test"))
            await asyncio.sleep(0)
            first.cancel()
            assert await second == ["192.0.2.1", "2001:db8::1"]
            with pytest.raises(asyncio.CancelledError):
                await first

    run(main())


def test_cache_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mdns, "MAX_CACHE_ENTRIES", 2)
    zone = Zone()

    async def main() -> None:
        async with dns_server(zone) as port:
            resolver = _udp(port)
            for name in ("both.test", "v4only.test", "v6only.test"):
                await resolver.resolve(name)
            assert len(resolver._cache) == 2
            assert "both.test" not in resolver._cache

    run(main())


# --- system resolver ------------------------------------------------------------------


def test_system_resolver_localhost() -> None:
    addresses = run(SystemResolver().resolve("localhost"))
    assert addresses
    assert set(addresses) <= {"127.0.0.1", "::1"}


def test_system_resolver_error_and_order() -> None:
    calls: list[str] = []

    class Fake(SystemResolver):
        async def _getaddrinfo(self, host: str) -> Sequence[tuple[Any, ...]]:
            calls.append(host)
            if host == "bad.example":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
            ]

    clock = FakeClock()
    resolver = Fake(clock=clock)
    # getaddrinfo's order (RFC 6724) is kept, duplicates dropped.
    assert run(resolver.resolve("good.example")) == ["2001:db8::1", "192.0.2.1"]
    assert run(resolver.resolve("good.example")) == ["2001:db8::1", "192.0.2.1"]
    assert calls == ["good.example"]
    clock.now += mdns.SYSTEM_CACHE_TTL + 1
    run(resolver.resolve("good.example"))
    assert calls == ["good.example", "good.example"]
    with pytest.raises(ResolveError) as info:
        run(resolver.resolve("bad.example"))
    assert str(info.value) == "cannot resolve bad.example: Name or service not known"


def test_system_resolver_timeout() -> None:
    class Slow(SystemResolver):
        async def _getaddrinfo(self, host: str) -> Sequence[tuple[Any, ...]]:
            await asyncio.sleep(5)
            return []

    with pytest.raises(ResolveError, match=r"^cannot resolve slow\.example: timeout after 0\.2s$"):
        run(Slow(timeout=0.2).resolve("slow.example"))


# --- DNS-over-TLS ---------------------------------------------------------------------


def test_dot(pki: Pki) -> None:
    zone = Zone()

    async def main() -> list[str]:
        async with dot_server(zone, pki.server) as port:
            return await TlsResolver("127.0.0.1", port, ssl_context=pki.client).resolve("both.test")

    assert run(main()) == ["192.0.2.1", "2001:db8::1"]
    assert sorted(zone.queries) == [("dot", "both.test.", "A"), ("dot", "both.test.", "AAAA")]


def test_dot_server_by_name_and_nxdomain(pki: Pki) -> None:
    zone = Zone()

    async def main() -> None:
        async with dot_server(zone, pki.server) as port:
            # "localhost" is resolved by the system resolver; ::1 (if listed) refuses,
            # 127.0.0.1 then answers: the bootstrap tries addresses in turn.
            resolver = make_resolver(f"tls://localhost:{port}", ssl_context=pki.client)
            assert await resolver.resolve("v6only.test") == ["2001:db8::6"]
            with pytest.raises(ResolveError, match=r"^cannot resolve missing\.test: NXDOMAIN$"):
                await resolver.resolve("missing.test")

    run(main())


def test_dot_untrusted_certificate(pki: Pki) -> None:
    zone = Zone()

    async def main() -> None:
        async with dot_server(zone, pki.server) as port:
            # The default context trusts only the system store, not our test CA.
            with pytest.raises(ResolveError, match="certificate verification failed"):
                await TlsResolver("127.0.0.1", port).resolve("both.test")

    run(main())
    assert zone.queries == []


def test_dot_certificate_for_another_name(pki: Pki) -> None:
    other = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("other.test").configure_cert(other)

    async def main() -> None:
        async with dot_server(Zone(), other) as port:
            resolver = TlsResolver("127.0.0.1", port, ssl_context=pki.client)
            with pytest.raises(ResolveError, match="certificate verification failed: IP address"):
                await resolver.resolve("both.test")

    run(main())


def test_dot_server_down() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused

        with pytest.raises(ResolveError, match=r"^cannot resolve both\.test: cannot connect"):
            run(TlsResolver("127.0.0.1", port).resolve("both.test"))


# --- DNS-over-HTTPS -------------------------------------------------------------------


def doh_resolve(
    pki: Pki, how: DohBehaviour, host: str, *, path: str = "", zone: Zone | None = None
) -> list[str]:
    zone = zone or Zone()

    async def main() -> list[str]:
        async with doh_server(zone, pki.server, how) as port:
            resolver = make_resolver(f"https://127.0.0.1:{port}{path}", ssl_context=pki.client)
            return await resolver.resolve(host)

    return run(main())


def test_doh_post(pki: Pki) -> None:
    how = DohBehaviour()
    assert doh_resolve(pki, how, "both.test") == ["192.0.2.1", "2001:db8::1"]
    assert how.connections == 1  # both questions over one keep-alive connection
    assert len(how.requests) == 2
    for request in how.requests:
        assert request["request-line"] == "POST /dns-query HTTP/1.1"
        assert request["content-type"] == "application/dns-message"
        assert request["accept"] == "application/dns-message"
        assert request["host"] == f"127.0.0.1:{request['host'].rsplit(':', 1)[1]}"


def test_doh_custom_path_and_chunked_answer(pki: Pki) -> None:
    how = DohBehaviour(chunked=True)
    assert doh_resolve(pki, how, "alias.test", path="/q/custom") == ["192.0.2.1", "2001:db8::1"]
    assert how.requests[0]["request-line"] == "POST /q/custom HTTP/1.1"


def test_doh_connection_close_reconnects(pki: Pki) -> None:
    how = DohBehaviour(close_each=True)
    assert doh_resolve(pki, how, "both.test") == ["192.0.2.1", "2001:db8::1"]
    assert how.connections == 2


def test_doh_nxdomain(pki: Pki) -> None:
    with pytest.raises(ResolveError, match=r"^cannot resolve missing\.test: NXDOMAIN$"):
        doh_resolve(pki, DohBehaviour(), "missing.test")


def test_doh_http_error(pki: Pki) -> None:
    with pytest.raises(ResolveError, match=r"^cannot resolve both\.test: .*HTTP 500$"):
        doh_resolve(pki, DohBehaviour(status=500), "both.test")


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"SMTP ready\r\n\r\n", "malformed HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "bad DNS message"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "closed the connection"),
        (b"HTTP/1.1 200 OK\r\nBroken header\r\n\r\n", "malformed HTTP header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n", "too large"),
    ],
)
def test_doh_garbage(pki: Pki, garbage: bytes, reason: str) -> None:
    with pytest.raises(ResolveError, match=reason):
        doh_resolve(pki, DohBehaviour(garbage=garbage), "both.test")


def test_doh_untrusted_certificate(pki: Pki) -> None:
    how = DohBehaviour()

    async def main() -> None:
        async with doh_server(Zone(), pki.server, how) as port:
            with pytest.raises(ResolveError, match="certificate verification failed"):
                await HttpsResolver("127.0.0.1", port).resolve("both.test")

    run(main())
    assert how.requests == []


def test_doh_request_head_host_header() -> None:
    assert b"Host: 1.1.1.1\r\n" in HttpsResolver("1.1.1.1")._request_head(10)
    assert b"Host: [2001:db8::1]:8443\r\n" in HttpsResolver("2001:db8::1", 8443)._request_head(1)


# --- the HTTP response reader against hostile bytes -----------------------------------


async def _read_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader = asyncio.StreamReader(limit=mdns._MAX_HTTP_HEAD)
    reader.feed_data(data)
    reader.feed_eof()
    return await mdns._read_http_response(reader)


def _parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    return run(_read_response(data))


def test_http_reader_variants() -> None:
    assert _parse(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    ) == (
        200,
        {"content-length": "2"},
        b"ok",
    )
    # No length: the body runs to the end of the connection.
    assert _parse(b"HTTP/1.0 200 OK\nX-A: 1\nX-A: 2\n\nbody")[1:] == ({"x-a": "1, 2"}, b"body")
    status, _, body = _parse(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert (status, body) == (200, b"abc")


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 5000 + b"\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 70000,
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"",
    ],
)
def test_http_reader_rejects(data: bytes) -> None:
    with pytest.raises(mdns._QueryError):
        _parse(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "DNS-over-HTTPS server closed the connection early"),
        (
            b"SMTP ready\r\n\r\n",
            "malformed HTTP status line from DNS-over-HTTPS server: 'SMTP ready'",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
            "bad chunk size from DNS-over-HTTPS server: '0x5'",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n",
            "DNS-over-HTTPS server closed the connection early",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab",
            "DNS-over-HTTPS server closed the connection mid-body",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n",
            "DNS-over-HTTPS answer too large: 70000 bytes",
        ),
    ],
)
def test_http_reader_speaks_of_the_doh_server(data: bytes, message: str) -> None:
    with pytest.raises(mdns._QueryError) as info:
        _parse(data)
    assert str(info.value) == message


def test_http_reader_keeps_a_kept_alive_connection_in_step() -> None:
    """Trailers after the last chunk are consumed, so the next answer reads cleanly."""

    async def main() -> list[tuple[int, Any, bytes]]:
        reader = asyncio.StreamReader(limit=mdns._MAX_HTTP_HEAD)
        reader.feed_data(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2;ext\r\nab\r\n0\r\nX-Trailer: 1\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\ncd"
        )
        reader.feed_eof()
        return [await mdns._read_http_response(reader) for _ in range(3)]

    first, second, third = run(main())
    assert (first[0], first[2]) == (200, b"ab")
    assert (second[0], second[2]) == (204, b"")
    assert (third[0], third[2]) == (200, b"cd")


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from(
                [
                    b"HTTP/1.1 200 OK\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    b"HTTP/1.1 101 Switching\r\n\r\n",
                ]
            ),
            st.binary(max_size=200),
        ),
    )
)
def test_fuzz_http_reader(data: bytes) -> None:
    try:
        status, headers, body = _parse(data)
    except mdns._QueryError:
        return
    assert 200 <= status <= 999 or status < 100
    assert len(body) <= 65535
    assert all(key == key.lower() for key in headers)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_dns_answer_from_doh(pki: Pki, payload: bytes) -> None:
    """Whatever a DoH server returns as the body, resolve() raises only ResolveError."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
    try:
        doh_resolve(pki, DohBehaviour(garbage=head + payload), "both.test")
    except ResolveError:
        pass


def test_fuzz_dns_answers_unit() -> None:
    """_read_answer on every rcode and on responses without a question."""
    query = dns.message.make_query("both.test", "A")
    for rcode in range(0, 12):
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.Rcode(rcode))
        found, _, reason = mdns._MessageResolver._read_answer(response)
        assert found == []
        assert (reason is None) == (rcode == 0)
    bare = dns.message.Message()
    assert mdns._MessageResolver._read_answer(bare)[2] == "answer is not a query response"


def test_dns_server_name_that_does_not_resolve() -> None:
    class NoBootstrap(TlsResolver):
        async def _server_addresses(self) -> list[str]:
            self._bootstrap = _FailingSystem()
            return await super()._server_addresses()

    class _FailingSystem(SystemResolver):
        async def _getaddrinfo(self, host: str) -> Sequence[tuple[Any, ...]]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ResolveError) as info:
        run(NoBootstrap("dns.example").resolve("both.test"))
    assert str(info.value) == (
        "cannot resolve both.test: DNS server address: "
        "cannot resolve dns.example: Name or service not known"
    )
