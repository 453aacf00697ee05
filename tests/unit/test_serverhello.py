"""The fronting site's ServerHello (mtgworkers.protocol.serverhello) and our answer from its
shape (faketls.build_server_hello, ServerHandshake). Pure: bytes in, bytes out."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.protocol import faketls
from mtgworkers.protocol import serverhello as sh
from mtgworkers.protocol.handshake import Reply, ServerHandshake
from mtgworkers.protocol.secret import Secret
from mtgworkers.protocol.serverhello import (
    HRR_RANDOM,
    PROBE_ORDERS,
    SHAPE_MAX,
    AlertReceived,
    ServerHello,
    ServerHelloError,
    Shape,
    SuiteRule,
    decode_shape,
    encode_shape,
    parse_server_hello,
    probe_client_hello,
    shape_from_answers,
)
from tests.support.client import RANDOM_OFFSET, build_client_hello
from tests.support.client import parse_server_hello as verify

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
HOST = "front.test"
SID = bytes(range(32))
KEY_SHARE_X25519 = b"\x00\x1d\x00\x20" + bytes(range(100, 132))


# -- builders ----------------------------------------------------------------------------------


def ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">HH", kind, len(data)) + data


def site_hello(
    suite: int = 0x1301,
    extensions: Sequence[tuple[int, bytes]] = ((0x002B, b"\x03\x04"), (0x0033, KEY_SHARE_X25519)),
    *,
    random: bytes = bytes(range(32, 64)),
    session_id: bytes = SID,
    records: int = 1,
    record_version: int = 0x0303,
) -> bytes:
    """A site's ServerHello message, in ``records`` handshake records."""
    exts = b"".join(ext(k, d) for k, d in extensions)
    body = (
        b"\x03\x03"
        + random
        + bytes((len(session_id),))
        + session_id
        + struct.pack(">HB", suite, 0)
        + struct.pack(">H", len(exts))
        + exts
    )
    message = b"\x02" + len(body).to_bytes(3, "big") + body
    size = -(-len(message) // records)
    return b"".join(
        struct.pack(">BHH", 0x16, record_version, len(part)) + part
        for part in (message[i : i + size] for i in range(0, len(message), size))
    )


def parsed(data: bytes) -> ServerHello:
    result = parse_server_hello(data)
    assert result is not None
    return result[0]


# -- parsing -----------------------------------------------------------------------------------


def test_a_tls13_server_hello() -> None:
    data = site_hello(0x1302) + b"\x14\x03\x03\x00\x01\x01"
    result = parse_server_hello(data)
    assert result is not None
    hello, consumed = result
    assert consumed == len(data) - 6  # the CCS after it is not taken
    assert hello.cipher_suite == 0x1302 and hello.version == 0x0304
    assert hello.group == sh.GROUP_X25519 and hello.key_length == 32
    assert [kind for kind, _ in hello.extensions] == [0x002B, 0x0033]
    assert hello.session_id == SID and not hello.retry
    assert hello.record_version == 0x0303 and hello.record_length == len(data) - 11


def test_a_server_hello_in_several_records_and_every_prefix_needs_more() -> None:
    data = site_hello(records=5)
    hello = parsed(data)
    assert hello.cipher_suite == 0x1301
    for cut in range(len(data)):
        assert parse_server_hello(data[:cut]) is None, cut


def test_a_hello_retry_request() -> None:
    data = site_hello(extensions=((0x002B, b"\x03\x04"), (0x0033, b"\x11\xec")), random=HRR_RANDOM)
    hello = parsed(data)
    assert hello.retry and hello.group == sh.GROUP_X25519MLKEM768 and hello.key_length == 0


def test_a_tls12_server_hello_has_no_supported_versions() -> None:
    hello = parsed(site_hello(0xC02F, extensions=((0xFF01, b"\x00"),)))
    assert hello.version == 0x0303 and hello.group == 0


def test_a_server_hello_without_extensions() -> None:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\xc0\x2f\x00"
    message = b"\x02" + len(body).to_bytes(3, "big") + body
    hello = parsed(b"\x16\x03\x03" + struct.pack(">H", len(message)) + message)
    assert hello.extensions == () and hello.version == 0x0303


def test_an_alert() -> None:
    with pytest.raises(AlertReceived) as caught:
        parse_server_hello(b"\x15\x03\x03\x00\x02\x02\x28")
    assert caught.value.description == 40 and caught.value.level == 2
    assert parse_server_hello(b"\x15\x03\x03\x00\x02\x02") is None


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "not a TLS handshake record"),
        (b"\x16\x01\x00", "no TLS record version"),
        (b"\x16\x03\x03\x00\x04\x01\x00\x00\x00", "first handshake message is of type 1"),
        (site_hello(extensions=((0x002B, b"\x03\x04"), (0x002B, b"\x03\x04"))), "twice"),
        (site_hello(session_id=bytes(33)), "session id of 33 bytes"),
    ],
)
def test_bad_answers(data: bytes, text: str) -> None:
    with pytest.raises(ServerHelloError, match=text):
        parse_server_hello(data)


def test_an_extension_length_that_overruns() -> None:
    data = bytearray(site_hello())
    data[-36 - 4 + 3] = 0xFF  # key_share's length
    with pytest.raises(ServerHelloError):
        parse_server_hello(bytes(data))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        parse_server_hello(data)
    except ServerHelloError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 6))
def test_fuzz_random_body_in_handshake_records(body: bytes, records: int) -> None:
    message = b"\x02" + len(body).to_bytes(3, "big") + body
    size = -(-len(message) // records)
    data = b"".join(
        b"\x16\x03\x03" + struct.pack(">H", len(part)) + part
        for part in (message[i : i + size] for i in range(0, len(message), size))
    )
    try:
        parse_server_hello(data)
    except ServerHelloError:
        pass


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6), st.integers(0, 200)
)
def test_fuzz_mutated_server_hellos(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(site_hello(records=2) + b"\x14\x03\x03\x00\x01\x01")
    for where, value in flips:
        data[where % len(data)] = value
    try:
        parse_server_hello(bytes(data[: len(data) - cut % len(data)]))
    except ServerHelloError:
        pass


# -- shapes ------------------------------------------------------------------------------------

DEFAULT_EXTS = ((0x002B, b""), (0x0033, b""))


def answers(picks: Sequence[int], exts: Sequence[tuple[int, bytes]] | None = None) -> list:
    exts = exts or ((0x0033, KEY_SHARE_X25519), (0x002B, b"\x03\x04"))
    return [
        (offer, SID, parsed(site_hello(pick, exts)))
        for offer, pick in zip(PROBE_ORDERS, picks, strict=True)
    ]


@pytest.mark.parametrize(
    ("picks", "rule", "top", "supported"),
    [
        ((0x1301, 0x1303, 0x1302, 0x1301), SuiteRule.CLIENT, 0, (0x1301, 0x1302, 0x1303)),
        ((0x1302, 0x1302, 0x1302, 0x1302), SuiteRule.SERVER, 0x1302, (0x1302,)),
        ((0x1302, 0x1303, 0x1302, 0x1302), SuiteRule.SERVER_CHACHA, 0x1302, (0x1302, 0x1303)),
        # follows the client but has no AES-128: the fourth order tells it from the above
        ((0x1302, 0x1303, 0x1302, 0x1303), SuiteRule.CLIENT, 0, (0x1302, 0x1303)),
        ((0x1301, 0x1302, 0x1303, 0x1302), SuiteRule.UNKNOWN, 0, ()),
    ],
)
def test_the_suite_rule_is_learned(
    picks: tuple[int, ...], rule: SuiteRule, top: int, supported: tuple[int, ...]
) -> None:
    shape = shape_from_answers(answers(picks))
    assert (shape.rule, shape.top, shape.supported) == (rule, top, supported)
    assert shape.extensions == ((0x0033, b""), (0x002B, b""))
    assert decode_shape(encode_shape(shape)) == shape
    # the learned rule reproduces every answer it was learned from
    if rule is not SuiteRule.UNKNOWN:
        for offer, pick in zip(PROBE_ORDERS, picks, strict=True):
            assert (
                shape.select_suite(b"\x5a\x5a" + b"".join(struct.pack(">H", s) for s in offer))
                == pick
            )


def test_other_extensions_are_kept_in_order() -> None:
    exts = ((0x0033, KEY_SHARE_X25519), (0xABCD, b"xy"), (0x002B, b"\x03\x04"))
    shape = shape_from_answers(answers((0x1301,) * 4, exts))
    assert shape.extensions == ((0x0033, b""), (0xABCD, b"xy"), (0x002B, b""))
    block = shape.extensions_block(bytes(32))
    assert block == (
        bytes.fromhex("003400330024001d0020")
        + bytes(32)
        + bytes.fromhex("abcd00027879002b00020304")
    )


TLS13_X25519 = ((0x002B, b"\x03\x04"), (0x0033, KEY_SHARE_X25519))


@pytest.mark.parametrize(
    ("hello", "text"),
    [
        (
            site_hello(random=HRR_RANDOM, extensions=((0x002B, b"\x03\x04"), (0x0033, b"\0\x17"))),
            "another key share",
        ),
        (site_hello(0xC02F, extensions=((0xFF01, b"\x00"),)), "not TLS 1.3"),
        (site_hello(0x1304), "not offered"),
        (
            site_hello(extensions=((0x002B, b"\x03\x04"), (0x0033, b"\0\x17\0\x01\x04"))),
            "secp256r1",
        ),
        (site_hello(session_id=b""), "echo the session id"),
        (site_hello(extensions=(*TLS13_X25519, (0x0029, b"\0\0"))), "pre_shared_key"),
        (site_hello(extensions=(*TLS13_X25519, (0x0F00, bytes(41)))), "too much data"),
    ],
)
def test_answers_that_cannot_be_learned(hello: bytes, text: str) -> None:
    with pytest.raises(ServerHelloError, match=text):
        shape_from_answers([(PROBE_ORDERS[0], SID, parsed(hello))])


def test_no_answers() -> None:
    with pytest.raises(ServerHelloError):
        shape_from_answers([])


shapes = st.builds(
    lambda rule, top_index, mask, order, others: _shape(rule, top_index, mask, order, others),
    st.sampled_from(SuiteRule),
    st.integers(0, 4),
    st.integers(1, 31),
    st.booleans(),
    st.lists(
        st.tuples(st.integers(0x0100, 0x0FFF), st.binary(max_size=10)),
        max_size=4,
        unique_by=lambda item: item[0],
    ),
)


def _shape(
    rule: SuiteRule, top_index: int, mask: int, order: bool, others: list[tuple[int, bytes]]
) -> Shape:
    supported = {s for i, s in enumerate(sh.TLS13_SUITES) if mask >> i & 1}
    top = 0
    if rule is SuiteRule.UNKNOWN:
        supported = set()
    elif rule is SuiteRule.SERVER:
        top = sorted(supported)[top_index % len(supported)]
    elif rule is SuiteRule.SERVER_CHACHA:
        supported |= {0x1303}
        firsts = sorted(supported - {0x1303}) or [0x1301]
        supported |= {firsts[0]}
        top = firsts[top_index % len(firsts)]
    ours = [(0x002B, b""), (0x0033, b"")] if order else [(0x0033, b""), (0x002B, b"")]
    return Shape(
        rule,
        top,
        tuple(sorted(supported)),
        tuple(ours + [o for o in others if not sh.is_grease(o[0])]),
    )


@settings(max_examples=300, deadline=None)
@given(shapes)
def test_shapes_round_trip_within_the_slot(shape: Shape) -> None:
    blob = encode_shape(shape)
    assert len(blob) <= SHAPE_MAX
    assert decode_shape(blob) == shape


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_decode_shape(blob: bytes) -> None:
    try:
        shape = decode_shape(blob)
    except ServerHelloError:
        return
    assert encode_shape(shape) == blob


@settings(max_examples=300, deadline=None)
@given(shapes, st.lists(st.tuples(st.integers(0, 61), st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_shapes(shape: Shape, flips: list[tuple[int, int]]) -> None:
    blob = bytearray(encode_shape(shape))
    for where, value in flips:
        blob[where % len(blob)] = value
    try:
        decode_shape(bytes(blob))
    except ServerHelloError:
        pass


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        bytes.fromhex("020100000702002b0033"),  # unknown format
        bytes.fromhex("010900000702002b0033"),  # unknown rule
        bytes.fromhex("010213010202002b0033"),  # top not supported
        bytes.fromhex("010113010102002b0033"),  # a top with the client rule
        bytes.fromhex("010100002002002b0033"),  # unknown suites
        bytes.fromhex("010100000701002b"),  # key_share missing
        bytes.fromhex("010100000702002b002b"),  # twice
        bytes.fromhex("010100000703002b0033002900"),  # pre_shared_key
        bytes.fromhex("010100000702002b003300"),  # trailing byte
        bytes.fromhex("010100000703002b003312340500"),  # short
        bytes(63),
    ],
)
def test_bad_shapes(blob: bytes) -> None:
    with pytest.raises(ServerHelloError):
        decode_shape(blob)


def test_select_suite_rules() -> None:
    def offer(*suites: int) -> bytes:
        return b"".join(struct.pack(">H", s) for s in suites)

    client = Shape(SuiteRule.CLIENT, 0, (0x1301, 0x1302), DEFAULT_EXTS)
    assert client.select_suite(offer(0x1303, 0x1302, 0x1301)) == 0x1302
    assert client.select_suite(offer(0xC02F)) is None
    server = Shape(SuiteRule.SERVER, 0x1302, (0x1302,), DEFAULT_EXTS)
    assert server.select_suite(offer(0x1301, 0x1303, 0x1302)) == 0x1302
    assert server.select_suite(offer(0x1301)) is None
    chacha = Shape(SuiteRule.SERVER_CHACHA, 0x1301, (0x1301, 0x1303), DEFAULT_EXTS)
    assert chacha.select_suite(offer(0x0A0A, 0x1303, 0x1301)) == 0x1303
    assert chacha.select_suite(offer(0x1302, 0x1303, 0x1301)) == 0x1301
    assert Shape(SuiteRule.UNKNOWN, 0, (), DEFAULT_EXTS).select_suite(offer(0x1301)) is None
    assert client.select_suite(b"\x13") is None  # an odd byte is ignored


# -- probing hellos ------------------------------------------------------------------------------


def test_probe_hellos_parse_as_client_hellos() -> None:
    record = probe_client_hello(
        HOST,
        random=bytes(32),
        session_id=SID,
        key_shares=[(0x11EC, bytes(1216)), (0x001D, bytes(32))],
        suites=(0x1303, 0x1301, 0x1302),
        groups=(0x11EC, 0x001D),
    )
    result = faketls.read_client_hello(record)
    assert result is not None
    hello, consumed = result
    assert consumed == len(record) and hello.sni == (HOST.encode(),)
    assert hello.cipher_suite == 0x1303 and hello.session_id == SID
    assert hello.suites[:8] == bytes.fromhex("8a8a130313011302")
    small = probe_client_hello(None, random=bytes(32), session_id=b"", key_shares=[])
    assert len(small) == 517  # padded like a browser's


@pytest.mark.parametrize(
    "options",
    [{"random": bytes(31)}, {"session_id": bytes(33)}, {"sni": "x" * 256}, {"sni": "a\udc80"}],
)
def test_bad_probe_hellos(options: dict[str, object]) -> None:
    args: dict[str, object] = {
        "sni": HOST,
        "random": bytes(32),
        "session_id": b"",
        "key_shares": [],
    }
    args.update(options)
    with pytest.raises(ServerHelloError):
        probe_client_hello(**args)  # type: ignore[arg-type]


# -- our answer from a shape -----------------------------------------------------------------


def telegram_hello(ciphers: Sequence[int] = (0x1301, 0x1302, 0x1303, 0xC02B)) -> bytes:
    return build_client_hello(KEY, HOST, ciphers=ciphers, grease=True)


def client_hello_of(record: bytes) -> faketls.ClientHello:
    result = faketls.read_client_hello(record)
    assert result is not None
    return result[0]


def check_answer(record: bytes, answer: bytes) -> ServerHello:
    """The Telegram-like client's checks, then our own reading of the ServerHello."""
    verify(answer, record[RANDOM_OFFSET : RANDOM_OFFSET + 32], KEY, record[44 : 44 + record[43]])
    return parsed(answer)


def test_the_answer_follows_the_shape() -> None:
    shape = Shape(
        SuiteRule.SERVER,
        0x1302,
        (0x1302,),
        ((0x0033, b""), (0xABCD, b"\x01\x02"), (0x002B, b"")),
    )
    record = telegram_hello()
    answer = faketls.build_server_hello(client_hello_of(record), KEY, shape=shape)
    hello = check_answer(record, answer)
    assert hello.cipher_suite == 0x1302
    assert [kind for kind, _ in hello.extensions] == [0x0033, 0xABCD, 0x002B]
    assert hello.extension(0xABCD) == b"\x01\x02"
    assert hello.group == sh.GROUP_X25519 and hello.key_length == 32
    records, _ = split(answer)
    assert [r[0] for r in records] == [0x16, 0x14, 0x17]  # still exactly one noise record


def split(data: bytes) -> tuple[list[tuple[int, int]], int]:
    out, pos = [], 0
    while pos < len(data):
        rtype, _, length = struct.unpack_from(">BHH", data, pos)
        out.append((rtype, length))
        pos += 5 + length
    return out, pos


def test_a_shape_that_says_nothing_keeps_the_clients_first_suite() -> None:
    shape = Shape(SuiteRule.CLIENT, 0, (0x1304,), ((0x002B, b""), (0x0033, b"")))
    record = telegram_hello((0x1302, 0x1301))
    hello = check_answer(
        record, faketls.build_server_hello(client_hello_of(record), KEY, shape=shape)
    )
    assert hello.cipher_suite == 0x1302


def test_the_default_shape_gives_the_default_bytes() -> None:
    """A shape that says what today's answer does builds the very same bytes."""
    record = telegram_hello((0x1301, 0x1302))
    shape = Shape(SuiteRule.CLIENT, 0, (0x1301, 0x1302, 0x1303), ((0x002B, b""), (0x0033, b"")))
    stream = os.urandom(5000)

    def urandom() -> object:
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            pos += n
            return stream[pos - n : pos]

        return take

    hello = client_hello_of(record)
    plain = faketls.build_server_hello(hello, KEY, urandom=urandom())  # type: ignore[arg-type]
    shaped = faketls.build_server_hello(hello, KEY, urandom=urandom(), shape=shape)  # type: ignore[arg-type]
    assert plain == shaped


def test_every_answer_has_its_own_key_share() -> None:
    record = telegram_hello()
    shape = Shape(SuiteRule.CLIENT, 0, (0x1301,), DEFAULT_EXTS)
    keys = {
        check_answer(
            record, faketls.build_server_hello(client_hello_of(record), KEY, shape=s)
        ).extension(0x0033)
        for s in (shape, shape, None, None)
    }
    assert len(keys) == 4


def test_a_post_quantum_hello_gets_x25519() -> None:
    """A hello offering X25519MLKEM768 (with its share) and x25519 is answered x25519."""
    record = bytearray(
        probe_client_hello(
            HOST,
            random=bytes(32),
            session_id=SID,
            key_shares=[(0x11EC, os.urandom(1216)), (0x001D, os.urandom(32))],
            groups=(0x11EC, 0x001D),
        )
    )
    mac = hmac.new(KEY, bytes(record), hashlib.sha256).digest()
    stamp = int(time.time()).to_bytes(4, "little")
    record[RANDOM_OFFSET : RANDOM_OFFSET + 32] = mac[:28] + bytes(
        a ^ b for a, b in zip(mac[28:], stamp, strict=True)
    )
    hello = client_hello_of(bytes(record))
    faketls.verify_client_hello(hello, Secret(KEY, HOST), time.time(), 5)
    for shape in (None, Shape(SuiteRule.SERVER, 0x1302, (0x1302,), DEFAULT_EXTS)):
        answer = check_answer(bytes(record), faketls.build_server_hello(hello, KEY, shape=shape))
        assert answer.group == sh.GROUP_X25519 and answer.key_length == 32


# -- the handshake machine ---------------------------------------------------------------------


def machine(shape: object) -> ServerHandshake:
    return ServerHandshake(
        Secret(KEY, HOST),
        ("192.0.2.1", 1),
        tolerance=5.0,
        replayed=lambda _: False,
        random_bytes=os.urandom,
        shape=shape,  # type: ignore[arg-type]
    )


def reply_of(m: ServerHandshake, record: bytes) -> Reply:
    m.receive(record)
    m.next_action(time.time())  # ClientKnown
    action = m.next_action(time.time())
    assert isinstance(action, Reply)
    return action


def test_the_machine_asks_for_the_shape_once_per_valid_hello() -> None:
    asked = []
    shape = Shape(SuiteRule.SERVER, 0x1303, (0x1303,), ((0x0033, b""), (0x002B, b"")))

    def current() -> Shape | None:
        asked.append(1)
        return shape

    record = telegram_hello()
    hello = check_answer(record, reply_of(machine(current), record).data)
    assert hello.cipher_suite == 0x1303 and [k for k, _ in hello.extensions] == [0x0033, 0x002B]
    assert asked == [1]


def test_the_machine_without_a_learned_shape_answers_as_before() -> None:
    record = telegram_hello((0x1302, 0x1301))
    for source in (None, lambda: None):
        hello = check_answer(record, reply_of(machine(source), record).data)
        assert hello.cipher_suite == 0x1302
        assert [k for k, _ in hello.extensions] == [0x002B, 0x0033]
