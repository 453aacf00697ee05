from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mtgworkers.protocol.proxyproto import (
    NOT_PROXY,
    V1_MAX_LEN,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v2,
    parse_header,
)

TLS_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


def _v2(ver_cmd: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((ver_cmd, family)) + len(body).to_bytes(2, "big") + body


# --- early decisions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x16",
        TLS_HELLO_START,
        b"GET / HTTP/1.1\r\n",
        b"\x00",
        b"PX",
        b"PROXY\t",
        b"proxy ",
        b"\r\n\r\n\x01",
        b"\r\x00",
        b"\r\n\r\n\x00\r\nQUIT\r",
        b"\xff" * 200,
    ],
)
def test_not_proxy(data: bytes) -> None:
    assert parse_header(data) is NOT_PROXY


@pytest.mark.parametrize(
    "data",
    [b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"],
)
def test_v1_needs_more(data: bytes) -> None:
    assert parse_header(data) is None


def test_every_prefix_of_signature_v2_needs_more() -> None:
    header = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2))
    for n in range(len(header)):
        assert parse_header(header[:n]) is None, n


def test_not_proxy_repr() -> None:
    assert repr(NOT_PROXY) == "NOT_PROXY"


# --- v1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            ProxyHeader(("192.168.0.1", 56324), ("192.168.0.11", 443)),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:DB8::2 0 65535\r\n",
            ProxyHeader(("2001:db8::1", 0), ("2001:db8::2", 65535)),
        ),
        (
            b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n",
            ProxyHeader(("::ffff:a00:1", 1), ("::1", 2)),
        ),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None, local=True)),
        (b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", ProxyHeader(None, None, local=True)),
    ],
)
def test_v1_ok(line: bytes, expected: ProxyHeader) -> None:
    data = line + TLS_HELLO_START
    assert parse_header(data) == (expected, len(line))
    assert parse_header(bytearray(data)) == (expected, len(line))
    assert parse_header(memoryview(data)) == (expected, len(line))


def test_v1_longest_tcp6_line() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    worst = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == 104  # the spec's worst TCP6 case; 107 is reached only by UNKNOWN
    assert parse_header(worst) == (ProxyHeader((full, 65535), (full, 65535)), 104)


def test_v1_unknown_long_line() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LEN - 16) + b"\r\n"
    assert len(line) == V1_MAX_LEN
    assert parse_header(line) == (ProxyHeader(None, None, local=True), V1_MAX_LEN)
    too_long = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LEN - 15) + b"\r\n"
    with pytest.raises(ProxyProtocolError, match="longer"):
        parse_header(too_long)


def test_v1_incremental() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 443\r\n"
    for n in range(len(line)):
        assert parse_header(line[:n]) is None, n
    assert parse_header(line) == (ProxyHeader(("1.2.3.4", 1000), ("5.6.7.8", 443)), len(line))


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only: no CRLF before the limit, bad byte
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
        b"PROXY TCP4 1.2.3.4\xff",
        b"PROXY " + b"A" * 200,
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_header(line)


# --- v2 ---------------------------------------------------------------------------------------


def test_v2_ipv4() -> None:
    body = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (5000).to_bytes(2, "big") + (443).to_bytes(2, "big")
    header = _v2(0x21, 0x11, body)
    assert parse_header(header + b"rest") == (
        ProxyHeader(("10.0.0.1", 5000), ("10.0.0.2", 443)),
        len(header),
    )


def test_v2_ipv6_with_tlvs() -> None:
    src = ipaddress.IPv6Address("2001:db8::1")
    dst = ipaddress.IPv6Address("2001:db8::2")
    tlvs = b"\x04\x00\x03abc" + b"\x20\x00\x05\x01\x00\x00\x00\x00"
    body = src.packed + dst.packed + (1).to_bytes(2, "big") + (2).to_bytes(2, "big") + tlvs
    header = _v2(0x21, 0x21, body)
    assert parse_header(header + TLS_HELLO_START) == (
        ProxyHeader(("2001:db8::1", 1), ("2001:db8::2", 2)),
        len(header),
    )
    for n in range(len(header)):
        assert parse_header(header[:n]) is None, n


@pytest.mark.parametrize("family", [0x12, 0x10])
def test_v2_ipv4_other_transports(family: int) -> None:
    body = bytes(range(1, 9)) + b"\x00\x01\x00\x02"
    result = parse_header(_v2(0x21, family, body))
    assert result == (ProxyHeader(("1.2.3.4", 1), ("5.6.7.8", 2)), 16 + 12)


@pytest.mark.parametrize(
    ("ver_cmd", "family", "body", "local"),
    [
        (0x20, 0x00, b"", True),  # LOCAL, health check
        (0x20, 0x11, bytes(12), True),  # LOCAL ignores the address block
        (0x20, 0x11, b"", True),
        (0x21, 0x00, b"", False),  # PROXY, UNSPEC
        (0x21, 0x31, b"/tmp/a" + bytes(210), False),  # PROXY, UNIX stream
        (0x21, 0x32, bytes(216), False),
    ],
)
def test_v2_without_addresses(ver_cmd: int, family: int, body: bytes, local: bool) -> None:
    header = _v2(ver_cmd, family, body)
    assert parse_header(header + b"x") == (ProxyHeader(None, None, local), len(header))


@pytest.mark.parametrize(
    "header",
    [
        _v2(0x11, 0x11, bytes(12)),  # version 1 in binary form
        _v2(0x31, 0x11, bytes(12)),
        _v2(0x22, 0x11, bytes(12)),  # unknown command
        _v2(0x2F, 0x11, bytes(12)),
        _v2(0x21, 0x41, bytes(12)),  # unknown family
        _v2(0x21, 0x13, bytes(12)),  # unknown transport
        _v2(0x21, 0x11, bytes(11)),  # address block too short
        _v2(0x21, 0x21, bytes(35)),
        _v2(0x21, 0x21, bytes(12)),
    ],
)
def test_v2_malformed(header: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_header(header)


def test_v2_short_block_is_rejected_before_the_body_arrives() -> None:
    header = _v2(0x21, 0x21, bytes(4))
    with pytest.raises(ProxyProtocolError):
        parse_header(header[:16])


def test_v2_waits_for_whole_declared_length() -> None:
    header = _v2(0x21, 0x11, bytes(12) + bytes(1000))
    assert parse_header(header[:-1]) is None
    assert parse_header(header) == (ProxyHeader(("0.0.0.0", 0), ("0.0.0.0", 0)), len(header))


# --- build_v2 ---------------------------------------------------------------------------------


def test_build_v2_ipv4_layout() -> None:
    header = build_v2(("192.0.2.1", 40000), ("198.51.100.7", 443))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 1, 198, 51, 100, 7])
        + (40000).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )


def test_build_v2_ipv6_layout() -> None:
    header = build_v2(("2001:db8::1", 1), ("::1", 443))
    assert header[12:16] == b"\x21\x21\x00\x24"
    assert len(header) == 16 + 36
    assert header[16:32] == ipaddress.IPv6Address("2001:db8::1").packed
    assert header[32:48] == ipaddress.IPv6Address("::1").packed
    assert header[48:] == b"\x00\x01\x01\xbb"


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (
            ("192.0.2.1", 1),
            ("2001:db8::2", 2),
            ProxyHeader(("::ffff:c000:201", 1), ("2001:db8::2", 2)),
        ),
        (
            ("2001:db8::1", 1),
            ("10.1.2.3", 443),
            ProxyHeader(("2001:db8::1", 1), ("::ffff:a01:203", 443)),
        ),
    ],
)
def test_build_v2_mixed_families(
    src: tuple[str, int], dst: tuple[str, int], expected: ProxyHeader
) -> None:
    header = build_v2(src, dst)
    assert header[13] == 0x21
    assert parse_header(header) == (expected, len(header))
    assert expected.src is not None
    assert ipaddress.IPv6Address(expected.src[0]).ipv4_mapped or src[0] == expected.src[0]


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("example.com", 1), ("1.2.3.4", 2)),
        (("1.2.3.4", 1), ("", 2)),
        (("1.2.3.4", -1), ("1.2.3.4", 2)),
        (("1.2.3.4", 1), ("1.2.3.4", 65536)),
    ],
)
def test_build_v2_invalid(src: tuple[str, int], dst: tuple[str, int]) -> None:
    with pytest.raises(ProxyProtocolError):
        build_v2(src, dst)


ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=0, max_value=65535)


@given(src=ipv4s | ipv6s, dst=ipv4s | ipv6s, sport=ports, dport=ports, tail=st.binary(max_size=20))
def test_build_parse_round_trip(src: str, dst: str, sport: int, dport: int, tail: bytes) -> None:
    header = build_v2((src, sport), (dst, dport))
    result = parse_header(header + tail)
    assert isinstance(result, tuple)
    parsed, consumed = result
    assert consumed == len(header)
    assert parsed.src is not None
    assert parsed.dst is not None
    mixed = ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version

    def expect(ip: str) -> str:
        address = ipaddress.ip_address(ip)
        if mixed and address.version == 4:
            return str(ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed))
        return str(address)

    assert parsed.src == (expect(src), sport)
    assert parsed.dst == (expect(dst), dport)


@given(src=ipv4s, dst=ipv4s, sport=ports, dport=ports)
def test_v1_tcp4_round_trip(src: str, dst: str, sport: int, dport: int) -> None:
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    assert parse_header(line) == (ProxyHeader((src, sport), (dst, dport)), len(line))


@given(src=ipv6s, dst=ipv6s, sport=ports, dport=ports)
def test_v1_tcp6_round_trip(src: str, dst: str, sport: int, dport: int) -> None:
    line = f"PROXY TCP6 {src} {dst} {sport} {dport}\r\n".encode()
    assume(len(line) <= V1_MAX_LEN)
    assert parse_header(line) == (ProxyHeader((src, sport), (dst, dport)), len(line))


# --- fuzz -------------------------------------------------------------------------------------


def _check(data: bytes) -> None:
    try:
        result = parse_header(data)
    except ProxyProtocolError:
        return
    if isinstance(result, tuple):
        header, consumed = result
        assert isinstance(header, ProxyHeader)
        assert 0 < consumed <= len(data)
    else:
        assert result is None or result is NOT_PROXY


@given(st.binary(max_size=300))
def test_fuzz_random(data: bytes) -> None:
    _check(data)


@given(
    prefix=st.sampled_from(
        [b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE]
    ),
    rest=st.binary(max_size=200),
)
def test_fuzz_after_signature(prefix: bytes, rest: bytes) -> None:
    _check(prefix + rest)


_VALID = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
    build_v2(("1.2.3.4", 5), ("6.7.8.9", 10)),
    build_v2(("2001:db8::1", 5), ("6.7.8.9", 10)),
    _v2(0x20, 0x00, b""),
]


@given(
    base=st.sampled_from(_VALID),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 200),
)
def test_fuzz_mutated(base: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    _check(bytes(data[: max(cut, 1)]))
    _check(bytes(data))
