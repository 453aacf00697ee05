"""Obfuscated2: the 64-byte init frame on both legs of a session (docs/protocol.md §4).

Client leg (§4.1): the first 64 bytes the client sends inside the FakeTLS stream. Both
AES-256-CTR keys are derived from the frame and the secret key; the decrypted frame carries
the transport tag and the requested DC.

Telegram leg (§4.2): for every DC connection we generate a fresh frame with unhashed keys (no
secret towards Telegram).

Deliberate differences to mtg, both documented in docs/protocol.md §4.1 and §4.2:

- all three transport tags are accepted (abridged ``ef``, intermediate ``ee``, padded
  intermediate ``dd``); the caller forwards the client's tag to the DC, so the framing inside
  the stream passes through unchanged. mtg accepts only ``dd``.
- the frame to the DC goes out as the spec says, ``g[0:56]`` in plaintext and only
  ``e[56:64]`` encrypted (mtg leaves ``e[0:8]`` on the wire).

The CTR contexts are cryptography's ``Cipher(AES(key), CTR(iv))`` objects; encryption and
decryption are the same keystream XOR, the names only say which direction they serve.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from mtgworkers.protocol.errors import ProtocolError

__all__ = [
    "FRAME_LEN",
    "TAGS",
    "TAG_ABRIDGED",
    "TAG_INTERMEDIATE",
    "TAG_PADDED",
    "ClientHandshake",
    "Obfs2Error",
    "dc_number",
    "generate_dc_frame",
    "parse_client_frame",
]

FRAME_LEN = 64
TAG_ABRIDGED = b"\xef\xef\xef\xef"
TAG_INTERMEDIATE = b"\xee\xee\xee\xee"
TAG_PADDED = b"\xdd\xdd\xdd\xdd"
TAGS = (TAG_ABRIDGED, TAG_INTERMEDIATE, TAG_PADDED)

# Frame layout (both legs): 8 random bytes, 32 bytes key, 16 bytes IV, 4 bytes tag,
# 2 bytes signed little-endian DC, 2 random bytes.
_KEY = slice(8, 40)
_IV = slice(40, 56)
_KEY_IV = slice(8, 56)
_TAG = slice(56, 60)
_DC = slice(60, 62)
_ENCRYPTED_TAIL = 56  # from here on the frame travels encrypted

# A DC frame must not look like the start of another transport a DC (or a middlebox) could
# recognise: abridged (0xef first byte), intermediate/padded tags, plain HTTP, TLS.
_FORBIDDEN_FIRST_WORDS = frozenset(
    {
        b"HEAD",
        b"POST",
        b"GET ",
        b"OPTI",
        b"\x16\x03\x01\x02",
        TAG_PADDED,
        TAG_INTERMEDIATE,
    }
)
_DC_MIN = -(2**15)
_DC_MAX = 2**15 - 1


class Obfs2Error(ProtocolError):
    """The obfuscated2 frame is unusable (wrong length, unsupported transport tag)."""


@dataclass(slots=True)
class ClientHandshake:
    """Result of a successful client frame parse.

    ``tag`` is one of :data:`TAGS`; ``dc`` is the signed raw DC from the frame (negative =
    media DC, 10000+n = test DC n; use :func:`dc_number` for mtg's rule). ``decryptor``
    (client -> proxy) is already past the 64 frame bytes; ``encryptor`` (proxy -> client)
    starts at keystream offset 0.
    """

    tag: bytes
    dc: int
    decryptor: CipherContext
    encryptor: CipherContext


def _public_ctx(key: bytes, iv: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


try:
    # What Cipher(...).encryptor() ends in, without the Cipher object and its type and
    # mode checks (ours are fixed: AES-256, a 16-byte counter): 1.9 instead of 4.6 us a
    # context, five contexts per session (~13 us per handshake on the benchmark host).
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _create_ctx = _rust_openssl.ciphers.create_encryption_ctx

    def _aes_ctr(key: bytes, iv: bytes) -> CipherContext:
        """An AES-256-CTR context (CTR: encrypting and decrypting are the same XOR)."""
        return _create_ctx(algorithms.AES(key), modes.CTR(iv))

    # this cryptography's binding works and gives the public API's key stream
    _probe = bytes(range(32)), bytes(range(16))
    if _aes_ctr(*_probe).update(bytes(64)) != _public_ctx(*_probe).update(bytes(64)):
        raise ImportError("cryptography's cipher binding differs")
except Exception:  # another cryptography release: the public API
    _aes_ctr = _public_ctx


def parse_client_frame(frame: bytes | bytearray | memoryview, key: bytes) -> ClientHandshake:
    """Decode the client's 64-byte init frame with the secret ``key`` (16 bytes).

    Returns a :class:`ClientHandshake` with the tag, the signed DC and both cipher contexts.
    Raises :class:`Obfs2Error` if ``frame`` is not exactly 64 bytes or the decrypted tag is
    none of the three transports (``"unsupported connection type: <hex>"``, as mtg).
    """
    frame = bytes(frame)
    if len(frame) != FRAME_LEN:
        raise Obfs2Error(f"obfuscated2 frame must be {FRAME_LEN} bytes, got {len(frame)}")

    reversed_key_iv = frame[_KEY_IV][::-1]
    decryptor = _aes_ctr(hashlib.sha256(frame[_KEY] + key).digest(), frame[_IV])
    encryptor = _aes_ctr(hashlib.sha256(reversed_key_iv[:32] + key).digest(), reversed_key_iv[32:])

    plain = decryptor.update(frame)
    tag = plain[_TAG]
    # Constant-time like mtg; check every tag so the timing does not say which one matched.
    matches = [hmac.compare_digest(tag, known) for known in TAGS]
    if not any(matches):
        raise Obfs2Error(f"unsupported connection type: {tag.hex()}")

    dc = int.from_bytes(plain[_DC], "little", signed=True)
    return ClientHandshake(tag=tag, dc=dc, decryptor=decryptor, encryptor=encryptor)


def dc_number(raw: int) -> int:
    """mtg's DC rule: ``abs(raw)``, and 0 means DC 2. The media flag (sign) is dropped."""
    return abs(raw) or 2


def _is_forbidden(frame: bytes) -> bool:
    return frame[0] == 0xEF or frame[:4] in _FORBIDDEN_FIRST_WORDS or frame[4:8] == bytes(4)


def generate_dc_frame(
    dc: int, tag: bytes, urandom: Callable[[int], bytes] = os.urandom
) -> tuple[bytes, CipherContext, CipherContext]:
    """Build a fresh init frame for a Telegram DC connection (§4.2).

    ``dc`` is written as signed 16-bit little-endian (the DC actually dialled); ``tag`` must be
    one of :data:`TAGS`; ``urandom`` is the randomness source (a parameter for tests).
    Returns ``(wire, encryptor, decryptor)``: the 64 bytes to send first, the proxy -> DC
    context continuing at keystream offset 64, and the DC -> proxy context at offset 0.
    Raises :class:`Obfs2Error` on an unknown tag or a DC outside the int16 range.
    """
    if tag not in TAGS:
        raise Obfs2Error(f"unsupported connection type: {bytes(tag).hex()}")
    if not _DC_MIN <= dc <= _DC_MAX:
        raise Obfs2Error(f"dc {dc} does not fit into 16 bits")

    plain = urandom(FRAME_LEN)
    while _is_forbidden(plain):
        plain = urandom(FRAME_LEN)
    frame = bytearray(plain)
    frame[_TAG] = tag
    frame[_DC] = dc.to_bytes(2, "little", signed=True)

    reversed_key_iv = bytes(frame[_KEY_IV][::-1])
    encryptor = _aes_ctr(bytes(frame[_KEY]), bytes(frame[_IV]))
    decryptor = _aes_ctr(reversed_key_iv[:32], reversed_key_iv[32:])

    encrypted = encryptor.update(bytes(frame))
    frame[_ENCRYPTED_TAIL:] = encrypted[_ENCRYPTED_TAIL:]
    return bytes(frame), encryptor, decryptor
