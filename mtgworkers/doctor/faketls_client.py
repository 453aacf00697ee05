"""The client side of FakeTLS, obfuscated2 and a first MTProto message, for doctor's probe.

Pure functions (no sockets, no clock: time is a parameter), written from docs/protocol.md §3/§4
from the client's point of view:

- :func:`build_client_hello`: a browser-like TLS 1.3 ClientHello (real X25519 key share,
  so a real TLS server answers it too) whose random is the HMAC of the hello under a
  16-byte key with the timestamp XOR-ed into its last four bytes;
- :func:`split_records` / :func:`verify_server_hello`: read the proxy's answer
  (ServerHello, ChangeCipherSpec, one ApplicationData record) and check its HMAC;
- :func:`client_frame`: the 64-byte obfuscated2 init frame for a DC (tag ``dd``);
- :func:`req_pq_multi` / :func:`read_answer`: an unencrypted MTProto ``req_pq_multi`` in
  padded-intermediate framing and the reading of the DC's answer (``resPQ``).

Errors: :class:`ProbeProtocolError` only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mtgworkers.protocol.errors import ProtocolError

__all__ = [
    "ClientHelloBytes",
    "ProbeProtocolError",
    "Record",
    "build_client_hello",
    "client_frame",
    "read_answer",
    "req_pq_multi",
    "split_records",
    "verify_server_hello",
    "wrap_application_data",
]

RANDOM_OFFSET = 11  # record header 5 + handshake header 4 + client_version 2
HANDSHAKE_LEN = 512  # browsers and Telegram pad their hello to a 512-byte handshake message
RECORD_HANDSHAKE = 0x16
RECORD_CCS = 0x14
RECORD_ALERT = 0x15
RECORD_APPLICATION_DATA = 0x17
HANDSHAKE_SERVER_HELLO = 0x02
TAG_PADDED = b"\xdd\xdd\xdd\xdd"
REQ_PQ_MULTI = 0xBE7E8EF1
RES_PQ = 0x05162463

_CIPHERS = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013)
_GROUPS = (0x001D, 0x0017, 0x0018)  # x25519, secp256r1, secp384r1
_SIGNATURES = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
_FORBIDDEN_STARTS = (
    b"HEAD",
    b"POST",
    b"GET ",
    b"OPTI",
    b"\x16\x03\x01\x02",
    b"\xdd" * 4,
    b"\xee" * 4,
)
_HEADER = struct.Struct(">BHH")


class ProbeProtocolError(ProtocolError):
    """The peer's bytes are not what the protocol says."""


@dataclass(frozen=True)
class ClientHelloBytes:
    """A ClientHello record and the values needed to check the answer."""

    record: bytes
    random: bytes
    session_id: bytes


@dataclass(frozen=True)
class Record:
    """One TLS record: type, version (e.g. 0x0303), payload, and its bytes on the wire."""

    type: int
    version: int
    payload: bytes
    raw: bytes


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _ext(ext_type: int, data: bytes) -> bytes:
    return _u16(ext_type) + _u16(len(data)) + data


def _grease(urandom: Callable[[int], bytes]) -> int:
    nibble = urandom(1)[0] & 0xF0
    return (nibble | 0x0A) << 8 | nibble | 0x0A


def build_client_hello(
    key: bytes,
    sni: str | None,
    now: float,
    *,
    urandom: Callable[[int], bytes] = os.urandom,
) -> ClientHelloBytes:
    """A ClientHello signed with the 16-byte secret ``key`` at Unix time ``now``.

    ``sni``: the server name to send (None: no server_name extension). The handshake is
    padded to 512 bytes. Returns the record and its random and session id.
    """
    grease = _grease(urandom)
    session_id = urandom(32)
    public_key = (
        X25519PrivateKey.from_private_bytes(urandom(32))
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    extensions = [_ext(grease, b"")]
    if sni is not None:
        name = sni.encode("idna") if not sni.isascii() else sni.encode()
        entry = b"\x00" + _u16(len(name)) + name
        extensions.append(_ext(0x0000, _u16(len(entry)) + entry))
    extensions += [
        _ext(0x0017, b""),  # extended_master_secret
        _ext(0xFF01, b"\x00"),  # renegotiation_info
        _ext(0x000A, _u16(2 * (len(_GROUPS) + 1)) + _u16(grease) + b"".join(map(_u16, _GROUPS))),
        _ext(0x000B, b"\x01\x00"),  # ec_point_formats: uncompressed
        _ext(0x0023, b""),  # session_ticket
        _ext(0x0010, b"\x00\x0c\x02h2\x08http/1.1"),  # ALPN
        _ext(0x0005, b"\x01\x00\x00\x00\x00"),  # status_request
        _ext(0x000D, _u16(2 * len(_SIGNATURES)) + b"".join(map(_u16, _SIGNATURES))),
        _ext(0x0012, b""),  # signed_certificate_timestamp
        _ext(0x0033, _u16(36) + _u16(0x001D) + _u16(32) + public_key),  # key_share
        _ext(0x002D, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
        _ext(0x002B, b"\x06" + _u16(grease) + b"\x03\x04\x03\x03"),  # supported_versions
    ]
    ciphers = _u16(grease) + b"".join(map(_u16, _CIPHERS))

    def body_with(ext_bytes: bytes) -> bytes:
        return b"".join(
            (
                b"\x03\x03",
                bytes(32),
                bytes((len(session_id),)),
                session_id,
                _u16(len(ciphers)),
                ciphers,
                b"\x01\x00",
                _u16(len(ext_bytes)),
                ext_bytes,
            )
        )

    unpadded = body_with(b"".join(extensions))
    padding = HANDSHAKE_LEN - 4 - len(unpadded) - 4
    if padding >= 0:
        extensions.append(_ext(0x0015, bytes(padding)))
    body = body_with(b"".join(extensions))
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    record = bytearray(_HEADER.pack(RECORD_HANDSHAKE, 0x0301, len(handshake)) + handshake)
    mac = hmac.new(key, bytes(record), hashlib.sha256).digest()
    stamp = int(now).to_bytes(4, "little")
    random = mac[:28] + bytes(a ^ b for a, b in zip(mac[28:], stamp, strict=True))
    record[RANDOM_OFFSET : RANDOM_OFFSET + 32] = random
    return ClientHelloBytes(bytes(record), random, session_id)


def split_records(buf: bytes | bytearray) -> tuple[list[Record], int]:
    """The complete TLS records at the start of ``buf`` and how many bytes they took."""
    records: list[Record] = []
    pos = 0
    while len(buf) - pos >= 5:
        rtype, version, length = _HEADER.unpack_from(buf, pos)
        end = pos + 5 + length
        if end > len(buf):
            break
        records.append(Record(rtype, version, bytes(buf[pos + 5 : end]), bytes(buf[pos:end])))
        pos = end
    return records, pos


def looks_like_tls(buf: bytes | bytearray) -> bool:
    """True when ``buf`` starts like a TLS record (handshake, CCS, alert or application data)."""
    return len(buf) >= 3 and buf[0] in (0x14, 0x15, 0x16, 0x17) and buf[1] == 3 and buf[2] <= 4


def verify_server_hello(records: list[Record], key: bytes, client_random: bytes) -> bool:
    """True when ``records`` are the proxy's answer signed with ``key`` (docs/protocol.md §3.7).

    The answer is a ServerHello record, a ChangeCipherSpec record and one ApplicationData
    record; the server random is HMAC-SHA256(key, client_random || the three records with
    the random zeroed).
    """
    if len(records) < 3:
        return False
    hello, ccs, noise = records[:3]
    if (
        hello.type != RECORD_HANDSHAKE
        or not hello.payload
        or hello.payload[0] != HANDSHAKE_SERVER_HELLO
        or ccs.type != RECORD_CCS
        or noise.type != RECORD_APPLICATION_DATA
        or len(hello.raw) < RANDOM_OFFSET + 32
    ):
        return False
    packet = bytearray(hello.raw + ccs.raw + noise.raw)
    server_random = bytes(packet[RANDOM_OFFSET : RANDOM_OFFSET + 32])
    packet[RANDOM_OFFSET : RANDOM_OFFSET + 32] = bytes(32)
    expected = hmac.new(key, client_random + bytes(packet), hashlib.sha256).digest()
    return hmac.compare_digest(expected, server_random)


def wrap_application_data(data: bytes) -> bytes:
    """``data`` as TLS ApplicationData records (``17 03 03 len payload``)."""
    out = bytearray()
    for start in range(0, len(data), 16379):
        chunk = data[start : start + 16379]
        out += _HEADER.pack(RECORD_APPLICATION_DATA, 0x0303, len(chunk)) + chunk
    return bytes(out)


def _aes_ctr(key: bytes, iv: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def client_frame(
    key: bytes, dc: int, urandom: Callable[[int], bytes] = os.urandom
) -> tuple[bytes, CipherContext, CipherContext]:
    """The client's obfuscated2 init frame for ``dc`` with the padded-intermediate tag.

    Returns ``(wire, encryptor, decryptor)``: the 64 bytes to send inside the TLS stream,
    the client -> proxy context (continuing after the frame) and the proxy -> client one.
    """
    while True:
        frame = bytearray(urandom(64))
        if frame[0] != 0xEF and bytes(frame[:4]) not in _FORBIDDEN_STARTS and any(frame[4:8]):
            break
    frame[56:60] = TAG_PADDED
    frame[60:62] = dc.to_bytes(2, "little", signed=True)
    plain = bytes(frame)
    encryptor = _aes_ctr(hashlib.sha256(plain[8:40] + key).digest(), plain[40:56])
    reversed_key_iv = plain[8:56][::-1]
    decryptor = _aes_ctr(hashlib.sha256(reversed_key_iv[:32] + key).digest(), reversed_key_iv[32:])
    encrypted = encryptor.update(plain)
    return plain[:56] + encrypted[56:], encryptor, decryptor


def req_pq_multi(now: float, nonce: bytes, padding: bytes = b"") -> bytes:
    """An unencrypted ``req_pq_multi`` message in padded-intermediate framing.

    ``nonce``: 16 bytes; ``padding``: 0..15 random bytes (the framing allows them).
    """
    message_id = int(now * (1 << 32)) & ~3
    body = struct.pack("<I", REQ_PQ_MULTI) + nonce
    payload = bytes(8) + struct.pack("<qI", message_id, len(body)) + body + padding
    return struct.pack("<I", len(payload)) + payload


def read_answer(plain: bytes, nonce: bytes) -> str | None:
    """What a DC's first packet says, or None while it is incomplete.

    ``"resPQ"`` for the answer to our ``req_pq_multi``; ``"error <n>"`` for a transport
    error code; ``"<n> bytes"`` for anything else (e.g. an echo).
    """
    if len(plain) < 4:
        return None
    length = struct.unpack_from("<I", plain)[0] & 0x7FFFFFFF
    if len(plain) < 4 + min(length, 64):
        return None
    payload = plain[4 : 4 + length]
    if length == 4:
        return f"error {struct.unpack('<i', payload)[0]}"
    if (
        len(payload) >= 40
        and payload[:8] == bytes(8)
        and struct.unpack_from("<I", payload, 20)[0] == RES_PQ
        and payload[24:40] == nonce
    ):
        return "resPQ"
    return f"{len(plain)} bytes"
