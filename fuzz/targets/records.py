"""The TLS record stream after the handshake: ``RecordReader``, ``records_end`` and
``wrap_application_data``, checked against a plain reference reading.

Input: one byte choosing how the stream is cut into chunks, then the stream.
"""

from __future__ import annotations

from fuzz.targets import chunks
from mtgworkers.protocol import faketls

MAX_LEN = 8192


def _reference(stream: bytes) -> tuple[bytes, bool]:
    """(ApplicationData payload, whether a record has a wrong version)."""
    out = bytearray()
    pos = 0
    while len(stream) - pos >= 5:
        rtype, version = stream[pos], stream[pos + 1 : pos + 3]
        if version != b"\x03\x03":
            return bytes(out), True
        end = pos + 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
        if rtype == 0x17:
            out += stream[pos + 5 : end]
        pos = end
    return bytes(out), False


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    seed, stream = data[0], data[1:]
    expected, broken = _reference(stream)
    reader = faketls.RecordReader()
    got = bytearray()
    try:
        for chunk in chunks(stream, seed):
            got += b"".join(bytes(part) for part in reader.feed(chunk))
    except faketls.TLSError:
        assert broken, "an error without a wrong version"
        assert expected.startswith(bytes(got))
    else:
        assert not broken, "a wrong version went unnoticed"
        assert bytes(got) == expected

    for start in (0, 1, len(stream) // 2):
        if start <= len(stream):
            assert faketls.records_end(stream, start) > len(stream)

    size = 1 + (seed * 37) % 700
    wrapped = faketls.wrap_application_data(stream, size)
    back = b"".join(bytes(part) for part in faketls.RecordReader().feed(wrapped))
    assert back == stream
