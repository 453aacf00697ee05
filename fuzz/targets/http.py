"""The HTTP/1.1 answer reader ``read_response``, with the download client's and the DoH
client's limits and wording.

Input: one flag byte (bits 0-1: the stream's line limit; bits 2-3: ``max_body``; bit 4:
DoH), then the whole answer up to the end of the connection.
"""

from __future__ import annotations

import asyncio

from fuzz.targets import run_now
from mtgworkers.net import dns as dns_module
from mtgworkers.net.http import ResponseError, read_response

MAX_LEN = 4096
LOOP = asyncio.new_event_loop()
LIMITS = (32, 256, 4096, 65536)
BODIES = (0, 16, 1024, 65535)


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    flags, answer = data[0], data[1:]
    stream = asyncio.StreamReader(limit=LIMITS[flags & 3], loop=LOOP)
    stream.feed_data(answer)
    stream.feed_eof()
    if flags & 0x10:
        try:
            status, _, body = run_now(dns_module._read_http_response(stream))
        except dns_module._QueryError:
            return
        assert len(body) <= 65535 and not 100 <= status < 200
        return
    max_body = BODIES[(flags >> 2) & 3]
    try:
        response = run_now(read_response(stream, max_body=max_body, max_head=1024))
    except ResponseError:
        return
    assert len(response.body) <= max_body
    assert not 100 <= response.status < 200
