"""Self-tests of the e2e kit (tests/support): no proxy needed.

The kit is a second, independent implementation of the client and DC sides of the
protocol; these tests pin it to docs/protocol.md and to mtg's own vectors so that an e2e
failure points at the proxy, not at the kit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.ciphers import CipherContext

from tests.support.client import (
    DEFAULT_CIPHERS,
    build_client_hello,
    hello_timestamp,
    parse_server_hello,
    run_concurrently,
)
from tests.support.fakedc import FakeDC, closed_port
from tests.support.proxy import deep_merge, make_config, to_toml
from tests.support.vectors import MTG_VECTORS
from tests.support.website import BODY, HOSTNAME, Website, https_get, https_get_wrapped
from tests.support.wire import (
    CCS_RECORD,
    TAG_ABRIDGED,
    TAG_INTERMEDIATE,
    TAG_PADDED,
    Pattern,
    WireError,
    aes_ctr,
    is_forbidden_frame,
    obfs2_client_frame,
    obfs2_dc_frame,
    random_frame,
    recv_exactly,
    wrap_records,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VECTORS = MTG_VECTORS
VECTOR_KEY = bytes.fromhex("367a189aee18fa31c190054efd4a8e95")
VECTOR_HOST = "storage.googleapis.com"


def b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


# -- an independent reading of a ClientHello (docs/protocol.md §3.2) -------------------------
@dataclass
class ParsedHello:
    random: bytes
    session_id: bytes
    suites: list[int]
    cipher: int
    extensions: dict[int, bytes]
    sni: list[str]


def parse_hello(record: bytes) -> ParsedHello:
    """Minimal ClientHello parser written in the test, per docs/protocol.md §3.1-3.2."""
    assert record[0:3] == b"\x16\x03\x01"
    assert int.from_bytes(record[3:5], "big") == len(record) - 5
    assert record[5] == 0x01
    body_len = int.from_bytes(record[6:9], "big")
    body = record[9:]
    assert len(body) == body_len
    pos = 2
    random_ = body[pos : pos + 32]
    pos += 32
    sid = body[pos + 1 : pos + 1 + body[pos]]
    pos += 1 + body[pos]
    n = int.from_bytes(body[pos : pos + 2], "big")
    suites = [int.from_bytes(body[pos + 2 + i : pos + 4 + i], "big") for i in range(0, n, 2)]
    pos += 2 + n
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    assert pos + ext_len == len(body)
    exts: dict[int, bytes] = {}
    while pos < len(body):
        t = int.from_bytes(body[pos : pos + 2], "big")
        ln = int.from_bytes(body[pos + 2 : pos + 4], "big")
        exts.setdefault(t, body[pos + 4 : pos + 4 + ln])
        pos += 4 + ln
    names = []
    if 0 in exts:
        sni = exts[0]
        assert sni[2] == 0
        p = 3
        while p < len(sni):
            ln = int.from_bytes(sni[p : p + 2], "big")
            names.append(sni[p + 2 : p + 2 + ln].decode())
            p += 2 + ln + 1
    chosen = next(s for s in suites if (s & 0x0F0F) != 0x0A0A)
    return ParsedHello(random_, sid, suites, chosen, exts, names)


def independent_timestamp(record: bytes, key: bytes) -> int | None:
    """docs/protocol.md §3.3, restated here without using the kit's helper."""
    canon = record[:11] + b"\x00" * 32 + record[43:]
    mac = hmac.new(key, canon, hashlib.sha256).digest()
    x = bytes(a ^ b for a, b in zip(mac, record[11:43], strict=True))
    return int.from_bytes(x[28:], "little") if x[:28] == b"\x00" * 28 else None


# -- ClientHello ------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(VECTORS.glob("client-hello-*.json")), ids=lambda p: p.name)
def test_hello_digest_check_agrees_with_mtg_vectors(path: Path) -> None:
    vector = json.loads(path.read_text())
    full = base64.b64decode(vector["full"])
    expected = vector["time"] if path.name.startswith("client-hello-ok") else None
    assert hello_timestamp(full, VECTOR_KEY) == expected
    assert independent_timestamp(full, VECTOR_KEY) == expected
    if expected is not None:
        parsed = parse_hello(full)
        assert parsed.cipher == vector["cipherSuite"]
        assert parsed.session_id == base64.b64decode(vector["sessionId"])
        assert parsed.sni == [VECTOR_HOST]


def test_built_hello_has_the_size_and_shape_of_the_captured_ones() -> None:
    vector = json.loads((VECTORS / "client-hello-ok-19dfe38384b9884b.json").read_text())
    captured = base64.b64decode(vector["full"])
    ours = build_client_hello(VECTOR_KEY, VECTOR_HOST, timestamp=vector["time"])
    assert len(ours) == len(captured) == 517
    assert ours[:11] == captured[:11]  # record + handshake header, client_version


def test_built_hello_digest_and_fields() -> None:
    key = os.urandom(16)
    sid = os.urandom(32)
    now = int(time.time())
    record = build_client_hello(key, HOSTNAME, timestamp=now, session_id=sid)
    assert len(record) == 517
    assert independent_timestamp(record, key) == now
    assert independent_timestamp(record, os.urandom(16)) is None
    parsed = parse_hello(record)
    assert parsed.session_id == sid
    assert parsed.sni == [HOSTNAME]
    assert parsed.cipher == 0x1301
    assert {0x1301, 0x1302, 0x1303} <= set(parsed.suites)
    exts = parsed.extensions
    for required in (0x0000, 0x000A, 0x000D, 0x0010, 0x0015, 0x002B, 0x0033):
        assert required in exts, hex(required)
    assert exts[0x0033][2:6] == b"\x00\x1d\x00\x20"
    assert b"\x03\x04" in exts[0x002B]


def test_built_hello_options() -> None:
    key = os.urandom(16)
    greasy = parse_hello(build_client_hello(key, HOSTNAME, grease=True))
    assert greasy.suites[0] == 0x5A5A
    assert greasy.cipher == 0x1301
    assert parse_hello(build_client_hello(key, None)).sni == []
    assert parse_hello(build_client_hello(key, ["a.test", HOSTNAME])).sni == [
        "a.test",
        HOSTNAME,
    ]
    stale = build_client_hello(key, HOSTNAME, timestamp=1_000_000)
    assert independent_timestamp(stale, key) == 1_000_000
    # Two hellos never share random or session id unless asked to.
    a, b = build_client_hello(key, HOSTNAME), build_client_hello(key, HOSTNAME)
    assert a[11:43] != b[11:43] and a[44:76] != b[44:76]
    assert list(DEFAULT_CIPHERS[:3]) == [0x1301, 0x1302, 0x1303]


# -- ServerHello verification (docs/protocol.md §3.7, built independently here) ---------------
def build_welcome(key: bytes, client_random: bytes, sid: bytes, suite: int, noise: int) -> bytes:
    sh = (
        b"\x03\x03"
        + b"\x00" * 32
        + bytes([len(sid)])
        + sid
        + suite.to_bytes(2, "big")
        + b"\x00"
        + b"\x00\x2e"
        + b"\x00\x2b\x00\x02\x03\x04"
        + b"\x00\x33\x00\x24\x00\x1d\x00\x20"
        + os.urandom(32)
    )
    hs = b"\x02" + len(sh).to_bytes(3, "big") + sh
    packet = bytearray(
        b"\x16\x03\x03"
        + len(hs).to_bytes(2, "big")
        + hs
        + CCS_RECORD
        + b"\x17\x03\x03"
        + noise.to_bytes(2, "big")
        + os.urandom(noise)
    )
    packet[11:43] = hmac.new(key, client_random + bytes(packet), hashlib.sha256).digest()
    return bytes(packet)


def test_server_hello_verification() -> None:
    key, crandom, sid = os.urandom(16), os.urandom(32), os.urandom(32)
    packet = build_welcome(key, crandom, sid, 0x1303, 2600)
    assert len(packet) == 127 + 6 + 5 + 2600
    info = parse_server_hello(packet, crandom, key, sid)
    assert (info.cipher_suite, info.noise_len, info.session_id) == (0x1303, 2600, sid)

    with pytest.raises(WireError, match="HMAC"):
        parse_server_hello(packet, crandom, os.urandom(16), sid)
    with pytest.raises(WireError, match="HMAC"):
        parse_server_hello(packet, os.urandom(32), key, sid)
    tampered = bytearray(packet)
    tampered[-1] ^= 1
    with pytest.raises(WireError, match="HMAC"):
        parse_server_hello(bytes(tampered), crandom, key, sid)
    with pytest.raises(WireError, match="session id"):
        parse_server_hello(packet, crandom, key, os.urandom(32))


# -- obfuscated2 --------------------------------------------------------------------------
def test_client_obfs2_reproduces_the_mtg_snapshot() -> None:
    snap = json.loads((VECTORS / "client-handshake-snapshot-4529d55776e2d427.json").read_text())
    secret, frame = b64(snap["secret"]), b64(snap["frame"])
    # Recover the plaintext the snapshot client started from (proxy-side derivation).
    dec = aes_ctr(hashlib.sha256(frame[8:40] + secret).digest(), frame[40:56])
    plain = dec.update(frame)
    assert plain[56:60] == TAG_PADDED
    assert int.from_bytes(plain[60:62], "little", signed=True) == snap["dc"] == 2
    # Our client, fed the same "random" bytes, must put the same bytes on the wire ...
    obfs = obfs2_client_frame(secret, 2, TAG_PADDED, urandom=lambda n: frame[:56] + plain[56:])
    assert obfs.wire == frame
    # ... and both stream directions must match mtg's recorded bytes.
    assert obfs.encryptor.update(b64(snap["decrypted"]["text"])) == b64(snap["decrypted"]["cipher"])
    assert obfs.decryptor.update(b64(snap["encrypted"]["cipher"])) == b64(snap["encrypted"]["text"])


def test_random_frames_avoid_forbidden_prefixes() -> None:
    assert is_forbidden_frame(b"\xef" + bytes(63))
    assert is_forbidden_frame(b"HEAD" + os.urandom(60))
    assert is_forbidden_frame(b"\x16\x03\x01\x02" + os.urandom(60))
    assert is_forbidden_frame(b"abcd\x00\x00\x00\x00" + os.urandom(56))
    for _ in range(200):
        assert not is_forbidden_frame(random_frame())
    fixed = iter([b"\xef" + bytes(63), b"ok!!" + b"\x01" * 60])
    assert bytes(random_frame(lambda n: next(fixed)))[:4] == b"ok!!"


def test_client_frame_carries_tag_and_signed_dc() -> None:
    secret = os.urandom(16)
    for tag in (TAG_PADDED, TAG_INTERMEDIATE, TAG_ABRIDGED):
        for dc in (1, -2, 5, 10003, -32768):
            obfs = obfs2_client_frame(secret, dc, tag)
            wire = obfs.wire
            dec = aes_ctr(hashlib.sha256(wire[8:40] + secret).digest(), wire[40:56])
            plain = dec.update(wire)
            assert plain[56:60] == tag
            assert int.from_bytes(plain[60:62], "little", signed=True) == dc
            assert wire[:56] == obfs.plain[:56]  # sent in the clear, as the spec says


# -- fake DC --------------------------------------------------------------------------------
def dc_session(
    port: int, dc: int, tag: bytes
) -> tuple[socket.socket, CipherContext, CipherContext]:
    wire, enc, dec = obfs2_dc_frame(dc, tag)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(wire)
    return sock, enc, dec


def test_fake_dc_echo_decodes_frames() -> None:
    with FakeDC("echo") as dc:
        for i, (num, tag) in enumerate(
            [(2, TAG_PADDED), (-4, TAG_INTERMEDIATE), (1, TAG_ABRIDGED)]
        ):
            sock, enc, dec = dc_session(dc.port, num, tag)
            with sock:
                payload = os.urandom(100_000)
                sock.sendall(enc.update(payload))
                echoed = dec.update(recv_exactly(sock, len(payload)))
                assert echoed == payload
            conn = dc.wait_for_connection(i)
            assert (conn.dc, conn.tag) == (num, tag)
            assert conn.closed.wait(5)
            assert conn.bytes_in == conn.bytes_out == len(payload)
        stats = dc.stats()
        assert stats["connections"] == stats["frames_seen"] == 3
        assert stats["bad_frames"] == 0 and stats["open"] == 0


def test_fake_dc_flags_bad_tag_and_short_frame() -> None:
    with FakeDC("echo") as dc:
        sock, _, _ = dc_session(dc.port, 2, b"\x01\x02\x03\x04")
        with sock:
            assert sock.recv(10) == b""  # closed by the DC
        with socket.create_connection(("127.0.0.1", dc.port), timeout=5) as short:
            short.sendall(os.urandom(10))
        assert dc.wait_for_connection(0).tag == b"\x01\x02\x03\x04"
        deadline = time.monotonic() + 5
        while len(dc.connections) < 2 or not dc.connections[1].closed.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert dc.stats()["bad_frames"] == 1
        assert "EOF after 10 bytes" in (dc.connections[1].error or "")


def test_fake_dc_sink_verifies_the_pattern() -> None:
    pattern = Pattern()
    with FakeDC("sink") as dc:
        sock, enc, _ = dc_session(dc.port, 3, TAG_PADDED)
        with sock:
            sock.sendall(enc.update(pattern.chunk(0, 300_000)))
        sock, enc, _ = dc_session(dc.port, 3, TAG_PADDED)
        with sock:
            bad = bytearray(pattern.chunk(0, 200_000))
            bad[150_001] ^= 0xFF
            sock.sendall(enc.update(bytes(bad)))
        good, broken = dc.wait_for_connection(0), dc.wait_for_connection(1)
        assert good.closed.wait(5) and broken.closed.wait(5)
        assert (good.bytes_in, good.mismatch_at) == (300_000, None)
        assert (broken.bytes_in, broken.mismatch_at) == (200_000, 150_001)


def test_fake_dc_source_sends_the_pattern() -> None:
    with FakeDC("source", source_size=1_000_003) as dc:
        sock, _, dec = dc_session(dc.port, 5, TAG_PADDED)
        with sock:
            data = dec.update(recv_exactly(sock, 1_000_003))
            assert Pattern().mismatch(0, data) is None
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        assert dc.wait_for_connection(0).bytes_out == 1_000_003


def test_closed_port_refuses() -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port()), timeout=2)


# -- website --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_website_serves_https_and_records_bytes(ca: trustme.CA) -> None:
    with Website(ca) as site:
        result = https_get("127.0.0.1", site.port, ca, HOSTNAME)
        assert result.status_line == b"HTTP/1.1 200 OK"
        assert result.body == BODY
        assert result.peer_cert is not None
        conn = site.wait_for_bytes(0, len(result.sent))
        assert bytes(conn.received) == result.sent
        assert conn.sni == HOSTNAME and conn.tls_established
        assert conn.requests[0].startswith(b"GET / HTTP/1.1")
        assert https_get_wrapped("127.0.0.1", site.port, ca, HOSTNAME) == (
            b"HTTP/1.1 200 OK",
            BODY,
        )


def test_website_certificate_is_checked(ca: trustme.CA) -> None:
    with Website(ca) as site:
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get("127.0.0.1", site.port, ca, "other.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get("127.0.0.1", site.port, trustme.CA(), HOSTNAME)


def test_website_records_non_tls_bytes(ca: trustme.CA) -> None:
    key = os.urandom(16)
    hello = build_client_hello(key, HOSTNAME)
    with Website(ca) as site:
        with socket.create_connection(("127.0.0.1", site.port), timeout=5) as sock:
            sock.sendall(hello)
            # A FakeTLS hello is a valid TLS 1.3 hello: the site answers with a ServerHello.
            head = recv_exactly(sock, 6)
            assert head[0] == 0x16 and head[5] == 0x02
            garbage = os.urandom(3000)
            sock.sendall(garbage)
            site.wait_for_bytes(0, len(hello) + len(garbage))
        conn = site.wait_closed(0)
        assert bytes(conn.received) == hello + garbage
        assert conn.tls_error is not None


# -- misc -----------------------------------------------------------------------------------
def test_pattern_and_records() -> None:
    p = Pattern()
    assert p.chunk(10, 100_000) == p.chunk(0, 100_010)[10:]
    data = bytearray(p.chunk(70_000, 1000))
    assert p.mismatch(70_000, data) is None
    data[500] ^= 1
    assert p.mismatch(70_000, data) == 70_500
    assert p.mismatch(70_001, p.chunk(70_000, 1000)) is not None
    records = wrap_records(os.urandom(40_000), 16379)
    assert records[0:5] == b"\x17\x03\x03" + (16379).to_bytes(2, "big")
    assert len(records) == 40_000 + 3 * 5


def test_toml_writer_round_trips() -> None:
    config = make_config(
        "ee" + "11" * 16 + "676f6f676c652e636f6d",
        bind_port=1234,
        dc_port=5678,
        fronting_port=9999,
        overrides={"network": {"timeout": {"idle": "1s"}}, "defense": {"anti-replay": {}}},
    )
    parsed = tomllib.loads(to_toml(config))
    assert parsed["bind-to"] == "127.0.0.1:1234"
    assert parsed["network"]["timeout"] == {"tcp": "2s", "handshake": "5s", "idle": "1s"}
    assert parsed["dc-overrides"]["-2" if "-2" in parsed["dc-overrides"] else "2"] == [
        "127.0.0.1:5678"
    ]
    assert parsed["domain-fronting"] == {"ip": "127.0.0.1", "port": 9999}
    assert parsed["defense"] == {"anti-replay": {}}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {
        "a": {"c": 2, "d": 3}
    }


def test_run_concurrently_keeps_order_and_raises() -> None:
    assert run_concurrently(20, lambda i: i * i) == [i * i for i in range(20)]

    def boom(i: int) -> int:
        if i == 3:
            raise ValueError("three")
        return i

    with pytest.raises(ValueError, match="three"):
        run_concurrently(5, boom)
