"""SOCKS5 client messages: builders, incremental parsers, the handshake state machine."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers.protocol import socks5
from mtgworkers.protocol.errors import ProtocolError
from mtgworkers.protocol.socks5 import (
    ClientHandshake,
    Reply,
    Socks5Error,
    build_auth_request,
    build_connect_request,
    build_greeting,
    parse_auth_reply,
    parse_method_choice,
    parse_reply,
    reply_text,
)

V4_REPLY = bytes.fromhex("05 00 00 01 0a 00 00 01 1f 90")  # bound 10.0.0.1:8080
V6_REPLY = bytes.fromhex("05 00 00 04") + ipaddress.IPv6Address("2001:db8::5").packed + b"\x01\xbb"
DOMAIN_REPLY = bytes.fromhex("05 00 00 03 0b") + b"example.org" + b"\x00\x50"


def test_error_is_a_protocol_error() -> None:
    assert issubclass(Socks5Error, ProtocolError)
    assert Socks5Error("x").reply is None


# --- greeting / method choice ---------------------------------------------------------


def test_greeting_without_credentials_offers_only_no_auth() -> None:
    assert build_greeting(False) == b"\x05\x01\x00"


def test_greeting_with_credentials_offers_no_auth_and_userpass() -> None:
    assert build_greeting(True) == b"\x05\x02\x00\x02"


@pytest.mark.parametrize("partial", [b"", b"\x05"])
def test_method_choice_needs_two_bytes(partial: bytes) -> None:
    assert parse_method_choice(partial, (0,)) is None


def test_method_choice_accepts_offered_methods() -> None:
    assert parse_method_choice(b"\x05\x00", (0,)) == 0
    assert parse_method_choice(bytearray(b"\x05\x02"), (0, 2)) == 2
    assert parse_method_choice(memoryview(b"\x05\x00extra"), (0, 2)) == 0


def test_method_choice_rejects_a_method_not_offered() -> None:
    with pytest.raises(Socks5Error, match="method 0x02, not offered"):
        parse_method_choice(b"\x05\x02", (0,))


def test_method_choice_no_acceptable_method_is_readable() -> None:
    with pytest.raises(
        Socks5Error, match=r"none of our authentication methods \(offered: no authentication, "
    ):
        parse_method_choice(b"\x05\xff", (0, 2))


def test_method_choice_wrong_version() -> None:
    with pytest.raises(Socks5Error, match="unexpected SOCKS version 0x04 in method choice"):
        parse_method_choice(b"\x04\x00", (0,))


# --- RFC 1929 -------------------------------------------------------------------------


def test_auth_request_layout() -> None:
    assert build_auth_request("user", "secret") == b"\x01\x04user\x06secret"


def test_auth_request_missing_password_is_sent_empty() -> None:
    assert build_auth_request("u", None) == b"\x01\x01u\x00"
    assert build_auth_request(b"u", b"") == b"\x01\x01u\x00"


def test_auth_request_encodes_utf8() -> None:
    assert build_auth_request("ü", "é") == b"\x01\x02\xc3\xbc\x02\xc3\xa9"


@pytest.mark.parametrize(
    ("user", "password", "text"),
    [
        ("", "pw", "username: must be 1..255 bytes long, got 0"),
        ("u" * 256, "pw", "username: must be 1..255 bytes long, got 256"),
        ("u", "p" * 256, "password: must be at most 255 bytes, got 256"),
    ],
)
def test_auth_request_rejects_unencodable_lengths(user: str, password: str, text: str) -> None:
    with pytest.raises(Socks5Error, match=text):
        build_auth_request(user, password)


def test_auth_request_accepts_maximum_lengths() -> None:
    msg = build_auth_request("u" * 255, "p" * 255)
    assert len(msg) == 1 + 1 + 255 + 1 + 255


def test_auth_reply() -> None:
    assert parse_auth_reply(b"") is None
    assert parse_auth_reply(b"\x01") is None
    assert parse_auth_reply(b"\x01\x00") is True


def test_auth_reply_failure() -> None:
    with pytest.raises(Socks5Error, match=r"authentication failed \(status 0x01\)"):
        parse_auth_reply(b"\x01\x01")


def test_auth_reply_wrong_version() -> None:
    with pytest.raises(Socks5Error, match="unexpected version 0x05"):
        parse_auth_reply(b"\x05\x00")


# --- CONNECT request ------------------------------------------------------------------


def test_connect_ipv4() -> None:
    assert build_connect_request("149.154.167.51", 443) == bytes.fromhex(
        "05 01 00 01 95 9a a7 33 01 bb"
    )


@pytest.mark.parametrize("host", ["2001:b28:f23d:f001::a", "[2001:b28:f23d:f001::a]"])
def test_connect_ipv6(host: str) -> None:
    addr = ipaddress.IPv6Address("2001:b28:f23d:f001::a").packed
    assert build_connect_request(host, 443) == b"\x05\x01\x00\x04" + addr + b"\x01\xbb"


def test_connect_ipv6_scope_is_dropped() -> None:
    assert build_connect_request("fe80::1%eth0", 1)[4:20] == ipaddress.IPv6Address("fe80::1").packed


def test_connect_domain() -> None:
    assert build_connect_request("example.com", 80) == (b"\x05\x01\x00\x03\x0bexample.com\x00\x50")


def test_connect_domain_idna() -> None:
    msg = build_connect_request("bücher.de", 1)
    assert msg[5:-2] == b"xn--bcher-kva.de"
    assert msg[4] == len(b"xn--bcher-kva.de")


@pytest.mark.parametrize("port", [-1, 65536])
def test_connect_rejects_bad_port(port: int) -> None:
    with pytest.raises(Socks5Error, match="invalid port"):
        build_connect_request("1.2.3.4", port)


@pytest.mark.parametrize("host", ["", "a" * 256])
def test_connect_rejects_bad_name_length(host: str) -> None:
    with pytest.raises(Socks5Error, match=r"1\.\.255 bytes"):
        build_connect_request(host, 1)


def test_connect_port_bounds() -> None:
    assert build_connect_request("1.2.3.4", 0)[-2:] == b"\x00\x00"
    assert build_connect_request("1.2.3.4", 65535)[-2:] == b"\xff\xff"


# --- CONNECT reply --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (V4_REPLY, Reply("10.0.0.1", 8080, socks5.ATYP_IPV4)),
        (V6_REPLY, Reply("2001:db8::5", 443, socks5.ATYP_IPV6)),
        (DOMAIN_REPLY, Reply("example.org", 80, socks5.ATYP_DOMAIN)),
    ],
)
def test_reply_parsed_incrementally(wire: bytes, expected: Reply) -> None:
    for cut in range(len(wire)):
        assert parse_reply(wire[:cut]) is None, cut
    assert parse_reply(wire) == (expected, len(wire))
    # Bytes after the reply belong to the tunnel and are not consumed.
    assert parse_reply(bytearray(wire + b"tunnel")) == (expected, len(wire))
    assert parse_reply(memoryview(wire)) == (expected, len(wire))


def test_reply_empty_domain_is_accepted() -> None:
    wire = b"\x05\x00\x00\x03\x00\x00\x00"
    assert parse_reply(wire) == (Reply("", 0, socks5.ATYP_DOMAIN), 7)


def test_reply_ignores_reserved_byte() -> None:
    wire = bytearray(V4_REPLY)
    wire[2] = 0x7F
    assert parse_reply(wire) is not None


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0x01, "general SOCKS server failure"),
        (0x02, "connection not allowed by ruleset"),
        (0x03, "network unreachable"),
        (0x04, "host unreachable"),
        (0x05, "connection refused"),
        (0x06, "TTL expired"),
        (0x07, "command not supported"),
        (0x08, "address type not supported"),
        (0x09, "unknown reply code 0x09"),
        (0xFF, "unknown reply code 0xff"),
    ],
)
def test_reply_refusals_are_readable(code: int, text: str) -> None:
    assert reply_text(code) == text
    # Raised as soon as the code is known: servers may close right after it.
    with pytest.raises(Socks5Error) as info:
        parse_reply(bytes((5, code)))
    assert info.value.reply == code
    assert str(info.value) == f"SOCKS5 server refused CONNECT: {text} (reply 0x{code:02x})"


def test_reply_succeeded_text() -> None:
    assert reply_text(0) == "succeeded"


def test_reply_wrong_version() -> None:
    with pytest.raises(Socks5Error, match="version 0x04 in CONNECT reply") as info:
        parse_reply(b"\x04\x00")
    assert info.value.reply is None


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_reply_unknown_address_type(atyp: int) -> None:
    with pytest.raises(Socks5Error, match=f"unknown address type 0x{atyp:02x}"):
        parse_reply(bytes((5, 0, 0, atyp)))


def test_reply_domain_with_non_ascii_bytes_does_not_raise() -> None:
    wire = b"\x05\x00\x00\x03\x02\xff\xfe\x00\x01"
    reply, used = parse_reply(wire) or (None, 0)
    assert reply is not None and used == len(wire)
    assert reply.bound_host == "\\xff\\xfe"


# --- the whole exchange ---------------------------------------------------------------


def _drive(hs: ClientHandshake, server_bytes: bytes) -> tuple[list[bytes], bytes]:
    """Run the handshake against a scripted server, reading only ``bytes_needed``."""
    sent = [hs.start()]
    stream = server_bytes
    while not hs.done:
        need = hs.bytes_needed
        assert need > 0
        chunk, stream = stream[:need], stream[need:]
        assert chunk, "server script ran out"
        out = hs.feed(chunk)
        if out:
            sent.append(out)
    assert hs.bytes_needed == 0
    return sent, stream


def test_handshake_without_auth() -> None:
    hs = ClientHandshake("149.154.167.51", 443)
    sent, rest = _drive(hs, b"\x05\x00" + V6_REPLY + b"TUNNEL")
    assert sent == [b"\x05\x01\x00", build_connect_request("149.154.167.51", 443)]
    assert rest == b"TUNNEL"
    assert hs.reply == Reply("2001:db8::5", 443, socks5.ATYP_IPV6)


def test_handshake_with_auth() -> None:
    hs = ClientHandshake("example.com", 443, "alice", "pw")
    sent, rest = _drive(hs, b"\x05\x02" + b"\x01\x00" + DOMAIN_REPLY + b"TUNNEL")
    assert sent == [
        b"\x05\x02\x00\x02",
        b"\x01\x05alice\x02pw",
        build_connect_request("example.com", 443),
    ]
    assert rest == b"TUNNEL"


def test_handshake_with_credentials_but_server_wants_no_auth() -> None:
    hs = ClientHandshake("1.2.3.4", 1, "alice", None)
    sent, _ = _drive(hs, b"\x05\x00" + V4_REPLY)
    assert sent[1] == build_connect_request("1.2.3.4", 1)


def test_handshake_auth_failure() -> None:
    hs = ClientHandshake("1.2.3.4", 1, "alice", "bad")
    hs.start()
    assert hs.feed(b"\x05\x02") == b"\x01\x05alice\x03bad"
    with pytest.raises(Socks5Error, match="authentication failed"):
        hs.feed(b"\x01\x01")


def test_handshake_refused_reply() -> None:
    hs = ClientHandshake("1.2.3.4", 1)
    hs.start()
    hs.feed(b"\x05\x00")
    with pytest.raises(Socks5Error, match="connection refused") as info:
        hs.feed(b"\x05\x05")
    assert info.value.reply == 5


def test_handshake_accepts_messages_in_one_chunk() -> None:
    hs = ClientHandshake("1.2.3.4", 1, "u", "p")
    hs.start()
    # A server that pipelines its answers: the auth reply arrives with the choice.
    assert hs.feed(b"\x05\x02\x01\x00") == b"\x01\x01u\x01p" + build_connect_request("1.2.3.4", 1)
    assert hs.feed(V4_REPLY) == b""
    assert hs.done


def test_handshake_rejects_bytes_after_reply_and_misuse() -> None:
    hs = ClientHandshake("1.2.3.4", 1)
    with pytest.raises(Socks5Error, match="unexpected 2 bytes"):
        hs.feed(b"\x05\x00")  # before start()
    hs.start()
    with pytest.raises(Socks5Error, match="already started"):
        hs.start()
    with pytest.raises(Socks5Error, match="unexpected bytes after the SOCKS5 reply"):
        hs.feed(b"\x05\x00" + V4_REPLY + b"x")


def test_handshake_bytes_needed_tracks_reply_length() -> None:
    hs = ClientHandshake("1.2.3.4", 1)
    hs.start()
    assert hs.bytes_needed == 2
    hs.feed(b"\x05")
    assert hs.bytes_needed == 1
    hs.feed(b"\x00")
    assert hs.bytes_needed == 5
    hs.feed(DOMAIN_REPLY[:5])
    assert hs.bytes_needed == len(DOMAIN_REPLY) - 5


def test_handshake_bad_credentials_fail_early() -> None:
    with pytest.raises(Socks5Error):
        ClientHandshake("1.2.3.4", 1, "", "pw")


# --- property tests -------------------------------------------------------------------


@given(st.binary(max_size=64), st.sampled_from([(0,), (0, 2)]))
def test_fuzz_method_choice(data: bytes, offered: tuple[int, ...]) -> None:
    try:
        result = parse_method_choice(data, offered)
    except Socks5Error:
        return
    assert result is None or result in offered


@given(st.binary(max_size=64))
def test_fuzz_auth_reply(data: bytes) -> None:
    try:
        assert parse_auth_reply(data) in (None, True)
    except Socks5Error:
        pass


@given(st.binary(max_size=300))
def test_fuzz_reply(data: bytes) -> None:
    try:
        result = parse_reply(data)
    except Socks5Error:
        return
    if result is not None:
        reply, used = result
        assert 7 <= used <= len(data)
        assert 0 <= reply.bound_port <= 0xFFFF


@st.composite
def mutated_replies(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from([V4_REPLY, V6_REPLY, DOMAIN_REPLY])))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(wire) - 1))
        wire[pos] = draw(st.integers(0, 255))
    return bytes(wire[: draw(st.integers(0, len(wire)))])


@given(mutated_replies())
def test_fuzz_mutated_reply(data: bytes) -> None:
    try:
        parse_reply(data)
    except Socks5Error:
        pass


@given(
    st.one_of(st.ip_addresses().map(str), st.from_regex(r"[a-z0-9.-]{1,80}", fullmatch=True)),
    st.integers(0, 65535),
)
def test_fuzz_connect_reply_roundtrip(host: str, port: int) -> None:
    """A reply built like a CONNECT request (same address layout) parses back."""
    request = build_connect_request(host, port)
    reply_wire = b"\x05\x00" + request[2:]
    parsed = parse_reply(reply_wire)
    assert parsed is not None
    reply, used = parsed
    assert used == len(reply_wire)
    assert reply.bound_port == port
    if reply.atyp == socks5.ATYP_DOMAIN:
        assert reply.bound_host == host
    else:
        assert ipaddress.ip_address(reply.bound_host) == ipaddress.ip_address(host)


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=8), st.booleans())
def test_fuzz_handshake_random_server(chunks: list[bytes], with_auth: bool) -> None:
    hs = ClientHandshake("example.com", 443, "u" if with_auth else None, "p")
    hs.start()
    try:
        for chunk in chunks:
            if hs.done:
                break
            hs.feed(chunk)
            assert hs.done or hs.bytes_needed > 0
    except Socks5Error:
        pass
