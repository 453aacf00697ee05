"""The sans-IO handshake machine (mtgworkers.protocol.handshake), driven by bytes alone.

Every stream is fed split at every offset (and byte by byte): the decisions must not
depend on how TCP cut the bytes. Hostile input only ever produces actions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.protocol import handshake as hs
from mtgworkers.protocol.handshake import (
    NEED_DATA,
    ClientKnown,
    Close,
    CloseReason,
    Dial,
    Front,
    FrontReason,
    Reply,
    ServerHandshake,
)
from mtgworkers.protocol.secret import Secret
from tests.support.client import (
    RANDOM_OFFSET,
    build_client_hello,
    build_layout_hello,
    parse_server_hello,
)
from tests.support.wire import CCS_RECORD, TAGS, obfs2_client_frame, wrap_records

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
HOST = "front.test"
SECRET = Secret(KEY, HOST)
NOW = 1_800_000_000.0
PEER = ("192.0.2.10", 40000)
PROXY_V1 = b"PROXY TCP4 198.51.100.7 192.0.2.1 5555 443\r\n"
PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


class Replays:
    """An in-memory replay filter that records what it was asked."""

    def __init__(self, seen: Iterable[bytes] = ()) -> None:
        self.seen = set(seen)
        self.asked: list[bytes] = []

    def __call__(self, session_id: bytes) -> bool:
        self.asked.append(session_id)
        known = session_id in self.seen
        self.seen.add(session_id)
        return known


def machine(replays: Callable[[bytes], bool] | None = None, **options: object) -> ServerHandshake:
    return ServerHandshake(
        SECRET,
        PEER,
        tolerance=3.0,
        replayed=replays or Replays(),
        random_bytes=os.urandom,
        **options,  # type: ignore[arg-type]
    )


def run(m: ServerHandshake, chunks: Iterable[bytes], now: float = NOW) -> list[object]:
    """Feed the chunks, collecting every action until NEED_DATA after each one."""
    return feed(m, chunks, now)[0]


def feed(
    m: ServerHandshake, chunks: Iterable[bytes], now: float = NOW
) -> tuple[list[object], bytes]:
    """Like :func:`run`, but stop at a terminal action; also return the bytes not fed
    (after a terminal action they are the caller's: the relay's or the fronting host's)."""
    actions: list[object] = []
    pending = list(chunks)
    while pending and not m.done:
        m.receive(pending.pop(0))
        while (action := m.next_action(now)) is not NEED_DATA:
            actions.append(action)
    return actions, b"".join(pending)


def splits(data: bytes) -> Iterable[list[bytes]]:
    """The stream in one piece, in two pieces at every offset, and byte by byte."""
    yield [data]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


def hello(session_id: bytes | None = None, timestamp: float = NOW, **kw: object) -> bytes:
    return build_client_hello(KEY, HOST, timestamp=int(timestamp), session_id=session_id, **kw)  # type: ignore[arg-type]


def client_stream(
    dc: int = 2, tag: str = "dd", payload: bytes = b"after the frame", record: int = 16379
) -> tuple[bytes, bytes, object]:
    """(hello record, CCS + frame + payload records, the client's obfuscated2 state)."""
    obfs = obfs2_client_frame(KEY, dc, TAGS[tag])
    body = obfs.wire + obfs.encryptor.update(payload)
    return hello(), CCS_RECORD + wrap_records(body, record), obfs


def _check_full_handshake(
    actions: list[object], client_hello: bytes, obfs: object, later: bytes = b""
) -> None:
    assert len(actions) == 3, actions
    known, reply, dial = actions
    assert known == ClientKnown(PEER)
    assert isinstance(reply, Reply)
    parse_server_hello(
        reply.data,
        client_hello[RANDOM_OFFSET : RANDOM_OFFSET + 32],
        KEY,
        client_hello[44 : 44 + client_hello[43]],
    )
    assert isinstance(dial, Dial)
    assert dial.dc == 2 and dial.handshake.tag == TAGS["dd"]
    # bytes behind the frame: what came with it, then the rest through the record reader
    relayed = dial.pending + b"".join(bytes(p) for p in dial.reader.feed(later))
    assert dial.handshake.decryptor.update(relayed) == b"after the frame"
    # the proxy's answer stream is what the client decrypts
    assert obfs.decryptor.update(dial.handshake.encryptor.update(b"pong")) == b"pong"  # type: ignore[attr-defined]


def test_a_full_handshake_split_anywhere_gives_the_same_decisions() -> None:
    client_hello, rest, _ = client_stream()
    stream = client_hello + rest
    for chunks in splits(stream):
        # the obfuscated2 state is consumed per run: build a fresh stream each time
        client_hello, rest, obfs = client_stream()
        stream = client_hello + rest
        pieces, pos = [], 0
        for chunk in chunks:
            pieces.append(stream[pos : pos + len(chunk)])
            pos += len(chunk)
        m = machine()
        actions, later = feed(m, pieces)
        _check_full_handshake(actions, client_hello, obfs, later)
        assert m.done
        assert m.next_action(NOW) is NEED_DATA


def test_the_frame_may_span_many_small_records() -> None:
    client_hello, rest, obfs = client_stream(record=7)
    m = machine()
    _check_full_handshake(run(m, [client_hello + rest]), client_hello, obfs)


def test_the_hello_may_come_in_several_records() -> None:
    client_hello, rest, _ = client_stream()
    payload = client_hello[5:]
    fragmented = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
        for part in (payload[:3], payload[3:200], payload[200:])
    )
    m = machine()
    actions = run(m, [fragmented, rest])
    assert isinstance(actions[1], Reply) and isinstance(actions[2], Dial)


def test_a_large_hello_with_a_post_quantum_key_share_is_served() -> None:
    # X25519MLKEM768 share: 1216 bytes of ML-KEM plus 32 of X25519 (Android, Chrome)
    big = hello(key_share=os.urandom(1216))
    assert len(big) > 1400
    _, rest, _ = client_stream()
    for cut in (5, 517, 1000, len(big) - 1):
        m = machine()
        actions = run(m, [big[:cut], big[cut:] + rest])
        assert [type(a) for a in actions] == [ClientKnown, Reply, Dial]


@pytest.mark.parametrize(
    ("layout", "sni"), [("chrome", HOST), ("android", HOST), ("android", None)]
)
def test_2026_hellos_are_served_whatever_the_segment_boundary(layout: str, sni: str | None) -> None:
    # Chrome's (X25519MLKEM768 share, ECH GREASE) and Android's post-quantum hello, with
    # SNI and without (iOS): past one TCP segment, so they arrive cut somewhere.
    big = build_layout_hello(KEY, sni, layout, timestamp=int(NOW))
    assert 1700 < len(big) < 1900
    for cut in range(1, len(big)):
        _, rest, obfs = client_stream()
        actions, later = feed(machine(), [big[:cut], big[cut:] + rest])
        _check_full_handshake(actions, big, obfs, later)


def test_proxy_header_names_the_client_and_is_not_fronted() -> None:
    probe = b"GET / HTTP/1.1\r\n\r\n"
    for chunks in splits(PROXY_V1 + probe):
        m = machine(proxy_header=True)
        actions = run(m, chunks)
        assert actions[0] == ClientKnown(("198.51.100.7", 5555))
        front = actions[1]
        assert isinstance(front, Front) and front.reason is FrontReason.BAD_HELLO
        # what the fronting host gets starts right after the header
        assert probe.startswith(front.data) and front.data


def test_without_a_header_the_listener_serves_the_tcp_peer() -> None:
    client_hello, rest, obfs = client_stream()
    m = machine(proxy_header=True)
    _check_full_handshake(*feed(m, [client_hello, rest])[:1], client_hello, obfs)


@pytest.mark.parametrize(
    ("stream", "options", "reason"),
    [
        (PROXY_V1, {"header_allowed": False}, CloseReason.PROXY_UNTRUSTED),
        (PROXY_V2_LOCAL, {}, CloseReason.PROXY_NO_CLIENT),
        (b"PROXY UNKNOWN\r\n", {}, CloseReason.PROXY_NO_CLIENT),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", {}, CloseReason.PROXY_MALFORMED),
    ],
)
def test_proxy_header_refusals(stream: bytes, options: dict[str, object], reason: object) -> None:
    for chunks in splits(stream):
        actions = run(machine(proxy_header=True, **options), chunks)
        assert len(actions) == 1 and isinstance(actions[0], Close), actions
        assert actions[0].reason is reason


def test_a_header_is_not_parsed_when_the_listener_expects_none() -> None:
    actions = run(machine(), [PROXY_V1])
    assert actions[0] == ClientKnown(PEER)
    assert isinstance(actions[1], Front) and actions[1].data == PROXY_V1


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: b"GET / HTTP/1.1\r\n", "unexpected record type 0x47"),
        (lambda: build_client_hello(os.urandom(16), HOST, timestamp=int(NOW)), "client random"),
        (lambda: build_client_hello(KEY, "other.test", timestamp=int(NOW)), "cannot find"),
        (lambda: hello(timestamp=NOW - 3600), "too old"),
    ],
)
def test_hellos_that_are_not_ours_are_fronted_with_every_byte(
    make: Callable[[], bytes], error: str
) -> None:
    stream = make() + b"\x17\x03\x03\x00\x02hi"
    for chunks in splits(stream):
        actions, later = feed(machine(), chunks)
        front = actions[-1]
        assert isinstance(front, Front), actions
        assert front.reason is FrontReason.BAD_HELLO and error in front.error
        # the caller forwards what arrives after the decision: together, every byte
        assert front.data + later == stream


def test_a_replayed_hello_is_fronted() -> None:
    session_id = os.urandom(32)
    replays = Replays([session_id])
    record = hello(session_id=session_id)
    actions = run(machine(replays), [record])
    assert replays.asked == [session_id]
    assert actions[1] == Front(FrontReason.REPLAY, "", record)


def test_the_replay_filter_is_asked_only_for_valid_hellos() -> None:
    replays = Replays()
    run(machine(replays), [build_client_hello(os.urandom(16), HOST, timestamp=int(NOW))])
    assert replays.asked == []


def test_the_clock_comes_from_the_caller() -> None:
    record = hello(timestamp=NOW)
    assert isinstance(run(machine(), [record], now=NOW + 2.9)[1], Reply)
    assert isinstance(run(machine(), [record], now=NOW + 3.1)[1], Front)
    assert time.time() != NOW  # the machine never read the real clock


@pytest.mark.parametrize(
    ("after_hello", "error"),
    [
        (CCS_RECORD + b"\x17\x03\x01\x00\x40" + bytes(64), "cannot read frame: incorrect tls"),
        (CCS_RECORD + wrap_records(os.urandom(64)), "unsupported connection type"),
    ],
)
def test_bad_frames_close(after_hello: bytes, error: str) -> None:
    for chunks in splits(hello() + after_hello):
        actions = run(machine(), chunks)
        assert [type(a) for a in actions] == [ClientKnown, Reply, Close]
        close = actions[-1]
        assert close.reason is CloseReason.OBFS2_FAILED and error in close.error  # type: ignore[attr-defined]


def test_nothing_happens_after_a_terminal_action() -> None:
    m = machine()
    actions = run(m, [b"\x15\x03\x01\x00\x02\x02\x28"])
    assert isinstance(actions[-1], Front)
    m.receive(b"more bytes")
    assert m.next_action(NOW) is NEED_DATA and m.done


def test_an_incomplete_hello_is_parsed_once_per_record() -> None:
    record = hello()
    m = machine()
    run(m, [record[:5]])
    calls = 0
    real = hs.faketls.read_client_hello

    def counting(*args: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    hs.faketls.read_client_hello = counting  # type: ignore[assignment]
    try:
        actions = run(m, [record[i : i + 1] for i in range(5, len(record))])
    finally:
        hs.faketls.read_client_hello = real
    assert isinstance(actions[-1], Reply)
    assert calls == 1  # not once per byte


ACTION_TYPES = (ClientKnown, Reply, Front, Dial, Close)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=2048),
    cuts=st.lists(st.integers(min_value=0, max_value=2048), max_size=6),
    proxy_header=st.booleans(),
    prefix=st.sampled_from([b"", PROXY_V1, b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01\x00"]),
)
def test_hostile_input_only_produces_actions(
    data: bytes, cuts: list[int], proxy_header: bool, prefix: bytes
) -> None:
    stream = prefix + data
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    m = machine(proxy_header=proxy_header)
    actions = run(m, chunks)
    assert all(isinstance(a, ACTION_TYPES) for a in actions)
    terminal = [a for a in actions if isinstance(a, (Front, Dial, Close))]
    assert len(terminal) <= 1 and (not terminal or actions[-1] is terminal[0])


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=512), cut=st.integers(min_value=0, max_value=600))
def test_hostile_bytes_after_a_valid_hello(garbage: bytes, cut: int) -> None:
    stream = hello() + garbage
    cut = min(cut, len(stream))
    actions = run(machine(), [stream[:cut], stream[cut:]])
    assert isinstance(actions[1], Reply)
    assert all(isinstance(a, ACTION_TYPES) for a in actions)


def test_a_hello_without_sni_is_served_on_its_hmac() -> None:
    _, rest, obfs = client_stream()
    no_sni = build_client_hello(KEY, None, timestamp=int(NOW))
    actions, later = feed(machine(), [no_sni, rest])
    reply = actions[1]
    assert isinstance(reply, Reply) and reply.without_sni
    _check_full_handshake(actions, no_sni, obfs, later)
    # with SNI the flag is off
    with_sni = run(machine(), [hello()])[1]
    assert isinstance(with_sni, Reply) and not with_sni.without_sni


def test_a_stranger_without_sni_and_a_hello_for_another_host_are_fronted() -> None:
    stranger = build_client_hello(os.urandom(16), None, timestamp=int(NOW))
    front = run(machine(), [stranger])[1]
    assert isinstance(front, Front) and "incorrect client random" in front.error
    other = build_client_hello(KEY, "elsewhere.test", timestamp=int(NOW))
    front = run(machine(), [other])[1]
    assert isinstance(front, Front) and "cannot find front.test" in front.error


def test_a_bad_record_type_after_the_first_hello_record_is_fronted_at_once() -> None:
    # The first record is complete and its handshake header asks for more records; the
    # next record starts with a wrong type byte. That byte decides, however the bytes are
    # cut: the machine must not wait for the rest of a record header it already knows is
    # not a handshake record's (it did, when the first record came in a read of its own).
    first = b"\x16\x03\x01\x00\x04" + b"\x01\x00\x10\x00"
    stream = first + b"\x03\x03"
    error = "cannot read client hello: unexpected record type 0x3"
    for chunks in splits(stream):
        actions = run(machine(), chunks)
        assert len(actions) == 2, (chunks, actions)
        assert actions[1] == Front(FrontReason.BAD_HELLO, error, actions[1].data)  # type: ignore[attr-defined]
        assert stream.startswith(actions[1].data)  # type: ignore[attr-defined]
