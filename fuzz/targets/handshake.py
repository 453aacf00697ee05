"""The sans-IO ``ServerHandshake`` from the first byte to the obfuscated2 frame, the
client's bytes split into chunks.

Input: two control bytes, then what the client sends. Byte 0: bit 0 a PROXY header may
come (``proxy-protocol-listener``), bit 1 the peer may send one, bit 2 the hello is re-signed
with the secret (so the fuzzer gets past the HMAC), bit 3 the obfuscated2 frame's tag is
made valid, bit 4 the session id counts as a replay, bit 5 a learned ServerHello shape.
Byte 1: how the bytes are cut into chunks.

Checked on the way: ``ClientKnown`` comes first, a terminal action ends the machine, and a
fronted client's bytes go to the fronting host unchanged.
"""

from __future__ import annotations

import hashlib
import hmac

from fuzz.targets import NOW, SECRET_HEX, chunks
from fuzz.targets.obfs2 import valid_tag
from mtgworkers.protocol import faketls, obfs2, proxyproto
from mtgworkers.protocol import serverhello as sh
from mtgworkers.protocol.handshake import (
    NEED_DATA,
    ClientKnown,
    Close,
    Dial,
    Front,
    Reply,
    ServerHandshake,
)
from mtgworkers.protocol.secret import Secret

MAX_LEN = 4096
SECRET = Secret.parse(SECRET_HEX)
SHAPE = sh.Shape(
    sh.SuiteRule.SERVER,
    0x1302,
    (0x1301, 0x1302),
    ((sh.EXT_KEY_SHARE, b""), (sh.EXT_SUPPORTED_VERSIONS, b"")),
)


def _header_length(stream: bytes, proxy: bool) -> int:
    if not proxy:
        return 0
    try:
        parsed = proxyproto.parse_header(stream)
    except proxyproto.ProxyProtocolError:
        return 0
    if parsed is None or parsed is proxyproto.NOT_PROXY:
        return 0
    return parsed[1]


def _sign(stream: bytearray, start: int) -> int:
    """Put the valid random into the hello at ``start``; the offset after it (or -1)."""
    try:
        result = faketls.read_client_hello(stream[start:], eof=True)
    except faketls.TLSError:
        return -1
    assert result is not None
    hello, consumed = result
    if int.from_bytes(stream[start + 3 : start + 5], "big") < 38:
        return -1  # the random is not in the first record
    canon = hello.canonical
    zeroed = canon[:11] + bytes(32) + canon[43:]
    mac = hmac.new(SECRET.key, zeroed, hashlib.sha256).digest()
    stamp = (NOW & 0xFFFFFFFF).to_bytes(4, "little")
    at = start + 11
    stream[at : at + 32] = mac[:28] + bytes(a ^ b for a, b in zip(mac[28:], stamp, strict=True))
    return start + consumed


def _fix_frame(stream: bytearray, start: int, tag: bytes) -> None:
    """Make the obfuscated2 frame in the ApplicationData records from ``start`` valid."""
    where: list[int] = []
    pos = start
    while len(where) < 64 and len(stream) - pos >= 5:
        end = pos + 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
        if stream[pos] == 0x17:
            where += range(pos + 5, min(end, len(stream)))
        pos = end
    if len(where) < 64:
        return
    frame = valid_tag(bytes(stream[i] for i in where[:64]), tag, SECRET.key)
    for i, byte in zip(where[:64], frame, strict=True):
        stream[i] = byte


def fuzz_one(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, seed = data[0], data[1]
    edited = bytearray(data[2:])
    proxy = bool(flags & 1)
    header_len = _header_length(bytes(edited), proxy)
    if flags & 4:
        after = _sign(edited, header_len)
        if after >= 0 and flags & 8:
            _fix_frame(edited, after, obfs2.TAGS[seed % 3])
    stream = bytes(edited)

    machine = ServerHandshake(
        SECRET,
        ("198.51.100.7", 40000),
        tolerance=3.0,
        replayed=lambda session_id: bool(flags & 16),
        random_bytes=lambda n: bytes(n),
        proxy_header=proxy,
        header_allowed=bool(flags & 2),
        noise_length=lambda: 100 + seed,
        shape=(lambda: SHAPE) if flags & 32 else None,
    )
    fed = 0
    known = False
    for chunk in chunks(stream, seed):
        machine.receive(chunk)
        fed += len(chunk)
        while (action := machine.next_action(NOW)) is not NEED_DATA:
            if isinstance(action, ClientKnown):
                assert not known, "ClientKnown twice"
                known = True
                continue
            assert known or isinstance(action, Close), f"{action!r} before ClientKnown"
            if isinstance(action, Reply):
                assert action.data[:3] == b"\x16\x03\x03"
                continue
            if isinstance(action, Front):
                assert action.data == stream[header_len:fed], "fronted bytes changed"
            if isinstance(action, Dial):
                assert action.dc >= 1 and action.handshake.tag in obfs2.TAGS
            assert isinstance(action, (Front, Dial, Close))
            assert machine.done
            assert machine.next_action(NOW) is NEED_DATA
            return
