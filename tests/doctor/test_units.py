"""Pure parts of doctor: SNTP packets, the probe's FakeTLS client, verdicts, the report."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers.config import format_duration
from mtgworkers.doctor import faceoff, sntp
from mtgworkers.doctor import faketls_client as ftc
from mtgworkers.doctor.checks import deprecated_message
from mtgworkers.doctor.probe import judge, probe_target
from mtgworkers.doctor.report import Report, Section, Status
from mtgworkers.doctor.sni import PublicAddresses, family_matches, split_families
from mtgworkers.doctor.tlsclient import Observation
from mtgworkers.protocol import faketls, obfs2
from mtgworkers.protocol.secret import Secret
from mtgworkers.protocol.serverhello import ServerHelloError

# -- SNTP ----------------------------------------------------------------------------------


def _reply(transmit: int, server_time: float, *, mode: int = 4, stratum: int = 2) -> bytes:
    now = int((server_time + sntp.NTP_EPOCH_OFFSET) * (1 << 32))
    head = struct.pack(">BBbb II 4s Q", (4 << 3) | mode, stratum, 0, 0, 0, 0, b"GPS\x00", now)
    return head + struct.pack(">QQQ", transmit, now, now)


def test_sntp_request_layout() -> None:
    packet, transmit = sntp.build_request(1_700_000_000.25, urandom=lambda n: b"\xab\xcd")
    assert len(packet) == 48
    assert packet[0] == (4 << 3) | 3  # version 4, client
    assert struct.unpack(">Q", packet[40:48])[0] == transmit
    assert transmit & 0xFFFF == 0xABCD
    seconds = (transmit >> 32) - sntp.NTP_EPOCH_OFFSET
    assert seconds == 1_700_000_000


@pytest.mark.parametrize("offset", [0.0, 2.5, -0.75, 3600.0])
def test_sntp_offset(offset: float) -> None:
    sent = 1_700_000_000.0
    _packet, transmit = sntp.build_request(sent)
    # The server answers 10 ms after we sent, we read it 20 ms after sending.
    result = sntp.parse_response(_reply(transmit, sent + 0.010 + offset), transmit, sent + 0.020)
    assert result.offset == pytest.approx(offset, abs=1e-3)
    assert result.delay == pytest.approx(0.020, abs=1e-3)
    assert result.stratum == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d, t: d[:47], "short reply"),
        (lambda d, t: _reply(t, 1.7e9, mode=3), "not a server reply"),
        (lambda d, t: _reply(t + 1, 1.7e9), "does not answer our request"),
        (lambda d, t: _reply(t, 1.7e9, stratum=0), "kiss-of-death from server: GPS"),
        (lambda d, t: _reply(t, 1.7e9, stratum=16), "not synchronised"),
    ],
)
def test_sntp_bad_replies(mutate: object, message: str) -> None:
    _, transmit = sntp.build_request(1.7e9)
    data = mutate(_reply(transmit, 1.7e9), transmit)  # type: ignore[operator]
    with pytest.raises(sntp.SNTPError, match=message):
        sntp.parse_response(data, transmit, 1.7e9)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=80), transmit=st.integers(0, 2**64 - 1))
def test_sntp_parser_raises_only_its_error(data: bytes, transmit: int) -> None:
    try:
        sntp.parse_response(data, transmit, 1.7e9)
    except sntp.SNTPError:
        pass


def test_go_duration_formatting_of_offsets() -> None:
    assert format_duration(-607.048e-6) == "-607.048\u00b5s"
    assert format_duration(0) == "0s"
    assert format_duration(90) == "1m30s"
    assert format_duration(-1.5) == "-1.5s"


# -- FakeTLS client ------------------------------------------------------------------------


SECRET = Secret(bytes(range(16)), "fronting.test")


def test_client_hello_is_accepted_by_our_server_side() -> None:
    now = time.time()
    hello = ftc.build_client_hello(SECRET.key, SECRET.host, now)
    parsed, consumed = faketls.read_client_hello(hello.record)  # type: ignore[misc]
    assert consumed == len(hello.record) == 5 + ftc.HANDSHAKE_LEN
    assert parsed.sni == (b"fronting.test",)
    assert parsed.session_id == hello.session_id
    faketls.verify_client_hello(parsed, SECRET, now, 3.0)
    with pytest.raises(faketls.BadTimestamp):
        faketls.verify_client_hello(parsed, SECRET, now + 60, 3.0)
    wrong = Secret(os.urandom(16), SECRET.host)
    with pytest.raises(faketls.BadDigest):
        faketls.verify_client_hello(parsed, wrong, now, 3.0)


def test_client_hello_without_sni() -> None:
    hello = ftc.build_client_hello(SECRET.key, None, time.time())
    parsed, _ = faketls.read_client_hello(hello.record)  # type: ignore[misc]
    assert parsed.sni is None


def test_server_hello_verification() -> None:
    hello = ftc.build_client_hello(SECRET.key, SECRET.host, time.time())
    parsed, _ = faketls.read_client_hello(hello.record)  # type: ignore[misc]
    answer = faketls.build_server_hello(parsed, SECRET.key)
    records, used = ftc.split_records(answer + b"\x17\x03")
    assert used == len(answer) and len(records) == 3
    assert ftc.verify_server_hello(records, SECRET.key, hello.random)
    assert not ftc.verify_server_hello(records, os.urandom(16), hello.random)
    assert not ftc.verify_server_hello(records[:2], SECRET.key, hello.random)
    tampered = bytearray(answer)
    tampered[-1] ^= 1
    assert not ftc.verify_server_hello(ftc.split_records(tampered)[0], SECRET.key, hello.random)


def test_client_frame_is_understood_by_our_server_side() -> None:
    wire, encryptor, decryptor = ftc.client_frame(SECRET.key, 2)
    server = obfs2.parse_client_frame(wire, SECRET.key)
    assert server.tag == obfs2.TAG_PADDED and server.dc == 2
    message = ftc.req_pq_multi(1.7e9, bytes(16), b"pad")
    assert server.decryptor.update(encryptor.update(message)) == message
    assert decryptor.update(server.encryptor.update(b"answer")) == b"answer"


def test_req_pq_multi_and_answers() -> None:
    nonce = bytes(range(16))
    packet = ftc.req_pq_multi(1_700_000_000.5, nonce, b"xyz")
    length = struct.unpack_from("<I", packet)[0]
    assert length == len(packet) - 4 == 40 + 3
    assert packet[4:12] == bytes(8)
    message_id = struct.unpack_from("<q", packet, 12)[0]
    assert message_id % 4 == 0 and message_id >> 32 == 1_700_000_000
    assert struct.unpack_from("<I", packet, 24)[0] == ftc.REQ_PQ_MULTI
    # an echo is "some bytes"; a resPQ with our nonce is recognised; an error code too
    assert ftc.read_answer(packet, nonce) == f"{len(packet)} bytes"
    res_pq = bytes(8) + bytes(8) + struct.pack("<I", 64) + struct.pack("<I", ftc.RES_PQ) + nonce
    res_pq += bytes(48)
    assert ftc.read_answer(struct.pack("<I", len(res_pq)) + res_pq, nonce) == "resPQ"
    assert ftc.read_answer(struct.pack("<Ii", 4, -404), nonce) == "error -404"
    assert ftc.read_answer(packet[:3], nonce) is None
    assert ftc.read_answer(packet[:20], nonce) is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_record_splitter_and_answer_reader_never_raise(data: bytes) -> None:
    records, used = ftc.split_records(data)
    assert used <= len(data)
    assert b"".join(r.raw for r in records) == data[:used]
    ftc.verify_server_hello(records, SECRET.key, bytes(32))
    ftc.read_answer(data, bytes(16))


# -- SNI-DNS rule --------------------------------------------------------------------------


def test_every_known_family_must_match() -> None:
    resolved = ["192.0.2.1", "2001:db8::1"]
    both = PublicAddresses("192.0.2.1", "2001:db8::1")
    assert family_matches(resolved, both) == (True, True)
    assert family_matches(resolved, PublicAddresses("192.0.2.9", "2001:db8::1")) == (False, True)
    assert family_matches(resolved, PublicAddresses("192.0.2.1", None)) == (True, None)
    assert family_matches(["192.0.2.1"], both) == (True, False)
    assert family_matches(["::ffff:192.0.2.1"], PublicAddresses("192.0.2.1", None)) == (
        True,
        None,
    )
    assert split_families(["2001:DB8::1", "192.0.2.1", "junk"]) == (["192.0.2.1"], ["2001:db8::1"])


# -- verdicts ------------------------------------------------------------------------------


CERT = Observation("certificate", "certificate CN=site", "ab" * 32, "CN=site")


@pytest.mark.parametrize(
    ("proxy", "website", "status", "text"),
    [
        (CERT, CERT, Status.OK, "sees the fronting website's certificate (CN=site, sha256 abab"),
        (
            Observation("certificate", "c", "cd" * 32, "CN=proxy"),
            CERT,
            Status.FAILURE,
            "a certificate (CN=proxy) that is not the fronting website's (CN=site)",
        ),
        (CERT, Observation("unreachable", "cannot connect: x"), Status.WARNING, "compare"),
        (Observation("alert", "TLS alert internal_error"), CERT, Status.OK, "acceptable"),
        (Observation("server-hello", "a TLS ServerHello"), CERT, Status.OK, "ServerHello"),
        (
            Observation("hang", "no answer within 1s"),
            Observation("hang", "no answer within 1s"),
            Status.OK,
            "same as the fronting website: no answer within 1s",
        ),
        (
            Observation("http", "HTTP answer HTTP/1.1 400 Bad Request"),
            Observation("http", "HTTP answer HTTP/1.1 400 Bad Request"),
            Status.OK,
            "same as the fronting website",
        ),
        (
            Observation("reset", "connection reset"),
            CERT,
            Status.FAILURE,
            "connection reset, while the fronting website answers: certificate CN=site",
        ),
        (
            Observation("closed", "connection closed without an answer"),
            Observation("unreachable", "cannot connect: connection refused"),
            Status.FAILURE,
            "the fronting website is unreachable from here",
        ),
        (Observation("hang", "no answer within 1s"), CERT, Status.FAILURE, "no answer within 1s"),
        (Observation("faketls", "accepted a wrong key"), CERT, Status.FAILURE, "wrong key"),
    ],
)
def test_judge(proxy: Observation, website: Observation, status: Status, text: str) -> None:
    got_status, message = judge("probe", proxy, website)
    assert got_status is status
    assert message.startswith("probe: ")
    assert text in message


def test_probe_target_maps_unspecified_addresses_to_loopback() -> None:
    assert probe_target("0.0.0.0", 443) == ("127.0.0.1", 443)
    assert probe_target("::", 443) == ("::1", 443)
    assert probe_target("192.0.2.1", 8443) == ("192.0.2.1", 8443)


# -- report --------------------------------------------------------------------------------


def test_deprecated_messages_are_mtgs() -> None:
    assert deprecated_message("domain-fronting-port") == (
        'Option "domain-fronting-port" is deprecated and will be removed in v2.3.0. '
        'Please use "port" in [domain-fronting] section instead.'
    )
    assert deprecated_message("network.doh-ip") == (
        'Option "doh-ip" from section [network] is deprecated and will be removed in v2.3.0. '
        'Please use "dns" in [network] section instead.'
    )


def test_report_text_and_json() -> None:
    first = Section("a", "First")
    first.add(Status.OK, "All good")
    second = Section("b", "Second")
    second.add(Status.INFO, "context", n=1)
    second.add(Status.WARNING, "hmm")
    second.add(Status.FAILURE, "bad")
    second.add(Status.ERROR, "broken")
    report = Report([first, second])
    assert report.render() == (
        "First\n  \u2705 All good\n"
        "Second\n  \u2139\ufe0f context\n  \u26a0\ufe0f hmm\n  \u274c bad\n  \u203c\ufe0f broken\n"
    )
    assert report.exit_code == 1
    data = json.loads(report.render_json())
    assert data["ok"] is False and data["exit_code"] == 1
    assert [s["status"] for s in data["sections"]] == ["ok", "error"]
    assert data["sections"][1]["checks"][0] == {
        "status": "info",
        "message": "context",
        "figures": {"n": 1},
    }
    # informational lines never fail a report
    only_info = Section("c", "Third")
    only_info.add(Status.INFO, "skipped")
    assert Report([first, only_info]).exit_code == 0


# -- the side-by-side ----------------------------------------------------------------------


def test_a_face_reads_records_and_extensions() -> None:
    hello = ftc.build_client_hello(bytes(16), "front.test", time.time())
    secret = Secret(bytes(16), "front.test")
    parsed = faketls.read_client_hello(hello.record)
    assert parsed is not None
    answer = faketls.build_server_hello(parsed[0], secret.key, noise_len=3000)
    face = faceoff.face_of(answer)
    assert face.records == ((0x16, 122), (0x14, 1), (0x17, 3000))
    assert face.suite == "TLS_AES_128_GCM_SHA256"
    assert face.extensions == ["supported_versions", "key_share(x25519)"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_a_face_of_any_bytes(data: bytes) -> None:
    try:
        faceoff.face_of(b"\x16\x03\x03" + data)
    except ServerHelloError:
        pass


def test_the_report_has_a_place_for_the_doppelganger() -> None:
    report = Report([])
    assert report.to_json()["doppelganger"] is None
    report.doppelganger = {"k": 0.38}
    assert json.loads(report.render_json())["doppelganger"] == {"k": 0.38}
