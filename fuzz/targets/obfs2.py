"""The obfuscated2 init frame: ``parse_client_frame``, ``dc_number``, ``generate_dc_frame``.

Input: the 64-byte frame as the client sent it. With a 65th byte the harness first makes
the frame's tag valid (tag chosen by that byte), so the fuzzer reaches the accepted path.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fuzz.targets import SECRET_HEX
from mtgworkers.protocol import obfs2
from mtgworkers.protocol.secret import Secret

MAX_LEN = 128
KEY = Secret.parse(SECRET_HEX).key


def valid_tag(frame: bytes, tag: bytes, key: bytes = KEY) -> bytes:
    """``frame`` with bytes 56..60 set so that they decrypt to ``tag``."""
    cipher = Cipher(
        algorithms.AES(hashlib.sha256(frame[8:40] + key).digest()), modes.CTR(frame[40:56])
    )
    stream = cipher.encryptor().update(bytes(64))
    fixed = bytes(a ^ b for a, b in zip(tag, stream[56:60], strict=True))
    return frame[:56] + fixed + frame[60:]


def fuzz_one(data: bytes) -> None:
    frame = data
    if len(data) > 64:
        frame = valid_tag(data[:64], obfs2.TAGS[data[64] % 3])
    try:
        handshake = obfs2.parse_client_frame(frame, KEY)
    except obfs2.Obfs2Error:
        return
    assert len(frame) == 64 and handshake.tag in obfs2.TAGS
    assert obfs2.dc_number(handshake.dc) >= 1
    assert len(handshake.decryptor.update(b"ping")) == 4
    pool = iter([frame, bytes(64)] + [bytes([i]) * 64 for i in range(1, 40)])
    wire, _, _ = obfs2.generate_dc_frame(handshake.dc, handshake.tag, lambda n: next(pool)[:n])
    assert len(wire) == 64 and wire[0] != 0xEF
