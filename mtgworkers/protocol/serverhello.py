"""The fronting site's ServerHello: reading it, learning its shape, and answering like it.

A censor can send the same ClientHello to the proxy and to the website the proxy claims to
be, and compare the two ServerHellos. This module, pure (no I/O), lets the proxy answer as
the site does (docs/protocol.md §3.7, §3.9):

- :func:`parse_server_hello` reads a site's answer (a ServerHello or a HelloRetryRequest,
  possibly split across records) into a :class:`ServerHello`;
- :func:`probe_client_hello` builds the Telegram-like ClientHellos sent to the site, with
  the TLS 1.3 suites in a chosen order and chosen groups and key shares;
- :func:`shape_from_answers` turns the site's answers to :data:`PROBE_ORDERS` into a
  :class:`Shape`: how the site picks its cipher suite (the client's order, or its own
  first choice, maybe with ChaCha20 when the client lists it first) and its ServerHello
  extensions in their order;
- :func:`encode_shape` / :func:`decode_shape` store a shape in at most :data:`SHAPE_MAX`
  bytes (the slot of ``mtgworkers.defense.doppel.SharedState``);
- :meth:`Shape.select_suite` and :meth:`Shape.extensions_block` give what
  ``faketls.build_server_hello`` puts into our answer.

The key share of our answer is always a fresh X25519 one, whatever the site would pick:
Telegram clients offer x25519 next to X25519MLKEM768, so choosing it is a server's right,
and a synthetic post-quantum share (random bytes in place of an ML-KEM ciphertext) has
made Telegram Android clients time out with another proxy.

Every failure raises :class:`ServerHelloError` (a ``ProtocolError``), nothing else.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from mtgworkers.protocol.errors import ProtocolError

__all__ = [
    "GROUP_X25519",
    "GROUP_X25519MLKEM768",
    "HRR_RANDOM",
    "PROBE_ORDERS",
    "SHAPE_MAX",
    "TLS13_SUITES",
    "AlertReceived",
    "ServerHello",
    "ServerHelloError",
    "Shape",
    "SuiteRule",
    "decode_shape",
    "encode_shape",
    "extension_name",
    "group_name",
    "parse_server_hello",
    "probe_client_hello",
    "shape_from_answers",
    "suite_name",
]

RECORD_HANDSHAKE: Final = 0x16
RECORD_ALERT: Final = 0x15
HANDSHAKE_SERVER_HELLO: Final = 0x02
EXT_SERVER_NAME: Final = 0x0000
EXT_SUPPORTED_GROUPS: Final = 0x000A
EXT_ALPN: Final = 0x0010
EXT_PRE_SHARED_KEY: Final = 0x0029
EXT_SUPPORTED_VERSIONS: Final = 0x002B
EXT_COOKIE: Final = 0x002C
EXT_KEY_SHARE: Final = 0x0033
GROUP_X25519: Final = 0x001D
GROUP_X25519MLKEM768: Final = 0x11EC
TLS13: Final = 0x0304

#: The random of a HelloRetryRequest (RFC 8446 §4.1.3): SHA-256 of "HelloRetryRequest".
HRR_RANDOM: Final = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)
#: TLS 1.3 suites, in the order of their code points (bit i of a shape's mask = 0x1301 + i).
TLS13_SUITES: Final = (0x1301, 0x1302, 0x1303, 0x1304, 0x1305)
CHACHA20: Final = 0x1303
#: The suite orders offered to the site. Each of the three common suites comes first once,
#: and the fourth order tells a site that prefers its own choice but ChaCha20 for clients
#: that list it first from one that follows the client and lacks AES-128.
PROBE_ORDERS: Final = (
    (0x1301, 0x1302, 0x1303),
    (0x1303, 0x1302, 0x1301),
    (0x1302, 0x1303, 0x1301),
    (0x1301, 0x1303, 0x1302),
)
#: The largest encoded shape (the size of the slot in the doppelganger's shared state).
SHAPE_MAX: Final = 62
SHAPE_FORMAT: Final = 1
MAX_EXTENSIONS: Final = 8
MAX_OTHER_DATA: Final = 40
# A ServerHello is small; past these the bytes are not a site's answer.
MAX_HELLO_RECORDS: Final = 16
MAX_HELLO_BODY: Final = 0xFFFF

# Extensions we write ourselves in every answer; the shape only says where they go.
_OURS = frozenset((EXT_SUPPORTED_VERSIONS, EXT_KEY_SHARE))
# Extensions a shape never carries: they answer something our clients do not send.
_NEVER = frozenset((EXT_PRE_SHARED_KEY, EXT_COOKIE))

_U16 = struct.Struct(">H")
_HEADER = struct.Struct(">BHH")

_SUITE_NAMES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
_EXTENSION_NAMES = {
    0x0000: "server_name",
    0x0005: "status_request",
    0x000A: "supported_groups",
    0x000B: "ec_point_formats",
    0x000D: "signature_algorithms",
    0x0010: "alpn",
    0x0012: "signed_certificate_timestamp",
    0x0015: "padding",
    0x0017: "extended_master_secret",
    0x001B: "compress_certificate",
    0x0023: "session_ticket",
    0x0029: "pre_shared_key",
    0x002A: "early_data",
    0x002B: "supported_versions",
    0x002C: "cookie",
    0x002D: "psk_key_exchange_modes",
    0x0033: "key_share",
    0xFF01: "renegotiation_info",
}
_GROUP_NAMES = {
    0x0017: "secp256r1",
    0x0018: "secp384r1",
    0x0019: "secp521r1",
    0x001D: "x25519",
    0x001E: "x448",
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x11EB: "SecP256r1MLKEM768",
    0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
}


def suite_name(suite: int) -> str:
    """``TLS_AES_128_GCM_SHA256`` for 0x1301; ``0x....`` for a suite without a name here."""
    return _SUITE_NAMES.get(suite, f"{suite:#06x}")


def extension_name(ext: int) -> str:
    """``key_share`` for 0x0033; ``0x....`` for others."""
    return _EXTENSION_NAMES.get(ext, f"{ext:#06x}")


def group_name(group: int) -> str:
    """``x25519`` for 0x001d; ``0x....`` for others."""
    return _GROUP_NAMES.get(group, f"{group:#06x}")


def is_grease(value: int) -> bool:
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class ServerHelloError(ProtocolError):
    """The site's bytes are not a usable ServerHello, or a shape is malformed."""


class AlertReceived(ServerHelloError):
    """The site answered with a TLS alert; ``description`` is its code (40: handshake
    failure, 70: protocol version, 112: unrecognized name, ...)."""

    def __init__(self, level: int, description: int) -> None:
        super().__init__(f"the site answered with TLS alert {description} (level {level})")
        self.level = level
        self.description = description


# -- reading a ServerHello ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerHello:
    """A parsed ServerHello (or HelloRetryRequest).

    ``extensions`` are (type, data) in the order sent; ``version`` is the negotiated one
    (supported_versions if present, else the legacy version); ``group`` the key share's
    group (for a HelloRetryRequest: the group asked for), 0 without a key share;
    ``record_version`` the version field of its first record; ``record_length`` the
    payload length of that record.
    """

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression: int
    extensions: tuple[tuple[int, bytes], ...]
    record_version: int
    record_length: int

    @property
    def retry(self) -> bool:
        """True for a HelloRetryRequest."""
        return self.random == HRR_RANDOM

    def extension(self, ext: int) -> bytes | None:
        for kind, data in self.extensions:
            if kind == ext:
                return data
        return None

    @property
    def version(self) -> int:
        data = self.extension(EXT_SUPPORTED_VERSIONS)
        if data is not None and len(data) == 2:
            return int(_U16.unpack(data)[0])
        return self.legacy_version

    @property
    def group(self) -> int:
        data = self.extension(EXT_KEY_SHARE)
        if data is None or len(data) < 2:
            return 0
        return int(_U16.unpack_from(data)[0])

    @property
    def key_length(self) -> int:
        """The length of the key share's key (0 for a HelloRetryRequest or none)."""
        data = self.extension(EXT_KEY_SHARE)
        if data is None or len(data) < 4:
            return 0
        return int(_U16.unpack_from(data, 2)[0])


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, what: str) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise ServerHelloError(f"the ServerHello ends inside its {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int(_U16.unpack(self.take(2, what))[0])

    def left(self) -> int:
        return len(self.data) - self.pos


def parse_server_hello(
    data: bytes | bytearray | memoryview,
) -> tuple[ServerHello, int] | None:
    """Read the ServerHello at the start of ``data`` (what a site sent first).

    Returns None while more bytes are needed, else ``(hello, consumed)``, ``consumed``
    being the bytes of the records that carried it. Raises :class:`AlertReceived` for a
    TLS alert and :class:`ServerHelloError` for anything that is not a ServerHello.
    """
    buf = bytes(data)
    n = len(buf)
    pos = 0
    payload = bytearray()
    body_len = -1
    first_version = first_length = -1
    records = 0
    while body_len < 0 or len(payload) < 4 + body_len:
        if records == MAX_HELLO_RECORDS:
            raise ServerHelloError("the ServerHello spans too many records")
        if n - pos < 1:
            return None
        rtype = buf[pos]
        if rtype == RECORD_ALERT and not payload:
            if n - pos < 7:
                return None
            raise AlertReceived(buf[pos + 5], buf[pos + 6])
        if rtype != RECORD_HANDSHAKE:
            raise ServerHelloError(f"the answer is not a TLS handshake record (type {rtype:#04x})")
        if n - pos < 3:
            return None
        if buf[pos + 1] != 3 or buf[pos + 2] > 4:
            raise ServerHelloError(
                f"the answer has no TLS record version ({buf[pos + 1]:#04x} {buf[pos + 2]:#04x})"
            )
        if n - pos < 5:
            return None
        _, version, length = _HEADER.unpack_from(buf, pos)
        if pos + 5 + length > n:
            return None
        if first_version < 0:
            first_version, first_length = version, length
        payload += buf[pos + 5 : pos + 5 + length]
        pos += 5 + length
        records += 1
        if body_len < 0 and len(payload) >= 4:
            if payload[0] != HANDSHAKE_SERVER_HELLO:
                raise ServerHelloError(f"the first handshake message is of type {payload[0]}")
            body_len = int.from_bytes(payload[1:4], "big")
            if body_len > MAX_HELLO_BODY:
                raise ServerHelloError(f"a ServerHello of {body_len} bytes")
    hello = _parse_body(bytes(payload[4 : 4 + body_len]), first_version, first_length)
    return hello, pos


def _parse_body(body: bytes, record_version: int, record_length: int) -> ServerHello:
    cur = _Reader(body)
    legacy = cur.u16("version")
    random = cur.take(32, "random")
    sid_len = cur.u8("session id length")
    if sid_len > 32:
        raise ServerHelloError(f"a session id of {sid_len} bytes")
    session_id = cur.take(sid_len, "session id")
    suite = cur.u16("cipher suite")
    compression = cur.u8("compression method")
    extensions: list[tuple[int, bytes]] = []
    if cur.left():
        total = cur.u16("extensions length")
        if total != cur.left():
            raise ServerHelloError(
                f"the extensions take {total} bytes but {cur.left()} follow them"
            )
        seen: set[int] = set()
        while cur.left():
            kind = cur.u16("extension type")
            data = cur.take(cur.u16("extension length"), "extension data")
            if kind in seen:
                raise ServerHelloError(f"the extension {extension_name(kind)} appears twice")
            seen.add(kind)
            extensions.append((kind, data))
    return ServerHello(
        legacy_version=legacy,
        random=random,
        session_id=session_id,
        cipher_suite=suite,
        compression=compression,
        extensions=tuple(extensions),
        record_version=record_version,
        record_length=record_length,
    )


# -- probing hellos ------------------------------------------------------------------------

_SIGNATURES = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
_TLS12_SUITES = (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014, 0x009C)
HELLO_HANDSHAKE_LEN: Final = 512


def _ext(kind: int, data: bytes) -> bytes:
    return _U16.pack(kind) + _U16.pack(len(data)) + data


def _u16_list(values: Iterable[int]) -> bytes:
    body = b"".join(_U16.pack(v) for v in values)
    return _U16.pack(len(body)) + body


def probe_client_hello(
    sni: str | None,
    *,
    random: bytes,
    session_id: bytes,
    key_shares: Sequence[tuple[int, bytes]],
    suites: Sequence[int] = PROBE_ORDERS[0],
    groups: Sequence[int] = (GROUP_X25519, 0x0017, 0x0018),
    alpn: Sequence[bytes] = (b"h2", b"http/1.1"),
    grease: int = 0x8A8A,
) -> bytes:
    """A ClientHello record shaped like a Telegram client's (and a browser's).

    ``suites`` are the TLS 1.3 suites in the order offered (TLS 1.2 suites follow them);
    ``groups`` the supported groups; ``key_shares`` (group, key) pairs. ``grease`` is the
    GREASE value put in front of the lists (0: none). The handshake is padded to 512
    bytes. Raises :class:`ServerHelloError` for a random that is not 32 bytes or a host
    name that cannot be encoded.
    """
    if len(random) != 32 or len(session_id) > 32:
        raise ServerHelloError("a ClientHello needs a 32-byte random and a short session id")
    lead = [grease] if grease else []
    exts = [_ext(grease, b"")] if grease else []
    if sni is not None:
        try:
            name = sni.encode("idna") if not sni.isascii() else sni.encode()
        except UnicodeError as exc:
            raise ServerHelloError(f"cannot encode the host name: {exc}") from None
        if not 0 < len(name) < 256:
            raise ServerHelloError("the host name must have 1 to 255 bytes")
        entry = b"\x00" + _U16.pack(len(name)) + name
        exts.append(_ext(EXT_SERVER_NAME, _U16.pack(len(entry)) + entry))
    protocols = b"".join(bytes((len(p),)) + p for p in alpn)
    versions = b"".join(_U16.pack(v) for v in (*lead, TLS13, 0x0303))
    shares = b"".join(_U16.pack(group) + _U16.pack(len(key)) + key for group, key in key_shares)
    exts += [
        _ext(0x0017, b""),  # extended_master_secret
        _ext(0xFF01, b"\x00"),  # renegotiation_info
        _ext(EXT_SUPPORTED_GROUPS, _u16_list([*lead, *groups])),
        _ext(0x000B, b"\x01\x00"),  # ec_point_formats: uncompressed
        _ext(0x0023, b""),  # session_ticket
    ]
    if alpn:
        exts.append(_ext(EXT_ALPN, _U16.pack(len(protocols)) + protocols))
    exts += [
        _ext(0x0005, b"\x01\x00\x00\x00\x00"),  # status_request
        _ext(0x000D, _u16_list(_SIGNATURES)),
        _ext(0x0012, b""),  # signed_certificate_timestamp
        _ext(EXT_KEY_SHARE, _U16.pack(len(shares)) + shares),
        _ext(0x002D, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
        _ext(EXT_SUPPORTED_VERSIONS, bytes((len(versions),)) + versions),
        _ext(0x001B, b"\x02\x00\x02"),  # compress_certificate: brotli
    ]
    ciphers = _u16_list([*lead, *suites, *_TLS12_SUITES])

    def body_with(extensions: bytes) -> bytes:
        return b"".join(
            (
                b"\x03\x03",
                random,
                bytes((len(session_id),)),
                session_id,
                ciphers,
                b"\x01\x00",
                _U16.pack(len(extensions)),
                extensions,
            )
        )

    missing = HELLO_HANDSHAKE_LEN - 4 - len(body_with(b"".join(exts))) - 4
    if missing >= 0:
        exts.append(_ext(0x0015, bytes(missing)))
    body = body_with(b"".join(exts))
    if len(body) > 0xFFFF - 4:
        raise ServerHelloError("the ClientHello does not fit one record")
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return _HEADER.pack(RECORD_HANDSHAKE, 0x0301, len(handshake)) + handshake


# -- the shape -----------------------------------------------------------------------------


class SuiteRule(enum.IntEnum):
    """How the site picks its TLS 1.3 cipher suite."""

    UNKNOWN = 0  # not learned: the caller keeps its own choice
    CLIENT = 1  # the client's first suite among those the site supports
    SERVER = 2  # the site's own first choice (``top``) whenever the client offers it
    SERVER_CHACHA = 3  # as SERVER, but ChaCha20 when the client lists it first


@dataclass(frozen=True, slots=True)
class Shape:
    """What our ServerHello copies from the site's.

    ``supported``: the TLS 1.3 suites the site accepts (ascending); ``top``: its own
    first choice (SERVER rules, else 0); ``extensions``: the ServerHello extensions in
    the site's order, as (type, data), where the data of supported_versions and key_share
    is empty (we write those: TLS 1.3 and a fresh x25519 key).
    """

    rule: SuiteRule
    top: int
    supported: tuple[int, ...]
    extensions: tuple[tuple[int, bytes], ...]

    def select_suite(self, offered: bytes) -> int | None:
        """The suite the site would pick from ``offered`` (the client's cipher_suites
        bytes, 2 per suite, GREASE allowed); None when the rule does not say."""
        if self.rule is SuiteRule.UNKNOWN:
            return None
        offered_suites = [
            suite
            for (suite,) in struct.iter_unpack(">H", offered[: len(offered) // 2 * 2])
            if suite in TLS13_SUITES
        ]
        ours = [suite for suite in offered_suites if suite in self.supported]
        if not ours:
            return None
        if self.rule is SuiteRule.CLIENT:
            return ours[0]
        if self.rule is SuiteRule.SERVER_CHACHA and offered_suites[0] == CHACHA20:
            return CHACHA20
        return self.top if self.top in ours else ours[0]

    def extensions_block(self, public_key: bytes) -> bytes:
        """The extensions of our ServerHello, with its u16 length first, around the 32-byte
        X25519 ``public_key``."""
        parts = []
        for kind, data in self.extensions:
            if kind == EXT_SUPPORTED_VERSIONS:
                parts.append(b"\x00\x2b\x00\x02\x03\x04")
            elif kind == EXT_KEY_SHARE:
                parts.append(b"\x00\x33\x00\x24\x00\x1d\x00\x20" + public_key)
            else:
                parts.append(_ext(kind, data))
        block = b"".join(parts)
        return _U16.pack(len(block)) + block

    def describe(self) -> str:
        """One line for logs and doctor: rule and extension order."""
        if self.rule is SuiteRule.CLIENT:
            suites = "the client's first of " + ", ".join(map(suite_name, self.supported))
        elif self.rule is SuiteRule.UNKNOWN:
            suites = "not learned"
        else:
            suites = suite_name(self.top) + " first"
            if self.rule is SuiteRule.SERVER_CHACHA:
                suites += " (ChaCha20 when the client lists it first)"
        order = ", ".join(extension_name(kind) for kind, _ in self.extensions)
        return f"cipher suite: {suites}; extensions: {order}"


def _check_extensions(extensions: Sequence[tuple[int, bytes]]) -> None:
    kinds = [kind for kind, _ in extensions]
    if not 2 <= len(kinds) <= MAX_EXTENSIONS or len(set(kinds)) != len(kinds):
        raise ServerHelloError("a shape needs 2 to 8 distinct extensions")
    if not _OURS.issubset(kinds):
        raise ServerHelloError("a shape needs supported_versions and key_share")
    for kind, data in extensions:
        if kind in _NEVER or is_grease(kind):
            raise ServerHelloError(f"a shape cannot carry {extension_name(kind)}")
        if kind in _OURS and data:
            raise ServerHelloError(f"{extension_name(kind)} carries no data in a shape")
        if len(data) > MAX_OTHER_DATA:
            raise ServerHelloError(f"{extension_name(kind)} has too much data for a shape")


def encode_shape(shape: Shape) -> bytes:
    """The shape in at most :data:`SHAPE_MAX` bytes::

        0  u8   format (1)
        1  u8   suite rule (SuiteRule)
        2  u16  top suite (BE; 0 unless a SERVER rule)
        4  u8   supported suites: bit i = 0x1301 + i
        5  u8   number of extensions (2..8), then for each, in order:
                u16 type; for types other than supported_versions and key_share
                u8 length and the data

    Raises :class:`ServerHelloError` for a shape that :func:`decode_shape` would refuse.
    """
    mask = 0
    for suite in shape.supported:
        if suite not in TLS13_SUITES:
            raise ServerHelloError(f"{suite:#06x} is not a TLS 1.3 suite")
        mask |= 1 << (suite - 0x1301)
    _check_extensions(shape.extensions)
    out = bytearray((SHAPE_FORMAT, int(shape.rule)))
    out += _U16.pack(shape.top) + bytes((mask, len(shape.extensions)))
    for kind, data in shape.extensions:
        out += _U16.pack(kind)
        if kind not in _OURS:
            out += bytes((len(data),)) + data
    blob = bytes(out)
    decode_shape(blob)  # one set of rules for both directions
    return blob


def decode_shape(blob: bytes | bytearray | memoryview) -> Shape:
    """The :class:`Shape` stored by :func:`encode_shape`. Raises :class:`ServerHelloError`."""
    data = bytes(blob)
    if len(data) > SHAPE_MAX:
        raise ServerHelloError(f"a shape has at most {SHAPE_MAX} bytes, not {len(data)}")
    cur = _Reader(data)
    try:
        if cur.u8("format") != SHAPE_FORMAT:
            raise ServerHelloError("unknown shape format")
        rule_value = cur.u8("rule")
        top = cur.u16("top suite")
        mask = cur.u8("suite mask")
        count = cur.u8("extension count")
        extensions = []
        for _ in range(count):
            kind = cur.u16("extension type")
            value = b"" if kind in _OURS else cur.take(cur.u8("length"), "extension data")
            extensions.append((kind, value))
    except ServerHelloError as exc:
        raise ServerHelloError(f"truncated shape: {exc}") from None
    if cur.left():
        raise ServerHelloError("bytes after the shape")
    try:
        rule = SuiteRule(rule_value)
    except ValueError:
        raise ServerHelloError(f"unknown suite rule {rule_value}") from None
    if mask >> len(TLS13_SUITES):
        raise ServerHelloError("unknown suites in the shape")
    supported = tuple(s for i, s in enumerate(TLS13_SUITES) if mask >> i & 1)
    if rule is not SuiteRule.UNKNOWN and not supported:
        raise ServerHelloError("a suite rule without suites")
    server = rule in (SuiteRule.SERVER, SuiteRule.SERVER_CHACHA)
    if (server and top not in supported) or (not server and top):
        raise ServerHelloError("the top suite does not fit the rule")
    if rule is SuiteRule.SERVER_CHACHA and (top == CHACHA20 or CHACHA20 not in supported):
        raise ServerHelloError("a ChaCha20 rule without ChaCha20 as the second choice")
    _check_extensions(extensions)
    return Shape(rule, top, supported, tuple(extensions))


# -- learning ------------------------------------------------------------------------------


def _check_answer(offered: Sequence[int], hello: ServerHello, session_id: bytes) -> None:
    if hello.retry:
        raise ServerHelloError(
            f"the site asks for another key share ({group_name(hello.group)}) instead of x25519"
        )
    if hello.version != TLS13:
        raise ServerHelloError(f"the site answers TLS version {hello.version:#06x}, not TLS 1.3")
    if hello.cipher_suite not in offered:
        raise ServerHelloError(
            f"the site picked {suite_name(hello.cipher_suite)}, which was not offered"
        )
    if hello.group != GROUP_X25519:
        raise ServerHelloError(f"the site's key share is {group_name(hello.group)}, not x25519")
    if hello.session_id != session_id:
        raise ServerHelloError("the site does not echo the session id")
    if hello.compression:
        raise ServerHelloError("the site picked a compression method")


def _suite_rule(answers: Sequence[tuple[Sequence[int], int]]) -> tuple[SuiteRule, int, set[int]]:
    """The rule that explains every (offered order, picked suite), or UNKNOWN."""
    picks = {picked for _, picked in answers}
    if len(picks) == 1:  # whatever the order: the site's own choice
        (top,) = picks
        return SuiteRule.SERVER, top, picks
    # The client's order: a suite is supported when it was picked while offered first.
    supported = {picked for offered, picked in answers if picked == offered[0]}
    if all(
        picked == next((s for s in offered if s in supported), None) for offered, picked in answers
    ):
        return SuiteRule.CLIENT, 0, supported
    not_chacha = {picked for offered, picked in answers if offered[0] != CHACHA20}
    chacha = {picked for offered, picked in answers if offered[0] == CHACHA20}
    if len(not_chacha) == 1 and chacha == {CHACHA20} and CHACHA20 not in not_chacha:
        (top,) = not_chacha
        return SuiteRule.SERVER_CHACHA, top, {top, CHACHA20}
    return SuiteRule.UNKNOWN, 0, set()


def shape_from_answers(
    answers: Sequence[tuple[Sequence[int], bytes, ServerHello]],
) -> Shape:
    """The site's shape from its answers to probe hellos: (suites offered in that order,
    the session id sent, the ServerHello got). The extension order is the first answer's.

    Raises :class:`ServerHelloError` when an answer is not a TLS 1.3 ServerHello with an
    x25519 key share for what was offered, or when its extensions cannot be copied.
    """
    if not answers:
        raise ServerHelloError("no answers to learn from")
    for offered, session_id, hello in answers:
        _check_answer(offered, hello, session_id)
    rule, top, supported = _suite_rule(
        [(offered, hello.cipher_suite) for offered, _, hello in answers]
    )
    first = answers[0][2]
    extensions = tuple((kind, b"" if kind in _OURS else data) for kind, data in first.extensions)
    shape = Shape(rule, top, tuple(sorted(supported)), extensions)
    encode_shape(shape)  # refuses what cannot be stored
    return shape
