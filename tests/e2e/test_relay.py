"""End-to-end: FakeTLS + obfuscated2 sessions relayed to a fake DC (docs/protocol.md §0, §4, §15).

All tests share one proxy, fake DC and website (``shared_env``); each test looks only at
the connections it made itself.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.support.client import build_layout_hello, run_concurrently
from tests.support.env import SharedEnv
from tests.support.wire import PATTERN, TAGS

pytestmark = pytest.mark.e2e


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("tag", ["dd", "ee", "ef"])
@pytest.mark.parametrize("dc", [1, 2, 3, 4, 5, -2])
def test_round_trip_both_ways(shared_env: SharedEnv, tag: str, dc: int) -> None:
    env = shared_env
    first = len(env.fake_dc.connections)
    with env.client() as client:
        client.handshake(dc=dc, tag=tag)
        for size in (1, 1000, 16379, 70_001):
            payload = os.urandom(size)
            client.send(payload)
            assert client.recv_exactly(size) == payload
    conn = env.fake_dc.wait_for_connection(first)
    # The proxy forwards the client's transport tag (the framing passes through unchanged)
    # and names the DC it dialled, which is abs(dc) (mtg drops the media sign).
    assert conn.tag == TAGS[tag]
    assert conn.dc == abs(dc)
    assert conn.closed.wait(5), "DC connection not closed after the client left"
    assert conn.bytes_in == conn.bytes_out == 1 + 1000 + 16379 + 70_001
    env.proxy.assert_alive()


def test_upload_is_delivered_intact(shared_env: SharedEnv) -> None:
    env = shared_env
    size = 3 * 1024 * 1024 + 17
    first = len(env.fake_dc.connections)
    with env.fake_dc.configured(mode="sink"), env.client() as client:
        client.handshake(dc=4)
        for offset in range(0, size, 100_000):
            client.send(PATTERN.chunk(offset, min(100_000, size - offset)))
        conn = env.fake_dc.wait_for_connection(first)
        _wait(lambda: conn.bytes_in >= size, 10, f"{size} bytes at the DC")
    assert conn.bytes_in == size
    assert conn.mismatch_at is None, f"DC received wrong bytes at offset {conn.mismatch_at}"


def test_download_is_delivered_intact(shared_env: SharedEnv) -> None:
    env = shared_env
    size = 3 * 1024 * 1024 + 17
    with env.fake_dc.configured(mode="source", source_size=size), env.client() as client:
        client.handshake(dc=3)
        received = 0
        while received < size:
            chunk = client.recv_some(size - received)
            assert chunk, f"EOF after {received} of {size} bytes"
            bad = PATTERN.mismatch(received, chunk)
            assert bad is None, f"client received wrong bytes at offset {bad}"
            received += len(chunk)


def test_dc_close_is_flushed_then_propagated(shared_env: SharedEnv) -> None:
    """The DC sends 1 MiB and closes: the client gets every byte, then EOF."""
    env = shared_env
    size = 1024 * 1024
    settings = {"mode": "source", "source_size": size, "close_after_source": True}
    with env.fake_dc.configured(**settings), env.client() as client:
        client.handshake(dc=2)
        data = client.recv_exactly(size)
        assert PATTERN.mismatch(0, data) is None
        assert client.wait_closed(5) == "eof"


def test_client_reset_closes_the_dc_connection(shared_env: SharedEnv) -> None:
    env = shared_env
    first = len(env.fake_dc.connections)
    with env.fake_dc.configured(mode="source", source_size=256 * 1024 * 1024):
        client = env.client()
        client.handshake(dc=2)
        client.recv_exactly(100_000)
        # SO_LINGER 0: close() sends RST with data still unread.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        conn = env.fake_dc.wait_for_connection(first)
        assert conn.closed.wait(5), "DC connection still open 5 s after the client reset"
    assert conn.bytes_out < 256 * 1024 * 1024
    env.proxy.assert_alive()


def test_payload_in_the_same_record_as_the_frame(shared_env: SharedEnv) -> None:
    with shared_env.client() as client:
        client.handshake(dc=2, initial=b"early bytes right behind the frame")
        assert client.recv_exactly(34) == b"early bytes right behind the frame"
        client.send(b"and later ones")
        assert client.recv_exactly(14) == b"and later ones"


def test_tiny_tls_records(shared_env: SharedEnv) -> None:
    """Frame and payload cut into 7-byte records: record boundaries mean nothing."""
    with shared_env.client(max_record=7) as client:
        client.handshake(dc=5, tag="ee")
        payload = os.urandom(5000)
        client.send(payload)
        assert client.recv_exactly(5000) == payload


def test_grease_hello_and_no_client_ccs(shared_env: SharedEnv) -> None:
    with shared_env.client() as client:
        client.send_client_hello(grease=True)
        info = client.read_server_hello()
        assert info.cipher_suite == 0x1301  # first non-GREASE suite of ours, echoed
        client.send_obfs2_frame(2, "dd", ccs=False)
        client.send(b"x" * 100)
        assert client.recv_exactly(100) == b"x" * 100


@pytest.mark.parametrize(
    ("layout", "with_sni"), [("chrome", True), ("android", True), ("android", False)]
)
def test_large_2026_hellos_in_two_tcp_segments(
    shared_env: SharedEnv, layout: str, with_sni: bool
) -> None:
    # ~1.75 KB hellos with an X25519MLKEM768 share (Chrome's also with ECH GREASE), cut
    # where a 1,460-byte MSS cuts them on the Internet.
    sni = shared_env.secret.host if with_sni else None
    with shared_env.client(sni=sni) as client:
        raw = build_layout_hello(client.secret_key, sni, layout)
        client.hello = raw
        client.send_raw(raw[:1460])
        # Nothing to await: the pause only keeps the two writes in separate segments.
        time.sleep(0.02)
        client.send_raw(raw[1460:])
        client.read_server_hello()
        client.send_obfs2_frame(2, "dd")
        client.send(b"ping" * 100)
        assert client.recv_exactly(400) == b"ping" * 100


def test_many_concurrent_sessions(shared_env: SharedEnv) -> None:
    env = shared_env
    first = len(env.fake_dc.connections)

    def session(i: int) -> int:
        with env.client() as client:
            client.handshake(dc=1 + i % 5, tag=("dd", "ee", "ef")[i % 3])
            payload = os.urandom(50_000 + i)
            client.send(payload)
            assert client.recv_exactly(len(payload)) == payload
            return len(payload)

    sizes = run_concurrently(60, session)
    conns = env.fake_dc.connections[first:]
    assert len(conns) == 60
    assert sorted(c.bytes_in for c in conns) == sorted(sizes)
    env.proxy.assert_alive()


def test_unknown_dc_without_fallback_closes(shared_env: SharedEnv) -> None:
    env = shared_env
    before = env.fake_dc.stats()["connections"]
    with env.client() as client:
        client.handshake(dc=99)
        record = env.proxy.wait_for_log(
            "cannot dial to telegram",
            predicate=lambda r: "99" in str(r.get("error", "")),
        )
        assert record["error"] == "no available addresses for DC 99"
        assert client.wait_closed(5) == "eof"
    assert env.fake_dc.stats()["connections"] == before
    env.proxy.assert_alive()


def test_session_logs(shared_env: SharedEnv) -> None:
    """mtg's stream lines are printed with a stream id and the client ip."""
    with shared_env.client() as client:
        client.handshake(dc=2)
        client.send(b"ping")
        assert client.recv_exactly(4) == b"ping"
    started = shared_env.proxy.wait_for_log("Stream has been started")
    assert started["client-ip"] == "127.0.0.1"
    assert len(started["stream-id"]) == 22
    shared_env.proxy.wait_for_log(
        "Stream has been finished", predicate=lambda r: r.get("stream-id") is not None
    )


def test_client_sees_a_proper_welcome_packet(shared_env: SharedEnv) -> None:
    """ServerHello shape and noise size as in docs/protocol.md §3.7 (HMAC checked by the client)."""
    with shared_env.client() as client:
        info = client.handshake(dc=2)
    assert info.cipher_suite == 0x1301
    assert [t for t, _ in info.extensions] == [0x002B, 0x0033]
    assert 1000 <= info.noise_len <= 16379
    raw_hs = info.raw[: 5 + int.from_bytes(info.raw[3:5], "big")]
    assert len(raw_hs) == 127  # 32-byte session id


def test_wrong_protocol_version_after_handshake_closes(shared_env: SharedEnv) -> None:
    """docs/protocol.md §3.8: a record with version != 03 03 on the data path ends the session."""
    with shared_env.client() as client:
        client.handshake(dc=2)
        client.send(b"ok")
        assert client.recv_exactly(2) == b"ok"
        client.send_raw(b"\x17\x03\x01\x00\x02ab")
        assert client.wait_closed(5) in ("eof", "reset")
    shared_env.proxy.assert_alive()
