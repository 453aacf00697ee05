"""Seed inputs for every target, built from real sources.

- hellos: the test suite's builders (``tests/support/client.py``): plain, GREASE, no SNI,
  several names, Chrome's and Telegram Android's post-quantum layouts, signed with the
  harnesses' secret and clock so the fuzzer starts past the HMAC;
- PROXY v1/v2 headers as haproxy sends them (TCP4, TCP6, UNKNOWN, LOCAL, v2 with TLVs);
- DNS answers built with dnspython (A, AAAA, CNAME chains, NXDOMAIN, SERVFAIL, truncated),
  also framed as an HTTP/1.1 and an HTTP/2 DoH answer;
- ``config.example.toml`` and a handful of broken configs;
- the fronting site's ServerHellos as the tests build them (``tests/unit/test_serverhello.py``).

Every input is in the framing its harness reads (its control bytes first, see each
``fuzz.targets`` module). Files are named ``seed-<sha256 prefix>``; the builders' random
bytes come from a fixed generator, so the same checkout writes the same files.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from fuzz import ROOT, TARGETS
from fuzz.targets import NOW, SECRET_HEX

REPO = ROOT.parent
SNI = "storage.googleapis.com"


@contextmanager
def _fixed_random(seed: int) -> Iterator[Callable[[int], bytes]]:
    """The test builders' ``os.urandom`` and X25519 keys from one seeded generator."""
    from tests.support import client

    rng = random.Random(seed)
    with (
        mock.patch.object(client, "os", SimpleNamespace(urandom=rng.randbytes)),
        mock.patch.object(client, "x25519_public_key", lambda: rng.randbytes(32)),
    ):
        yield rng.randbytes


def _key() -> bytes:
    from mtgworkers.protocol.secret import Secret

    return Secret.parse(SECRET_HEX).key


def hellos() -> list[bytes]:
    """FakeTLS ClientHello records signed with the harnesses' secret at their clock."""
    from tests.support.client import build_client_hello, build_layout_hello

    key = _key()
    with _fixed_random(1) as urandom:
        out = [
            build_client_hello(key, SNI, timestamp=NOW, session_id=urandom(32)),
            build_client_hello(key, SNI, timestamp=NOW, session_id=urandom(32), grease=True),
            build_client_hello(key, None, timestamp=NOW, session_id=urandom(32)),
            build_client_hello(key, [SNI, "example.com"], timestamp=NOW, session_id=b""),
            build_client_hello(key, SNI, timestamp=NOW - 3600, session_id=urandom(32)),
            build_layout_hello(key, SNI, "chrome", timestamp=NOW),
            build_layout_hello(key, SNI, "android", timestamp=NOW),
            build_layout_hello(key, None, "chrome", timestamp=NOW),
        ]
    return out


def _split_hello(record: bytes, at: int) -> bytes:
    """One hello record as two handshake records (the message cut at ``at``)."""
    message = record[5:]
    return b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
        for part in (message[:at], message[at:])
    )


def _clienthello() -> list[bytes]:
    records = hellos()
    out = [b"\x01" + r for r in records]  # eof: decide
    out += [b"\x00" + records[0][:300], b"\x03" + records[4]]  # incomplete; old clock
    out.append(b"\x01" + _split_hello(records[0], 200))
    return out


def proxy_headers() -> list[bytes]:
    """PROXY protocol headers as haproxy writes them (v1 text, v2 binary with TLVs)."""
    from mtgworkers.protocol import proxyproto

    sig = b"\r\n\r\n\x00\r\nQUIT\n"

    def v2(command: int, family: int, body: bytes) -> bytes:
        return sig + bytes((0x20 | command, family)) + struct.pack(">H", len(body)) + body

    def tlv(kind: int, value: bytes) -> bytes:
        return struct.pack(">BH", kind, len(value)) + value

    ipv4 = bytes((198, 51, 100, 7)) + bytes((203, 0, 113, 1)) + struct.pack(">HH", 40000, 443)
    ipv6 = (
        bytes.fromhex("20010db8000000000000000000000007")
        + bytes.fromhex("20010db8000000000000000000000001")
        + struct.pack(">HH", 40000, 443)
    )
    tlvs = (
        tlv(0x01, b"h2")  # ALPN
        + tlv(0x02, SNI.encode())  # authority
        + tlv(0x05, b"\x00\x01\x02\x03")  # unique id
        + tlv(0x20, b"\x07\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))  # SSL with version
        + tlv(0x04, b"\x00\x00")  # NOOP
    )
    return [
        b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\n\x16\x03\x01",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        v2(0x1, 0x11, ipv4),  # PROXY, TCP over IPv4
        v2(0x1, 0x21, ipv6),  # PROXY, TCP over IPv6
        v2(0x1, 0x11, ipv4 + tlvs),
        v2(0x0, 0x00, b""),  # LOCAL (a health check)
        v2(0x1, 0x12, ipv4),  # UDP over IPv4
        v2(0x1, 0x31, bytes(108) + bytes(108)),  # AF_UNIX
        proxyproto.build_v2(("198.51.100.7", 40000), ("203.0.113.1", 443)) + b"\x16\x03\x01",
        proxyproto.build_v2(("2001:db8::7", 40000), ("2001:db8::1", 443)),
    ]


def dns_answers() -> list[tuple[int, bytes, bytes]]:
    """(flags for the dns harness, answer to A, answer to AAAA) built with dnspython."""
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    from fuzz.targets.dns import NAME, QUERIES

    a_query, aaaa_query = QUERIES

    def answer(
        query: dns.message.Message,
        *rrsets: dns.rrset.RRset,
        rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    ) -> bytes:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        response.answer.extend(rrsets)
        return response.to_wire(want_shuffle=False)

    def rr(name: object, kind: str, *values: str, ttl: int = 300) -> dns.rrset.RRset:
        return dns.rrset.from_text(str(name), ttl, "IN", kind, *values)

    chain = (
        rr(NAME, "CNAME", "storage.l.googleusercontent.com."),
        rr("storage.l.googleusercontent.com.", "CNAME", "edge.example.net.", ttl=60),
    )
    truncated = dns.message.make_response(a_query)
    truncated.flags |= dns.flags.TC
    return [
        (
            0,
            answer(a_query, rr(NAME, "A", "142.250.74.91", "142.250.74.123")),
            answer(aaaa_query, rr(NAME, "AAAA", "2a00:1450:4001:82b::201b")),
        ),
        (
            0,
            answer(a_query, *chain, rr("edge.example.net.", "A", "203.0.113.9", ttl=30)),
            answer(aaaa_query, *chain),
        ),
        (
            0,
            answer(a_query, rcode=dns.rcode.NXDOMAIN),
            answer(aaaa_query, rcode=dns.rcode.NXDOMAIN),
        ),
        (0, answer(a_query, rcode=dns.rcode.SERVFAIL), answer(aaaa_query)),
        (2, truncated.to_wire(), answer(aaaa_query)),
        (1, answer(aaaa_query, rr(NAME, "AAAA", "::1")), answer(a_query, rr(NAME, "A", "0.0.0.0"))),
    ]


def _dns() -> list[bytes]:
    return [bytes((flags,)) + a + b"\xff\xfe" + aaaa for flags, a, aaaa in dns_answers()]


def _http() -> list[bytes]:
    _, a, _ = dns_answers()[0]
    return [
        b"\x0e"
        + b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 26\r\n"
        + b"Connection: close\r\n\r\n# FireHOL list\n1.2.3.0/24\n",
        b"\x0e" + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"\x0e" + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"\x02" + b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://example.com/\r\n\r\n",
        b"\x1e"
        + b"HTTP/1.1 200 OK\r\nContent-Type: application/dns-message\r\n"
        + f"Content-Length: {len(a)}\r\n\r\n".encode()
        + a,
        b"\x12" + b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ]


def _doh_h2() -> list[bytes]:
    """The server's side of an HTTP/2 DoH exchange, answered by an h2 server."""
    import h2.config
    import h2.connection
    import h2.events

    from fuzz.targets import doh_h2
    from fuzz.targets.dns import QUERIES, RESOLVER
    from mtgworkers.net import dns as dns_module

    out = []
    for index, (_, a, aaaa) in enumerate(dns_answers()[:3]):
        client = h2.connection.H2Connection(dns_module._H2_CONFIG)
        client.initiate_connection()
        for query in QUERIES:
            stream_id = client.get_next_available_stream_id()
            wire = query.to_wire()
            client.send_headers(stream_id, RESOLVER._h2_request_headers(len(wire)))
            client.send_data(stream_id, wire, end_stream=True)
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        ids = [
            e.stream_id
            for e in server.receive_data(client.data_to_send())
            if isinstance(e, h2.events.RequestReceived)
        ]
        for stream_id, body in zip(ids, (a, aaaa), strict=True):
            status = "200" if index < 2 else "502"
            server.send_headers(
                stream_id,
                [
                    (":status", status),
                    ("content-type", "application/dns-message"),
                    ("content-length", str(len(body))),
                ],
            )
            server.send_data(stream_id, body, end_stream=True)
        out.append(bytes((index * 3,)) + server.data_to_send())
    assert max(map(len, out)) <= doh_h2.MAX_LEN
    return out


def _obfs2() -> list[bytes]:
    from tests.support.wire import TAGS, obfs2_client_frame

    key = _key()
    rng = random.Random(2)
    out = []
    for dc, tag in ((2, "dd"), (-4, "ee"), (203, "ef")):
        out.append(obfs2_client_frame(key, dc, TAGS[tag], urandom=rng.randbytes).wire)
    out.append(out[0][:64] + b"\x01")  # the harness re-validates the tag
    return out


def _handshake() -> list[bytes]:
    """Whole client streams: [PROXY header] hello, CCS, the obfuscated2 frame, payload."""
    from tests.support.wire import CCS_RECORD, TAGS, obfs2_client_frame, wrap_records

    key = _key()
    rng = random.Random(3)
    records = hellos()
    frame = obfs2_client_frame(key, 2, TAGS["dd"], urandom=rng.randbytes).wire
    tail = CCS_RECORD + wrap_records(frame + b"\x00" * 40)
    header = proxy_headers()[4]
    return [
        b"\x00\x00" + records[0] + tail,  # a client, in one piece
        b"\x00\x05" + records[5] + tail,  # chrome's hello, cut into 64-byte pieces
        b"\x00\x01" + records[6] + CCS_RECORD,  # android, byte by byte, no frame yet
        b"\x03\x02" + header + records[1] + tail,  # PROXY header first
        b"\x10\x00" + records[2] + tail,  # a replayed session id
        b"\x20\x03" + records[0] + tail,  # with a learned shape
        b"\x0c\x06" + records[4] + tail,  # old clock, re-signed, frame made valid
        b"\x00\x00" + b"GET / HTTP/1.1\r\nHost: " + SNI.encode() + b"\r\n\r\n",  # fronted
    ]


def _records() -> list[bytes]:
    from mtgworkers.protocol import faketls

    payload = bytes(range(256)) * 4
    return [
        b"\x00" + faketls.wrap_application_data(payload, 1000),
        b"\x05" + b"\x14\x03\x03\x00\x01\x01" + faketls.wrap_application_data(payload, 300),
        b"\x07" + faketls.wrap_application_data(b"x" * 20000, 16384),
        b"\x01" + b"\x17\x03\x03\x00\x04ping\x15\x03\x03\x00\x02\x02\x28",
        b"\x02" + b"\x17\x03\x01\x00\x04ping",  # wrong version
    ]


def _serverhello() -> list[bytes]:
    from mtgworkers.protocol import faketls
    from tests.unit.test_serverhello import KEY_SHARE_X25519, site_hello

    exts = ((0x002B, b"\x03\x04"), (0x0033, KEY_SHARE_X25519))
    ccs = b"\x14\x03\x03\x00\x01\x01"
    four = b"".join(site_hello(suite, exts) + ccs for suite in (0x1301, 0x1303, 0x1302, 0x1301))
    hello = faketls.read_client_hello(hellos()[0])
    assert hello is not None
    ours = faketls.build_server_hello(hello[0], _key(), urandom=lambda n: bytes(n))
    hrr_random = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
    return [
        b"\x03" + four,  # four probe answers: a suite rule
        b"\x00" + site_hello(0x1302, exts, records=3),
        b"\x00" + site_hello(0x1301, exts, random=hrr_random),  # HelloRetryRequest
        b"\x00" + site_hello(0xC02F, ((0xFF01, b"\x00"), (0x000B, b"\x01\x00"))),  # TLS 1.2
        b"\x00" + site_hello(0x1301, ()),
        b"\x00" + b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
        b"\x00" + ours,  # our own answer
    ]


def _socks5() -> list[bytes]:
    ipv4 = b"\x05\x00\x00\x01" + bytes((149, 154, 167, 51)) + struct.pack(">H", 443)
    ipv6 = b"\x05\x00\x00\x04" + bytes.fromhex("20010b28f23df001000000000000000a") + b"\x01\xbb"
    name = b"\x05\x00\x00\x03" + bytes((len(SNI),)) + SNI.encode() + b"\x20\xfb"
    return [
        b"\x00" + b"\x05\x00" + ipv4,
        b"\x03" + b"\x05\x02" + b"\x01\x00" + ipv4,  # user/pass accepted
        b"\x03" + b"\x05\x02" + b"\x01\x01",  # user/pass refused
        b"\x02" + b"\x05\x00" + ipv6,
        b"\x04" + b"\x05\x00" + name,
        b"\x00" + b"\x05\xff",  # no acceptable method
        b"\x00" + b"\x05\x00" + b"\x05\x05\x00\x01" + bytes(6),  # connection refused
    ]


def _netset() -> list[bytes]:
    return [
        b"#\n# firehol_level1\n#\n# Source: example\n#\n0.0.0.0/8\n1.10.16.0/20\n"
        b"5.188.10.0/23\n192.0.2.1\n2001:db8::/32\n::ffff:10.0.0.0/104\n",
        b"10.0.0.0/8 # private\n\n  172.16.0.0/12\r\n192.168.0.0/16\n",
        b"1.2.3.4/33\nnot an address\n300.1.1.1\n1.2.3.4\n",
        "::/0\n0.0.0.0/0\nfe80::1%eth0\n\u00e9\n".encode(),
    ]


def _config() -> list[bytes]:
    example = (REPO / "config.example.toml").read_bytes()
    secret = SECRET_HEX
    return [
        example,
        f'secret = "{secret}"\nbind-to = "0.0.0.0:443"\n'.encode(),
        f'secret = "{secret}"\nbind-to = "0.0.0.0:443"\n[network]\ntimeout = "1m30s"\n'.encode(),
        b'secret = "not hex"\nbind-to = "0.0.0.0:443"\n',  # a bad secret
        f'secret = "{secret}"\nbind-to = 443\n'.encode(),  # a wrong type
        f'secret = "{secret}"\nbind-to = "0.0.0.0:443"\nnot-a-key = 1\n'.encode(),  # unknown
        f'secret = "{secret}"\nbind-to = "0.0.0.0:443"\nconcurrency = {"9" * 5000}\n'.encode(),
        b'secret = "\xff\xfe"\n',  # not UTF-8
        b"a = " + b"[" * 2000 + b"]" * 2000 + b"\n",  # nested too deeply
        b'[[x]]\n[x]\nsecret = "',  # a syntax error
    ]


BUILDERS: dict[str, Callable[[], list[bytes]]] = {
    "clienthello": _clienthello,
    "records": _records,
    "obfs2": _obfs2,
    "proxyproto": lambda: [b for b in proxy_headers()],
    "socks5": _socks5,
    "dns": _dns,
    "doh_h2": _doh_h2,
    "netset": _netset,
    "config": _config,
    "serverhello": _serverhello,
    "http": _http,
    "handshake": _handshake,
}
assert set(BUILDERS) == set(TARGETS)


def seed_name(data: bytes) -> str:
    return "seed-" + hashlib.sha256(data).hexdigest()[:16]


def build_seeds(targets: list[str] | None = None) -> dict[str, list[bytes]]:
    """target -> its seed inputs (each within the harness's ``MAX_LEN``)."""
    from fuzz.targets import load

    out = {}
    for name in targets or list(TARGETS):
        limit = load(name).MAX_LEN
        out[name] = [data for data in BUILDERS[name]() if len(data) <= limit]
    return out


def write_seeds(dest: Path, targets: list[str] | None = None) -> dict[str, int]:
    """Write the seeds into ``dest/<target>/``; target -> how many files are new there."""
    written = {}
    for name, seeds in build_seeds(targets).items():
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        new = 0
        for data in seeds:
            path = folder / seed_name(data)
            if not path.exists():
                path.write_bytes(data)
                new += 1
        written[name] = new
    return written
