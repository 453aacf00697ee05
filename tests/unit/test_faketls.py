"""FakeTLS server side (docs/protocol.md §2, §3): ClientHello, ServerHello, record layer.

Uses mtg's ClientHello snapshots (tests/vectors/mtg, see tests/vectors/README.md) and
mirrors the cases of mtg's client_side_test.go, plus our own synthetic hellos signed the way
Telegram clients do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.protocol import faketls
from mtgworkers.protocol.errors import ProtocolError
from mtgworkers.protocol.faketls import (
    MAX_RECORD_PAYLOAD,
    BadDigest,
    BadTimestamp,
    ClientHello,
    RecordReader,
    TLSError,
    build_server_hello,
    read_client_hello,
    verify_client_hello,
    wrap_application_data,
)
from mtgworkers.protocol.secret import Secret
from tests.support.vectors import MTG_VECTORS

VECTORS = MTG_VECTORS
VECTOR_SECRET = Secret.parse(
    "ee367a189aee18fa31c190054efd4a8e9573746f726167652e676f6f676c65617069732e636f6d"
)
THIRTY_YEARS = 365 * 30 * 24 * 3600.0
OK_FILES = sorted(p.name for p in VECTORS.glob("client-hello-ok-*.json"))
BAD_FILES = sorted(p.name for p in VECTORS.glob("client-hello-bad-*.json"))


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def full_of(name: str) -> bytes:
    return base64.b64decode(load(name)["full"])


BASE = "client-hello-ok-19dfe38384b9884b.json"


# -- builders ------------------------------------------------------------------------------


def record(payload: bytes, rtype: int = 0x16, version: bytes = b"\x03\x01") -> bytes:
    return bytes((rtype,)) + version + struct.pack(">H", len(payload)) + payload


def fragment(full: bytes, n: int) -> bytes:
    """mtg's fragmentTLSRecord: payload cut in n roughly equal records."""
    payload = full[5:]
    size = len(payload) // n
    parts = [payload[i * size : (i + 1) * size if i < n - 1 else None] for i in range(n)]
    return b"".join(record(p) for p in parts)


def split_at(full: bytes, pos: int) -> bytes:
    """mtg's splitPayloadAt: two records, the first with payload[:pos]."""
    payload = full[5:]
    return record(payload[:pos]) + record(payload[pos:])


def sni_ext(names: list[bytes]) -> bytes:
    entries = b"".join(struct.pack(">H", len(n)) + n for n in names)
    data = struct.pack(">H", 1 + len(entries)) + b"\x00" + entries
    return b"\x00\x00" + struct.pack(">H", len(data)) + data


def make_body(
    *,
    random: bytes = bytes(32),
    session_id: bytes = b"S" * 32,
    suites: tuple[int, ...] = (0x1301, 0x1302),
    names: list[bytes] | None = None,
    extensions: bytes | None = None,
) -> bytes:
    if extensions is None:
        others = b"\x00\x17\x00\x00" + b"\x00\x2b\x00\x03\x02\x03\x04"
        extensions = others + (sni_ext(names) if names is not None else b"")
    return b"".join(
        (
            b"\x03\x03",
            random,
            bytes((len(session_id),)),
            session_id,
            struct.pack(">H", 2 * len(suites)),
            b"".join(struct.pack(">H", s) for s in suites),
            b"\x01\x00",
            struct.pack(">H", len(extensions)),
            extensions,
        )
    )


def hello_record(body: bytes) -> bytes:
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def sign(single_record: bytes, key: bytes, timestamp: int) -> bytes:
    """Put the Telegram client digest into a single-record hello (random at [11:43])."""
    zeroed = single_record[:11] + bytes(32) + single_record[43:]
    mac = hmac.new(key, zeroed, hashlib.sha256).digest()
    stamp = bytes(28) + struct.pack("<I", timestamp)
    random = bytes(a ^ b for a, b in zip(mac, stamp, strict=True))
    return single_record[:11] + random + single_record[43:]


def signed_hello(
    key: bytes = VECTOR_SECRET.key,
    timestamp: int = 1_700_000_000,
    names: list[bytes] | None = None,
    **body_kwargs: Any,
) -> bytes:
    if names is None:
        names = [VECTOR_SECRET.host_bytes]
    return sign(hello_record(make_body(names=names, **body_kwargs)), key, timestamp)


def parse(data: bytes, *, eof: bool = False) -> tuple[ClientHello, int]:
    result = read_client_hello(data, eof=eof)
    assert result is not None
    return result


# -- mtg snapshots -------------------------------------------------------------------------


@pytest.mark.parametrize("name", OK_FILES)
def test_snapshot_ok(name: str) -> None:
    data = load(name)
    full = base64.b64decode(data["full"])
    hello, consumed = parse(full)
    assert consumed == len(full)
    assert hello.random == base64.b64decode(data["random"])
    assert hello.session_id == base64.b64decode(data["sessionId"])
    assert hello.cipher_suite == data["cipherSuite"] == 0x1303
    assert hello.sni == (b"storage.googleapis.com",)
    assert hello.canonical == full
    # Clock injected at the capture time, and mtg's own way: a 30-year tolerance.
    verify_client_hello(hello, VECTOR_SECRET, data["time"], 0.0)
    verify_client_hello(hello, VECTOR_SECRET, 1_900_000_000.0, THIRTY_YEARS)


def test_snapshot_files_present() -> None:
    assert len(OK_FILES) == 4 and "client-hello-ok-grease-first.json" in OK_FILES
    assert len(BAD_FILES) == 1


@pytest.mark.parametrize("name", OK_FILES)
def test_snapshot_ok_but_too_old(name: str) -> None:
    data = load(name)
    hello, _ = parse(base64.b64decode(data["full"]))
    with pytest.raises(BadTimestamp, match="is too old"):
        verify_client_hello(hello, VECTOR_SECRET, data["time"] + 3.5, 3.0)
    with pytest.raises(BadTimestamp):
        verify_client_hello(hello, VECTOR_SECRET, data["time"] - 3.5, 3.0)


@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("now", ["time", "huge"])
def test_snapshot_bad_digest(name: str, now: str) -> None:
    data = load(name)
    hello, consumed = parse(base64.b64decode(data["full"]))
    assert consumed == len(base64.b64decode(data["full"]))
    clock, tolerance = (data["time"], 0.0) if now == "time" else (1_900_000_000.0, THIRTY_YEARS)
    with pytest.raises(BadDigest, match=r"^incorrect client random$"):
        verify_client_hello(hello, VECTOR_SECRET, clock, tolerance)


def test_snapshot_with_other_key_is_bad_digest() -> None:
    hello, _ = parse(full_of(BASE))
    other = Secret(bytes(range(16)), VECTOR_SECRET.host)
    with pytest.raises(BadDigest):
        verify_client_hello(hello, other, load(BASE)["time"], THIRTY_YEARS)


def test_snapshot_with_other_host_fails_on_sni_before_digest() -> None:
    hello, _ = parse(full_of(BASE))
    other = Secret(bytes(range(16)), "example.com")  # wrong key too: SNI is checked first
    with pytest.raises(TLSError) as info:
        verify_client_hello(hello, other, 0.0, 0.0)
    assert type(info.value) is TLSError
    assert str(info.value) == "cannot find example.com in [storage.googleapis.com]"


# -- fragmentation (mtg client_side_test.go) -----------------------------------------------


FRAGMENTED_OK = {
    "two equal records": lambda full: fragment(full, 2),
    "three equal records": lambda full: fragment(full, 3),
    "first record carries one byte": lambda full: split_at(full, 1),
    "first record splits the handshake header": lambda full: split_at(full, 3),
    "eleven records": lambda full: fragment(full, 11),
}


@pytest.mark.parametrize("case", FRAGMENTED_OK)
def test_fragmented_ok(case: str) -> None:
    data = load(BASE)
    full = base64.b64decode(data["full"])
    wire = FRAGMENTED_OK[case](full)
    hello, consumed = parse(wire)
    assert consumed == len(wire)
    assert hello.random == base64.b64decode(data["random"])
    assert hello.session_id == base64.b64decode(data["sessionId"])
    assert hello.cipher_suite == data["cipherSuite"]
    assert hello.canonical == full  # the HMAC is over the de-fragmented form
    verify_client_hello(hello, VECTOR_SECRET, data["time"], 0.0)


def _payload() -> bytes:
    return full_of(BASE)[5:]


def _wrong_type() -> bytes:
    p = _payload()
    return record(p[:10]) + record(p[10:], rtype=0x17)


def _too_many() -> bytes:
    return record(b"\x01\x00\x01\x00") + b"".join(record(b"\xab") for _ in range(11))


def _zero_length_then_end() -> bytes:
    return record(_payload()[:10]) + record(b"")


def _wrong_version() -> bytes:
    p = _payload()
    return record(p[:10]) + record(p[10:], version=b"\x03\x03")


def _too_large() -> bytes:
    return record(b"\x01\x01\x00\x00")


def _truncated_header() -> bytes:
    return record(_payload()[:10]) + b"\x16\x03"


def _truncated_payload() -> bytes:
    return record(_payload()[:10]) + b"\x16\x03\x01\x00\x64"


# (builder, error substring as in mtg, needs end of stream to fail, our full text)
FRAGMENTED_BAD = {
    "continuation is application data": (
        _wrong_type,
        "unexpected record type",
        False,
        "cannot read client hello: unexpected record type 0x17",
    ),
    "too many records": (
        _too_many,
        "too many fragments",
        False,
        "cannot read client hello: too many fragments",
    ),
    "zero-length record then end": (
        _zero_length_then_end,
        "cannot read record header",
        True,
        "cannot read client hello: cannot read record header: EOF",
    ),
    "continuation has version 03 03": (
        _wrong_version,
        "unexpected protocol version",
        False,
        "cannot read client hello: unexpected protocol version 0x3 0x3",
    ),
    "body of 65536 bytes, nothing follows": (
        _too_large,
        "cannot read record header",
        True,
        "cannot read client hello: cannot read record header: EOF",
    ),
    "continuation header truncated": (
        _truncated_header,
        "cannot read record header",
        True,
        "cannot read client hello: cannot read record header: unexpected EOF",
    ),
    "continuation payload truncated": (
        _truncated_payload,
        "EOF",
        True,
        "cannot read client hello: EOF",
    ),
}


@pytest.mark.parametrize("case", FRAGMENTED_BAD)
def test_fragmented_bad(case: str) -> None:
    build, substring, needs_eof, text = FRAGMENTED_BAD[case]
    wire = build()
    if needs_eof:
        assert read_client_hello(wire) is None  # more bytes could still arrive
    else:
        with pytest.raises(TLSError, match=substring):
            read_client_hello(wire)
    with pytest.raises(TLSError) as info:
        read_client_hello(wire, eof=True)
    assert substring in str(info.value)
    assert str(info.value) == text


def test_too_many_fragments_is_raised_without_waiting_for_a_twelfth() -> None:
    wire = record(b"\x01\x00\x01\x00") + b"".join(record(b"\xab") for _ in range(10))
    with pytest.raises(TLSError, match="too many fragments"):
        read_client_hello(wire)


def test_zero_length_records_count_as_fragments() -> None:
    full = full_of(BASE)
    ok = record(b"") * 10 + full
    assert parse(ok)[1] == len(ok)
    with pytest.raises(TLSError, match="cannot read handshake header: too many fragments"):
        read_client_hello(record(b"") * 11 + full)
    # twelve records in total where the 12th is needed
    with pytest.raises(TLSError, match="too many fragments"):
        read_client_hello(fragment(full, 12))


# -- incremental reading -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda f: f, lambda f: fragment(f, 3), lambda f: split_at(f, 2)], ids=str
)
def test_every_prefix_needs_more(make: Callable[[bytes], bytes]) -> None:
    wire = make(full_of(BASE))
    for end in range(len(wire)):
        assert read_client_hello(wire[:end]) is None, end
    hello, consumed = parse(wire)
    assert consumed == len(wire)
    assert hello.canonical == full_of(BASE)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_types(kind: Callable[[bytes], Any]) -> None:
    full = full_of(BASE)
    hello, consumed = parse(kind(full + b"\x14\x03\x03\x00\x01\x01"))
    assert consumed == len(full)
    assert isinstance(hello.random, bytes) and isinstance(hello.canonical, bytes)


def test_growing_bytearray_is_not_pinned() -> None:
    full = full_of(BASE)
    buf = bytearray()
    results = []
    for i in range(0, len(full), 100):
        buf += full[i : i + 100]  # BufferError here if a view of buf were kept alive
        results.append(read_client_hello(buf))
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] is not None and results[-1][1] == len(full)
    buf += b"more"


def test_bytes_after_the_hello_are_not_consumed() -> None:
    full = full_of(BASE)
    for tail in (b"\x14\x03\x03\x00\x01\x01", b"GET /", record(b""), b"\x16"):
        hello, consumed = parse(full + tail)
        assert consumed == len(full)
        assert hello.canonical == full


def test_extra_payload_in_last_record_is_dropped() -> None:
    body = make_body(names=[VECTOR_SECRET.host_bytes])
    single = sign(hello_record(body), VECTOR_SECRET.key, 1000)
    wire = record(single[5:] + b"junk after the hello")
    hello, consumed = parse(wire)
    assert consumed == len(wire)
    assert hello.canonical == single
    verify_client_hello(hello, VECTOR_SECRET, 1000, 0)


@pytest.mark.parametrize("probe", [b"G", b"GET / HTTP/1.1\r\n", b"\x00", b"\x17\x03\x03", b"\x15"])
def test_non_tls_is_rejected_on_first_byte(probe: bytes) -> None:
    with pytest.raises(TLSError) as info:
        read_client_hello(probe)
    assert str(info.value) == (
        "cannot read client hello: cannot read handshake header: "
        f"unexpected record type {probe[0]:#x}"
    )


def test_wrong_record_version_is_rejected_after_three_bytes() -> None:
    assert read_client_hello(b"\x16") is None
    assert read_client_hello(b"\x16\x03") is None
    with pytest.raises(TLSError, match=r"unexpected protocol version 0x3 0x3$"):
        read_client_hello(b"\x16\x03\x03")
    with pytest.raises(TLSError, match=r"unexpected protocol version 0x2 0x0$"):
        read_client_hello(b"\x16\x02\x00\x00")


def test_empty_input() -> None:
    assert read_client_hello(b"") is None
    with pytest.raises(
        TLSError, match=r"^cannot read client hello: cannot read handshake header: "
    ) as info:
        read_client_hello(b"", eof=True)
    assert str(info.value).endswith("cannot read record header: EOF")


# -- parse errors, one per step (mtg ParseClientHello*TestSuite) ---------------------------


def body_record(body: bytes) -> bytes:
    return record(b"\x01\x00\x00" + bytes((len(body),)) + body)


def ext_record(extensions: bytes) -> bytes:
    # version + random + empty session id + one suite + one compression method = 41 bytes
    head = bytes(2 + 32 + 1) + b"\x00\x02\x13\x01\x01\x00"
    return body_record(head + extensions)


_SUITE2 = bytes(34) + b"\x00" + b"\x00\x02"
PARSE_ERRORS = [
    (b"\x0a\x03\x03\x00\x00\x0a", "unexpected record type 0xa"),
    (b"\x16\x03\x03\x00\x00", "unexpected protocol version"),
    (record(b"\x0a"), "cannot read client hello: cannot read handshake header: "),
    (record(b"\x04\x0a\x00\x00"), "cannot read client hello: incorrect handshake type: 0x4"),
    (b"\x16\x03\x01\x00\x07\x0a\x00\x00\x00", "EOF"),
    (body_record(b""), "cannot parse handshake: cannot read client version: EOF"),
    (body_record(b"\x03"), "cannot parse handshake: cannot read client version: unexpected EOF"),
    (body_record(b"\x03\x03"), "cannot parse handshake: cannot read client random: EOF"),
    (body_record(bytes(34)), "cannot parse handshake: cannot read session ID length: EOF"),
    (body_record(bytes(34) + b"\x20"), "cannot parse handshake: cannot read session id: EOF"),
    (body_record(bytes(35)), "cannot parse handshake: cannot read cipher suite length: EOF"),
    (body_record(_SUITE2 + b"\x13"), "cannot read cipher suite: unexpected EOF"),
    (body_record(bytes(35) + b"\x00\x04\x13\x01"), "cannot read cipher suite: EOF"),
    (
        body_record(bytes(35) + b"\x00\x04\x0a\x0a\x1a\x1a\x01\x00"),
        "cannot parse handshake: cannot find a cipher",
    ),
    (
        body_record(_SUITE2 + b"\x13\x01"),
        "cannot parse handshake: cannot read compression methods length: EOF",
    ),
    (
        body_record(_SUITE2 + b"\x13\x01\x01"),
        "cannot parse handshake: cannot skip compression methods: EOF",
    ),
    (ext_record(b""), "cannot parse SNI: cannot read length of TLS extensions: EOF"),
    (ext_record(b"\x00\x0a"), "cannot parse SNI: cannot read extensions: EOF"),
    (ext_record(b"\x00\x01\xab"), "cannot parse SNI: cannot read extension type: [171]"),
    (
        ext_record(b"\x00\x02\xff\xff"),
        "cannot parse SNI: cannot read extension [255 255] length: []",
    ),
    (
        ext_record(b"\x00\x04\xff\xff\x00\x05"),
        "cannot parse SNI: cannot read extension [255 255] data: len 5 != 0",
    ),
    (
        ext_record(b"\x00\x05\x00\x00\x00\x01\xab"),
        "cannot parse SNI: cannot read the length of the SNI record: [171]",
    ),
    (
        ext_record(b"\x00\x06\x00\x00\x00\x02\x00\x01"),
        "cannot parse SNI: cannot read SNI list type: EOF",
    ),
    (
        ext_record(b"\x00\x07\x00\x00\x00\x03\x00\x01\x05"),
        "cannot parse SNI: incorrect SNI list type 0x5",
    ),
    (
        ext_record(b"\x00\x08\x00\x00\x00\x04\x00\x02\x00\xab"),
        "cannot parse SNI: incorrect length of the hostname: [171]",
    ),
    (
        ext_record(b"\x00\x09\x00\x00\x00\x05\x00\x03\x00\x00\x05"),
        "cannot parse SNI: incorrect length of SNI hostname: len 5 != 0",
    ),
]


@pytest.mark.parametrize(("wire", "message"), PARSE_ERRORS)
def test_parse_errors(wire: bytes, message: str) -> None:
    with pytest.raises(TLSError) as info:
        read_client_hello(wire, eof=True)
    assert message in str(info.value)


def test_no_server_name_extension_and_empty_list() -> None:
    # no server_name extension at all (Telegram iOS): no names, checked on the HMAC alone
    hello, _ = parse(ext_record(b"\x00\x00"))
    assert hello.sni is None
    with pytest.raises(BadDigest):
        verify_client_hello(hello, VECTOR_SECRET, 0, 0)
    # an extension with an empty list names no host, so not ours: mtg's rule
    hello, _ = parse(ext_record(b"\x00\x06\x00\x00\x00\x02\x00\x00"))
    assert hello.sni == ()
    with pytest.raises(TLSError, match=r"^cannot find storage.googleapis.com in \[\]$"):
        verify_client_hello(hello, VECTOR_SECRET, 0, 0)


def test_a_signed_hello_without_sni_verifies() -> None:
    wire = sign(hello_record(make_body(names=None)), VECTOR_SECRET.key, 1_700_000_000)
    hello, _ = parse(wire)
    assert hello.sni is None
    verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000, 0)
    with pytest.raises(BadTimestamp):
        verify_client_hello(hello, VECTOR_SECRET, 1_700_000_060, 3)
    with pytest.raises(BadDigest):
        verify_client_hello(hello, Secret(os.urandom(16), VECTOR_SECRET.host), 1_700_000_000, 0)


def test_grease_suites_are_skipped_and_odd_list_is_tolerated() -> None:
    hello, _ = parse(signed_hello(suites=(0x0A0A, 0xFAFA, 0x1302, 0x1301)))
    assert hello.cipher_suite == 0x1302
    assert parse(signed_hello(suites=(0xC02B,)))[0].cipher_suite == 0xC02B


def test_odd_cipher_suite_length_shifts_like_mtg() -> None:
    # length 3: one suite is read, the third byte becomes the compression-methods length (0)
    head = bytes(34) + b"\x00" + b"\x00\x03\x13\x01" + b"\x00"
    hello, _ = parse(body_record(head + b"\x00\x00"))
    assert hello.cipher_suite == 0x1301
    assert hello.sni is None


# -- verification --------------------------------------------------------------------------


def test_synthetic_hello_verifies() -> None:
    wire = signed_hello(timestamp=1_700_000_000, session_id=b"")
    hello, consumed = parse(wire)
    assert consumed == len(wire)
    assert hello.session_id == b""
    assert hello.cipher_suite == 0x1301
    verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000, 0)


def test_sni_among_several_names_and_exact_bytes() -> None:
    host = VECTOR_SECRET.host_bytes
    hello, _ = parse(signed_hello(names=[b"example.com", host]))
    assert hello.sni == (b"example.com", host)
    verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000, 0)
    for wrong in (host.upper(), host + b".", host[:-1]):
        hello, _ = parse(signed_hello(names=[wrong]))
        with pytest.raises(TLSError, match="cannot find") as info:
            verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000, 0)
        assert not isinstance(info.value, BadDigest)


@pytest.mark.parametrize("skew", [-3.0, -1.5, 0.0, 2.999, 3.0])
def test_timestamp_within_tolerance(skew: float) -> None:
    hello, _ = parse(signed_hello(timestamp=1_700_000_000))
    verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000 + skew, 3.0)


@pytest.mark.parametrize("skew", [-3.001, 3.001, -3600.0, 1e6])
def test_timestamp_outside_tolerance(skew: float) -> None:
    hello, _ = parse(signed_hello(timestamp=1_700_000_000))
    with pytest.raises(BadTimestamp):
        verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000 + skew, 3.0)


def test_bad_timestamp_text() -> None:
    hello, _ = parse(signed_hello(timestamp=1617181365))
    with pytest.raises(BadTimestamp) as info:
        verify_client_hello(hello, VECTOR_SECRET, 1617181365 + 63, 3.0)
    assert str(info.value) == 'timestamp "2021-03-31 09:02:45 +0000 UTC" is too old 1m3s'


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.5, "500ms"),
        (0.0015, "1.5ms"),
        (0.000002, "2µs"),
        (4.25, "4.25s"),
        (63.0, "1m3s"),
        (3600.5, "1h0m0.5s"),
        (90061.0, "25h1m1s"),
    ],
)
def test_go_duration_format(seconds: float, text: str) -> None:
    assert faketls._go_duration(seconds) == text


def test_bad_digest_wins_over_bad_timestamp() -> None:
    wire = bytearray(signed_hello(timestamp=1_700_000_000))
    wire[44] ^= 1  # inside the session id: digest no longer matches
    hello, _ = parse(bytes(wire))
    with pytest.raises(BadDigest):
        verify_client_hello(hello, VECTOR_SECRET, 0.0, 3.0)


def test_random_tampering_is_bad_digest() -> None:
    for index in (11, 20, 38):  # inside the 28 digest bytes of the random
        wire = bytearray(signed_hello())
        wire[index] ^= 0x80
        hello, _ = parse(bytes(wire))
        with pytest.raises(BadDigest):
            verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000, THIRTY_YEARS)


def test_errors_share_the_protocol_base() -> None:
    assert issubclass(BadDigest, TLSError) and issubclass(BadTimestamp, TLSError)
    assert issubclass(TLSError, ProtocolError)


# -- ServerHello ---------------------------------------------------------------------------


def counter_urandom() -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom: 00 01 02 ... across calls."""
    state = {"i": 0}

    def urandom(n: int) -> bytes:
        start = state["i"]
        state["i"] = start + n
        return bytes((start + k) & 0xFF for k in range(n))

    return urandom


def split_records(packet: bytes) -> list[tuple[int, bytes, bytes]]:
    out, pos = [], 0
    while pos < len(packet):
        rtype, version, length = struct.unpack_from(">BHH", packet, pos)
        assert version == 0x0303
        out.append((rtype, packet[pos : pos + 5], packet[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    assert pos == len(packet)
    return out


def vector_hello() -> ClientHello:
    return parse(full_of(BASE))[0]


def test_server_hello_layout() -> None:
    hello = vector_hello()
    urandom = counter_urandom()
    packet = build_server_hello(hello, VECTOR_SECRET.key, noise_len=3000, urandom=urandom)
    records = split_records(packet)
    assert [r[0] for r in records] == [0x16, 0x14, 0x17]

    first = packet[:127]
    assert first[:5] == b"\x16\x03\x03\x00\x7a"
    assert first[5:9] == b"\x02\x00\x00\x76"
    assert first[9:11] == b"\x03\x03"
    assert first[43] == 32 and first[44:76] == hello.session_id
    assert first[76:78] == b"\x13\x03"  # echoed first non-GREASE suite
    assert first[78:95] == bytes.fromhex("00002e002b0002030400330024001d0020")
    assert len(records[0][2]) == 122

    assert records[1][1] + records[1][2] == b"\x14\x03\x03\x00\x01\x01"
    assert records[2][1] == b"\x17\x03\x03" + struct.pack(">H", 3000)
    assert len(packet) == 127 + 6 + 5 + 3000


def test_server_hello_key_share_is_x25519_public_key() -> None:
    urandom = counter_urandom()
    packet = build_server_hello(vector_hello(), VECTOR_SECRET.key, noise_len=10, urandom=urandom)
    expected_scalar = counter_urandom()(32)
    expected = (
        X25519PrivateKey.from_private_bytes(expected_scalar)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    assert packet[95:127] == expected
    assert packet[-10:] == bytes(range(32, 42))  # noise comes from urandom after the scalar


def test_server_hello_hmac_verifies_independently() -> None:
    hello = vector_hello()
    packet = build_server_hello(hello, VECTOR_SECRET.key)
    zeroed = packet[:11] + bytes(32) + packet[43:]
    expected = hmac.new(VECTOR_SECRET.key, hello.random + zeroed, hashlib.sha256).digest()
    assert packet[11:43] == expected
    wrong = hmac.new(bytes(16), hello.random + zeroed, hashlib.sha256).digest()
    assert packet[11:43] != wrong


def test_server_hello_default_noise_range() -> None:
    sizes = set()
    for _ in range(200):
        records = split_records(build_server_hello(vector_hello(), VECTOR_SECRET.key))
        assert len(records) == 3  # exactly one ApplicationData record
        sizes.add(len(records[2][2]))
    assert min(sizes) >= 2500 and max(sizes) <= 4699
    assert len(sizes) > 50  # really random
    low = build_server_hello(vector_hello(), b"k" * 16, urandom=lambda n: bytes(n))
    assert len(split_records(low)[2][2]) == 2500
    high = (2200 * 1000 + 2199).to_bytes(4, "big")

    def urandom_high(n: int) -> bytes:
        return high if n == 4 else os.urandom(n)

    top = build_server_hello(vector_hello(), b"k" * 16, urandom=urandom_high)
    assert len(split_records(top)[2][2]) == 4699


@pytest.mark.parametrize(
    ("asked", "got"), [(1000, 1000), (16379, 16379), (16380, 16379), (100_000, 16379), (0, 1)]
)
def test_server_hello_noise_len_is_clamped(asked: int, got: int) -> None:
    records = split_records(build_server_hello(vector_hello(), b"k" * 16, noise_len=asked))
    assert len(records) == 3
    assert len(records[2][2]) == got


@pytest.mark.parametrize("session_id", [b"", b"\x01", bytes(range(255))])
def test_server_hello_echoes_any_session_id(session_id: bytes) -> None:
    hello = ClientHello(
        random=bytes(32), session_id=session_id, cipher_suite=0xC02F, sni=(), canonical=b""
    )
    packet = build_server_hello(hello, b"k" * 16, noise_len=5)
    sh_len = 2 + 32 + 1 + len(session_id) + 2 + 1 + 2 + 46
    assert packet[:5] == b"\x16\x03\x03" + struct.pack(">H", 4 + sh_len)
    assert packet[5:9] == b"\x02" + sh_len.to_bytes(3, "big")
    assert packet[43] == len(session_id)
    assert packet[44 : 44 + len(session_id)] == session_id
    assert packet[44 + len(session_id) : 46 + len(session_id)] == b"\xc0\x2f"
    assert len(packet) == 5 + 4 + sh_len + 6 + 5 + 5


# -- RecordReader --------------------------------------------------------------------------


def stream_records() -> list[tuple[int, bytes]]:
    return [
        (0x14, b"\x01"),
        (0x17, b"hello "),
        (0x15, b"\x01\x00"),
        (0x17, b""),
        (0x16, b"handshake-junk"),
        (0x17, b"world"),
        (0x17, bytes(range(40))),
        (0x14, b""),
        (0x17, b"!"),
    ]


def encode(records: list[tuple[int, bytes]]) -> bytes:
    return b"".join(record(p, rtype=t, version=b"\x03\x03") for t, p in records)


def expected_payload(records: list[tuple[int, bytes]]) -> bytes:
    return b"".join(p for t, p in records if t == 0x17)


def feed_all(reader: RecordReader, chunks: Iterator[bytes] | list[bytes]) -> bytes:
    out = bytearray()
    for chunk in chunks:
        for piece in reader.feed(chunk):
            assert len(piece) > 0
            out += piece
    return bytes(out)


def test_reader_whole_stream() -> None:
    records = stream_records()
    assert feed_all(RecordReader(), [encode(records)]) == expected_payload(records)


def test_reader_every_two_way_split() -> None:
    records = stream_records()
    wire, want = encode(records), expected_payload(records)
    for cut in range(len(wire) + 1):
        assert feed_all(RecordReader(), [wire[:cut], wire[cut:]]) == want, cut


def test_reader_every_three_way_split() -> None:
    records = stream_records()[:6]
    wire, want = encode(records), expected_payload(records)
    for a in range(len(wire) + 1):
        for b in range(a, len(wire) + 1):
            assert feed_all(RecordReader(), [wire[:a], wire[a:b], wire[b:]]) == want, (a, b)


def test_reader_byte_by_byte() -> None:
    records = stream_records()
    wire = encode(records)
    chunks = [wire[i : i + 1] for i in range(len(wire))]
    assert feed_all(RecordReader(), chunks) == expected_payload(records)


def test_reader_returns_views_of_the_input() -> None:
    data = record(b"payload", rtype=0x17, version=b"\x03\x03") + b"\x17\x03\x03\x00\x10abc"
    reader = RecordReader()
    out = reader.feed(data)
    assert [bytes(p) for p in out] == [b"payload", b"abc"]
    assert all(isinstance(p, memoryview) and p.obj is data for p in out)
    middle = b"x" * 13
    out = reader.feed(middle)  # a chunk wholly inside a record comes back without a copy
    assert len(out) == 1 and isinstance(out[0], memoryview) and out[0].obj is middle
    assert reader.feed(b"") == []


def test_reader_is_lean() -> None:
    reader = RecordReader()
    assert not hasattr(reader, "__dict__")


@pytest.mark.parametrize("version", [b"\x03\x01", b"\x03\x04", b"\x00\x00"])
def test_reader_rejects_other_versions(version: bytes) -> None:
    bad = record(b"x", rtype=0x17, version=version)
    with pytest.raises(TLSError, match=r"^incorrect tls version \[\d+ \d+\]$"):
        RecordReader().feed(bad)
    reader = RecordReader()  # header split across chunks
    assert reader.feed(record(b"ok", rtype=0x17, version=b"\x03\x03") + bad[:2]) != []
    with pytest.raises(TLSError):
        reader.feed(bad[2:])


def test_reader_large_record_across_many_chunks() -> None:
    payload = os.urandom(65535)
    wire = record(payload, rtype=0x17, version=b"\x03\x03") * 2
    chunks = [wire[i : i + 4096] for i in range(0, len(wire), 4096)]
    assert feed_all(RecordReader(), chunks) == payload * 2


_record_st = st.tuples(
    st.sampled_from([0x14, 0x15, 0x16, 0x17, 0x17, 0x17]), st.binary(max_size=300)
)


@given(st.lists(_record_st, max_size=12), st.lists(st.integers(0, 4000), max_size=10))
def test_reader_property_any_chunking(records: list[tuple[int, bytes]], cuts: list[int]) -> None:
    wire = encode(records)
    points = sorted({min(c, len(wire)) for c in cuts})
    bounds = [0, *points, len(wire)]
    chunks = [wire[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_all(RecordReader(), chunks) == expected_payload(records)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_reader_fuzz_garbage(chunks: list[bytes]) -> None:
    reader = RecordReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
    except TLSError:
        pass


# -- wrap_application_data -----------------------------------------------------------------


def test_wrap_small() -> None:
    assert wrap_application_data(b"abc") == b"\x17\x03\x03\x00\x03abc"
    assert wrap_application_data(memoryview(b"abc")) == b"\x17\x03\x03\x00\x03abc"
    assert wrap_application_data(b"") == b""


@pytest.mark.parametrize(
    ("size", "lengths"),
    [
        (16379, [16379]),
        (16380, [16379, 1]),
        (40000, [16379, 16379, 7242]),
        (3 * 16379, [16379] * 3),
    ],
)
def test_wrap_splits_at_max_payload(size: int, lengths: list[int]) -> None:
    data = os.urandom(size)
    wrapped = wrap_application_data(data)
    records = split_records(wrapped)
    assert [len(p) for _, _, p in records] == lengths
    assert all(t == 0x17 for t, _, _ in records)
    assert b"".join(p for _, _, p in records) == data
    assert feed_all(RecordReader(), [wrapped]) == data
    assert MAX_RECORD_PAYLOAD == 16379


def test_wrap_custom_max_payload() -> None:
    wrapped = wrap_application_data(memoryview(b"abcdefg"), max_payload=3)
    assert wrapped == b"\x17\x03\x03\x00\x03abc\x17\x03\x03\x00\x03def\x17\x03\x03\x00\x01g"
    with pytest.raises(ValueError):
        wrap_application_data(b"x", max_payload=0)
    with pytest.raises(ValueError):
        wrap_application_data(b"x", max_payload=65536)


# -- fuzzing the ClientHello reader -------------------------------------------------------


def _check_hostile(data: bytes) -> None:
    for eof in (False, True):
        try:
            result = read_client_hello(data, eof=eof)
        except TLSError:
            continue
        if result is None:
            assert not eof
            continue
        hello, consumed = result
        assert 0 < consumed <= len(data)
        try:
            verify_client_hello(hello, VECTOR_SECRET, 1_700_000_000, 5.0)
        except TLSError:
            pass


@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_hostile(data)


@given(st.binary(max_size=600))
def test_fuzz_random_after_a_tls_header(data: bytes) -> None:
    _check_hostile(b"\x16\x03\x01" + data)
    _check_hostile(record(b"\x01" + len(data).to_bytes(3, "big") + data))


@given(
    st.binary(max_size=400),
    st.lists(st.integers(0, 420), max_size=12),
)
def test_fuzz_random_body_in_random_fragments(body: bytes, cuts: list[int]) -> None:
    payload = b"\x01" + len(body).to_bytes(3, "big") + body
    points = sorted({min(c, len(payload)) for c in cuts})
    bounds = [0, *points, len(payload)]
    _check_hostile(b"".join(record(payload[a:b]) for a, b in itertools.pairwise(bounds)))


@settings(max_examples=300)
@given(
    st.sampled_from(OK_FILES + BAD_FILES),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 600),
)
def test_fuzz_mutated_snapshots(name: str, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(full_of(name))
    for index, value in flips:
        if index < len(data):
            data[index] = value
    _check_hostile(bytes(data))
    _check_hostile(bytes(data[:cut]))
    _check_hostile(bytes(data[:cut]) + bytes(data[cut + 1 :]))


@given(
    st.lists(st.binary(max_size=40), max_size=5),
    st.lists(st.integers(0, 0xFFFF), max_size=6),
    st.binary(max_size=40),
)
def test_fuzz_structured_extensions(names: list[bytes], suites: list[int], raw_ext: bytes) -> None:
    _check_hostile(signed_hello(names=names, suites=tuple(suites)))
    _check_hostile(hello_record(make_body(extensions=raw_ext)))
    _check_hostile(hello_record(make_body(extensions=sni_ext(names) + raw_ext)))


# -- record framing helpers shared by the handshake machine and the relay -------------------


def test_records_end_points_past_the_first_incomplete_record() -> None:
    two = record(b"a" * 10) + record(b"b" * 3)
    # an incomplete header: its next byte (it can be a wrong type or version)
    assert faketls.records_end(b"", 0) == 1
    assert faketls.records_end(two[:2], 0) == 3
    assert faketls.records_end(two[:4], 0) == 5
    # a complete header: the end of its record
    assert faketls.records_end(two[:5], 0) == 15
    assert faketls.records_end(two[:15], 0) == 16  # first complete: next header byte
    assert faketls.records_end(two[:17], 0) == 18  # second header incomplete
    assert faketls.records_end(two[:21], 0) == 23
    assert faketls.records_end(two, 0) == len(two) + 1
    assert faketls.records_end(two, 15) == len(two) + 1


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_record_header_frames_application_data(size: int) -> None:
    header = faketls.record_header(size)
    assert header == b"\x17\x03\x03" + size.to_bytes(2, "big")
    data = bytes(size)
    if 0 < size <= MAX_RECORD_PAYLOAD:
        assert wrap_application_data(data) == header + data


def _reader_outcome(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except ProtocolError as exc:
        return ("error", str(exc))


_MUTATION_BASES = [
    signed_hello(),
    signed_hello(names=[]),
    signed_hello(names=[b"a.test", b"fronting.test"]),
    hello_record(make_body(names=None)),
    hello_record(make_body(suites=(0x0A0A, 0x1A1A, 0x1301), names=[b""])),
    *(full_of(name) for name in OK_FILES[:4]),
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_MUTATION_BASES),
    st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=4),
    st.integers(0, 800),
    st.binary(max_size=8),
)
def test_one_record_reader_agrees_with_the_general_reader(
    base: bytes, changes: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    """The fast path for one-record hellos gives what the general reader gives (or
    leaves the hello to it): the same ClientHello, the same consumed count."""
    wire = bytearray(base)
    for pos, value in changes:
        if pos < len(wire):
            wire[pos] = value
    data = bytes(wire[: max(cut, 9)] if cut < len(wire) else wire) + tail
    fast = faketls._one_record_hello(data)
    slow = _reader_outcome(lambda: faketls._read_records(data, False))
    if fast is not None:
        assert fast == slow
    assert _reader_outcome(lambda: read_client_hello(data)) == slow
