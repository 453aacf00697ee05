"""Wire-level building blocks shared by the test client and the fake DC.

This is an independent implementation of the client side and the Telegram side of
the protocol, written from ``docs/protocol.md`` (§3, §4). It deliberately does not import
anything from ``mtgworkers``: a second implementation is what catches bugs in the
proxy's own one.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

FRAME_LEN = 64
TAG_ABRIDGED = b"\xef\xef\xef\xef"
TAG_INTERMEDIATE = b"\xee\xee\xee\xee"
TAG_PADDED = b"\xdd\xdd\xdd\xdd"
TAGS = {"dd": TAG_PADDED, "ee": TAG_INTERMEDIATE, "ef": TAG_ABRIDGED}
KNOWN_TAGS = frozenset(TAGS.values())

RECORD_HANDSHAKE = 0x16
RECORD_CCS = 0x14
RECORD_ALERT = 0x15
RECORD_APPDATA = 0x17
MAX_RECORD_PAYLOAD = 16379
CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"

# First four bytes (as u32le) an obfuscated2 frame must not start with (docs/protocol.md §4.2).
_FORBIDDEN_PREFIXES = frozenset(
    {0x44414548, 0x54534F50, 0x20544547, 0x4954504F, 0x02010316, 0xDDDDDDDD, 0xEEEEEEEE}
)


class WireError(Exception):
    """Raised by the test kit when the peer's bytes do not match the protocol."""


def aes_ctr(key: bytes, iv: bytes) -> CipherContext:
    """Return an AES-CTR keystream context (encrypt == decrypt) for a 32-byte key."""
    if len(key) != 32 or len(iv) != 16:
        raise ValueError(f"bad AES-CTR parameters: key {len(key)} bytes, iv {len(iv)} bytes")
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def is_forbidden_frame(frame: bytes | bytearray) -> bool:
    """True if a plaintext obfuscated2 frame must be regenerated (docs/protocol.md §4.2 step 1)."""
    if frame[0] == 0xEF:
        return True
    if int.from_bytes(frame[0:4], "little") in _FORBIDDEN_PREFIXES:
        return True
    return frame[4:8] == b"\x00\x00\x00\x00"


def random_frame(urandom: Callable[[int], bytes] = os.urandom) -> bytearray:
    """Return 64 random bytes that are a legal start of an obfuscated2 frame."""
    while True:
        frame = bytearray(urandom(FRAME_LEN))
        if not is_forbidden_frame(frame):
            return frame


@dataclass
class Obfs2Client:
    """Client side of obfuscated2 with a secret (docs/protocol.md §4.1, mirrored).

    ``wire`` is what goes into the TLS stream; ``encryptor`` continues at offset 64
    (client -> proxy) and ``decryptor`` starts at offset 0 (proxy -> client).
    """

    wire: bytes
    plain: bytes
    encryptor: CipherContext
    decryptor: CipherContext


def obfs2_client_frame(
    secret_key: bytes,
    dc: int,
    tag: bytes = TAG_PADDED,
    urandom: Callable[[int], bytes] = os.urandom,
) -> Obfs2Client:
    """Build a client init frame for ``dc`` (signed int16) and ``tag``.

    Keys are SHA256(frame[8:40] || secret_key) / iv frame[40:56] for the client -> proxy
    direction and the same over the reversed 48 bytes for the other one. The wire form
    is frame[0:56] in plaintext followed by the encrypted bytes [56:64].
    """
    frame = random_frame(urandom)
    frame[56:60] = tag
    frame[60:62] = dc.to_bytes(2, "little", signed=True)
    plain = bytes(frame)
    enc = aes_ctr(hashlib.sha256(plain[8:40] + secret_key).digest(), plain[40:56])
    rev = plain[8:56][::-1]
    dec = aes_ctr(hashlib.sha256(rev[0:32] + secret_key).digest(), rev[32:48])
    encrypted = enc.update(plain)
    return Obfs2Client(plain[0:56] + encrypted[56:64], plain, enc, dec)


@dataclass
class Obfs2DCSide:
    """What a Telegram DC learns from the proxy's frame (docs/protocol.md §4.2, no secret)."""

    tag: bytes
    dc: int
    decryptor: CipherContext  # proxy -> DC, already advanced past the 64 frame bytes
    encryptor: CipherContext  # DC -> proxy, at offset 0


def obfs2_dc_accept(frame: bytes) -> Obfs2DCSide:
    """Decode a 64-byte frame received by a DC; the tag is returned, not validated."""
    if len(frame) != FRAME_LEN:
        raise WireError(f"obfuscated2 frame must be 64 bytes, got {len(frame)}")
    dec = aes_ctr(bytes(frame[8:40]), bytes(frame[40:56]))
    plain = dec.update(bytes(frame))
    rev = bytes(frame[8:56])[::-1]
    enc = aes_ctr(rev[0:32], rev[32:48])
    dc = int.from_bytes(plain[60:62], "little", signed=True)
    return Obfs2DCSide(plain[56:60], dc, dec, enc)


def obfs2_dc_frame(dc: int, tag: bytes = TAG_PADDED) -> tuple[bytes, CipherContext, CipherContext]:
    """Build a proxy -> DC frame the way the proxy should (used to self-test the fake DC).

    Returns (wire bytes, encryptor proxy -> DC at offset 64, decryptor DC -> proxy).
    """
    frame = random_frame()
    frame[56:60] = tag
    frame[60:62] = dc.to_bytes(2, "little", signed=True)
    plain = bytes(frame)
    enc = aes_ctr(plain[8:40], plain[40:56])
    rev = plain[8:56][::-1]
    dec = aes_ctr(rev[0:32], rev[32:48])
    encrypted = enc.update(plain)
    return plain[0:56] + encrypted[56:64], enc, dec


def wrap_records(
    data: bytes, max_payload: int = MAX_RECORD_PAYLOAD, record_type: int = RECORD_APPDATA
) -> bytes:
    """Cut ``data`` into TLS records ``type 03 03 len payload`` of at most max_payload."""
    out = bytearray()
    view = memoryview(data)
    for start in range(0, len(view), max_payload):
        chunk = view[start : start + max_payload]
        out += bytes((record_type, 3, 3)) + len(chunk).to_bytes(2, "big")
        out += chunk
    return bytes(out)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes from a blocking socket; WireError on EOF before that."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError(f"connection closed after {len(buf)} of {n} expected bytes")
        buf += chunk
    return bytes(buf)


class Pattern:
    """A deterministic byte stream addressed by offset, to verify bulk transfers.

    The stream repeats a random block of a prime length, so a lost, duplicated or
    reordered chunk (whose size is almost always a power-of-two-ish buffer size)
    shows up as a mismatch.
    """

    PERIOD = 65537

    def __init__(self, seed: int = 1) -> None:
        block = random.Random(seed).randbytes(self.PERIOD)
        self._double = block + block

    def chunk(self, offset: int, n: int) -> bytes:
        """Return pattern bytes [offset, offset + n)."""
        parts = []
        while n > 0:
            start = offset % self.PERIOD
            take = min(n, self.PERIOD)
            parts.append(self._double[start : start + take])
            offset += take
            n -= take
        return b"".join(parts)

    def mismatch(self, offset: int, data: bytes | bytearray | memoryview) -> int | None:
        """Return the first stream offset where data differs from the pattern, else None."""
        expected = self.chunk(offset, len(data))
        if expected == data:
            return None
        for i, (a, b) in enumerate(zip(expected, bytes(data), strict=False)):
            if a != b:
                return offset + i
        return offset + min(len(expected), len(data))


PATTERN = Pattern()
