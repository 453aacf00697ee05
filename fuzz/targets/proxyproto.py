"""PROXY protocol v1/v2: ``parse_header`` (incremental) and ``build_v2``.

Input: the first bytes of an accepted connection.
"""

from __future__ import annotations

from mtgworkers.protocol import proxyproto

MAX_LEN = 1024


def fuzz_one(data: bytes) -> None:
    try:
        result = proxyproto.parse_header(data)
    except proxyproto.ProxyProtocolError:
        return
    if result is None:
        return
    if result is proxyproto.NOT_PROXY:
        # More bytes cannot turn a decided "not PROXY" into a header.
        assert proxyproto.parse_header(data + b"\r\n") is proxyproto.NOT_PROXY
        return
    header, consumed = result
    assert 0 < consumed <= len(data)
    assert proxyproto.parse_header(data[:consumed]) == result
    for cut in (consumed - 1, consumed // 2, 1):
        if 0 < cut < consumed:
            assert proxyproto.parse_header(data[:cut]) is None
    if header.src is not None and header.dst is not None:
        rebuilt = proxyproto.build_v2(header.src, header.dst)
        again = proxyproto.parse_header(rebuilt)
        assert again is not None and again is not proxyproto.NOT_PROXY
        assert (again[0].src, again[0].dst) == (header.src, header.dst)
