"""FakeTLS ClientHello: ``read_client_hello``, ``verify_client_hello``, ``build_server_hello``.

Input: one flag byte (bit 0: ``eof``; bit 1: a 30-year clock tolerance), then the bytes
the client sent.
"""

from __future__ import annotations

from fuzz.targets import NOW, SECRET_HEX
from mtgworkers.protocol import faketls
from mtgworkers.protocol.secret import Secret

MAX_LEN = 4096
SECRET = Secret.parse(SECRET_HEX)


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    flags, wire = data[0], data[1:]
    eof = bool(flags & 1)
    try:
        result = faketls.read_client_hello(wire, eof=eof)
    except faketls.TLSError:
        return
    if result is None:
        assert not eof, "eof=True must decide"
        return
    hello, consumed = result
    assert 0 < consumed <= len(wire)
    # The records the hello took are enough, and every shorter prefix asks for more.
    assert faketls.read_client_hello(wire[:consumed], eof=True) == result
    for cut in (consumed - 1, consumed // 2, 5):
        if 0 <= cut < consumed:
            assert faketls.read_client_hello(wire[:cut]) is None
    if len(hello.canonical) - 5 <= 0xFFFF:
        again = faketls.read_client_hello(hello.canonical, eof=True)
        assert again is not None and again[0] == hello
    tolerance = 30 * 365 * 86400.0 if flags & 2 else 3.0
    try:
        faketls.verify_client_hello(hello, SECRET, NOW, tolerance)
    except faketls.TLSError:
        return
    answer = faketls.build_server_hello(hello, SECRET.key, urandom=lambda n: bytes(n))
    assert answer[:3] == b"\x16\x03\x03"
