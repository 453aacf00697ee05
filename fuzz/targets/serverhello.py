"""The fronting site's ServerHello: ``parse_server_hello``, learning a shape from up to four
answers, the shape's encoding, and our answer built with it read back.

Input: one byte (how many probe answers the bytes stand for, 1-4), then the site's answers
one after the other.
"""

from __future__ import annotations

from mtgworkers.protocol import faketls
from mtgworkers.protocol import serverhello as sh

MAX_LEN = 4096
_PROBE = sh.probe_client_hello(
    "storage.googleapis.com",
    random=bytes(32),
    session_id=bytes(range(32)),
    key_shares=[(sh.GROUP_X25519, bytes(32))],
)
_PARSED = faketls.read_client_hello(_PROBE)
assert _PARSED is not None
HELLO = _PARSED[0]


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    count, wire = 1 + data[0] % 4, data[1:]
    try:
        sh.decode_shape(wire[: sh.SHAPE_MAX])
    except sh.ServerHelloError:
        pass
    answers = []
    pos = 0
    for order in sh.PROBE_ORDERS[:count]:
        try:
            result = sh.parse_server_hello(wire[pos:])
        except sh.ServerHelloError:
            return
        if result is None:
            return
        hello, consumed = result
        assert 0 < consumed <= len(wire) - pos
        hello.version, hello.group, hello.key_length, hello.retry  # noqa: B018
        answers.append((order, hello.session_id, hello))
        pos += consumed
    try:
        shape = sh.shape_from_answers(answers)
    except sh.ServerHelloError:
        return
    blob = sh.encode_shape(shape)
    assert len(blob) <= sh.SHAPE_MAX and sh.decode_shape(blob) == shape
    shape.describe()
    ours = faketls.build_server_hello(HELLO, bytes(16), noise_len=1, urandom=bytes, shape=shape)
    parsed = sh.parse_server_hello(ours)
    assert parsed is not None
    back = parsed[0]
    assert [kind for kind, _ in back.extensions] == [kind for kind, _ in shape.extensions]
    assert back.cipher_suite == (shape.select_suite(HELLO.suites) or HELLO.cipher_suite)
    assert back.version == sh.TLS13 and back.group == sh.GROUP_X25519
