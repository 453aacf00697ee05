"""Learning the fronting site's ServerHello shape from real loopback sites
(mtgworkers.defense.shape), and answering a Telegram-like client as the site does.

Each test learns from a site, then sends one Telegram-like FakeTLS ClientHello both to the
site and to the handshake machine given the learned shape (through the doppelganger's
shared state, as workers read it), and compares the two ServerHellos.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mtgworkers.defense.doppel import SharedState
from mtgworkers.defense.shape import ShapeReader, learn_shape
from mtgworkers.protocol.handshake import Reply, ServerHandshake
from mtgworkers.protocol.secret import Secret
from mtgworkers.protocol.serverhello import (
    GROUP_X25519,
    ServerHello,
    SuiteRule,
    decode_shape,
    parse_server_hello,
    probe_client_hello,
)
from tests.support.client import RANDOM_OFFSET, build_client_hello
from tests.support.client import parse_server_hello as telegram_checks
from tests.support.tlsface import (
    OpenSSLSite,
    RawSite,
    asks_post_quantum,
    client_hello_info,
    retry_request,
    server_hello_answer,
)

KEY = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
HOST = "fronting.test"
LOGGER = "mtgworkers.proxy.doppelganger"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def _open(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def learn(port: int, timeout: float = 5.0, **options: object) -> bytes | None:
    return asyncio.run(
        learn_shape("127.0.0.1", port, _open, sni=HOST, timeout=timeout, **options)  # type: ignore[arg-type]
    )


def site_answer(port: int, record: bytes) -> ServerHello:
    """The site's ServerHello for ``record``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(record)
        data = b""
        while (parsed := parse_server_hello(data)) is None:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    return parsed[0]


def our_answer(blob: bytes | None, record: bytes) -> ServerHello:
    """The handshake machine's answer with the shape stored as a raid stores it; the
    Telegram-like client's checks (layout, HMAC) must pass."""
    state = SharedState.private()
    if blob is not None:
        state.set_shape(blob, time.time())
    machine = ServerHandshake(
        Secret(KEY, HOST),
        ("192.0.2.1", 1000),
        tolerance=5.0,
        replayed=lambda _: False,
        random_bytes=os.urandom,
        shape=ShapeReader(state.shape),
    )
    machine.receive(record)
    machine.next_action(time.time())
    reply = machine.next_action(time.time())
    assert isinstance(reply, Reply), reply
    telegram_checks(
        reply.data, record[RANDOM_OFFSET : RANDOM_OFFSET + 32], KEY, record[44 : 44 + record[43]]
    )
    parsed = parse_server_hello(reply.data)
    assert parsed is not None
    return parsed[0]


def telegram_hello(ciphers: tuple[int, ...] = (0x1301, 0x1302, 0x1303, 0xC02B)) -> bytes:
    return build_client_hello(KEY, HOST, ciphers=ciphers, grease=True)


def order(hello: ServerHello) -> list[int]:
    return [kind for kind, _ in hello.extensions]


def assert_same_face(port: int, blob: bytes | None, record: bytes) -> ServerHello:
    site, ours = site_answer(port, record), our_answer(blob, record)
    assert ours.cipher_suite == site.cipher_suite
    assert order(ours) == order(site)
    assert ours.group == site.group == GROUP_X25519
    assert ours.record_length == site.record_length  # the same ServerHello size
    return site


# -- real TLS stacks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "rule", "picks"),
    [
        # the server's own order, ChaCha20 first
        (
            {"ciphersuites": "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384",
             "server_preference": True},
            SuiteRule.SERVER,
            {(0x1301, 0x1302, 0x1303): 0x1303, (0x1302, 0x1301): 0x1302},
        ),
        # OpenSSL's default: the client's order
        ({}, SuiteRule.CLIENT, {(0x1301, 0x1302, 0x1303): 0x1301, (0x1303, 0x1301): 0x1303}),
        # its own order, but ChaCha20 for clients that put it first
        (
            {"ciphersuites": "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:"
             "TLS_AES_128_GCM_SHA256", "server_preference": True, "prioritize_chacha": True},
            SuiteRule.SERVER_CHACHA,
            {(0x1301, 0x1302, 0x1303): 0x1302, (0x1303, 0x1301, 0x1302): 0x1303},
        ),
    ],
)  # fmt: skip
def test_openssl_sites(
    ca: trustme.CA,
    tmp_path: Path,
    options: dict[str, object],
    rule: SuiteRule,
    picks: dict[tuple[int, ...], int],
) -> None:
    with OpenSSLSite(ca, tmp_path, HOST, **options) as site:  # type: ignore[arg-type]
        blob = learn(site.port)
        assert blob is not None and len(blob) <= SharedState.SHAPE_MAX
        assert decode_shape(blob).rule is rule
        for ciphers, pick in picks.items():
            answer = assert_same_face(site.port, blob, telegram_hello((*ciphers, 0xC02B)))
            assert answer.cipher_suite == pick


def python_site(ca: trustme.CA, **options: object) -> Iterator[int]:
    """A Python ssl TLS site (OpenSSL's server preference: AES-256 first)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(context)
    if options.get("max_tls12"):
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
def py_site(ca: trustme.CA) -> Iterator[int]:
    yield from python_site(ca)


def test_a_python_ssl_site_prefers_aes256_and_so_do_we(py_site: int) -> None:
    blob = learn(py_site)
    assert blob is not None
    shape = decode_shape(blob)
    assert (shape.rule, shape.top) == (SuiteRule.SERVER, 0x1302)
    record = telegram_hello()
    assert assert_same_face(py_site, blob, record).cipher_suite == 0x1302
    # before anything is learned the answer is today's: the client's first suite
    assert our_answer(None, record).cipher_suite == 0x1301


def signed(record: bytes) -> bytes:
    """``record`` with its random made a FakeTLS HMAC under KEY (timestamp now)."""
    data = bytearray(record)
    mac = hmac.new(KEY, bytes(data), hashlib.sha256).digest()
    stamp = int(time.time()).to_bytes(4, "little")
    data[RANDOM_OFFSET : RANDOM_OFFSET + 32] = mac[:28] + bytes(
        a ^ b for a, b in zip(mac[28:], stamp, strict=True)
    )
    return bytes(data)


def post_quantum_hello() -> bytes:
    """Like TDLib's: X25519MLKEM768 first, with a share, and x25519 with its share."""
    return signed(
        probe_client_hello(
            HOST,
            random=bytes(32),
            session_id=os.urandom(32),
            key_shares=[(0x11EC, os.urandom(1216)), (GROUP_X25519, os.urandom(32))],
            groups=(0x11EC, GROUP_X25519, 0x0017),
        )
    )


def test_a_post_quantum_hello_to_an_x25519_site_gets_x25519(py_site: int) -> None:
    blob = learn(py_site)
    record = post_quantum_hello()
    assert client_hello_info(record).shares == [0x11EC, GROUP_X25519]
    assert assert_same_face(py_site, blob, record).group == GROUP_X25519


def test_a_post_quantum_site_still_gets_x25519_from_us() -> None:
    """A site that would negotiate X25519MLKEM768: we never send a synthetic ML-KEM share."""

    def answer(record: bytes) -> bytes:
        info = client_hello_info(record)
        if asks_post_quantum(info):
            return retry_request(record)
        if 0x11EC in info.shares:  # it would answer with a 1120-byte hybrid share
            return _mlkem_server_hello(record) + b"\x14\x03\x03\x00\x01\x01"
        return server_hello_answer(record)

    with RawSite(answer) as site:
        blob = learn(site.port)  # our probes offer x25519 only: learned without ML-KEM
        assert blob is not None
        record = post_quantum_hello()
        assert site_answer(site.port, record).group == 0x11EC
        ours = our_answer(blob, record)
        assert ours.group == GROUP_X25519 and ours.key_length == 32


def _mlkem_server_hello(record: bytes) -> bytes:
    from tests.support.tlsface import server_hello_record

    info = client_hello_info(record)
    share = struct.pack(">HH", 0x11EC, 1120) + os.urandom(1120)
    return server_hello_record(info.session_id, 0x1301, [(0x002B, b"\x03\x04"), (0x0033, share)])


# -- raw sites: orders and extensions OpenSSL does not send --------------------------------------


def test_extension_order_and_other_extensions_are_copied() -> None:
    extra = [(0x4A4B, b"\x01\x02\x03")]
    with RawSite(lambda r: server_hello_answer(r, order=(0x0033, 0x002B), extra=extra)) as site:
        blob = learn(site.port)
        assert blob is not None
        record = telegram_hello((0x1303, 0x1301, 0x1302))
        site_hello = assert_same_face(site.port, blob, record)
        assert order(site_hello) == [0x0033, 0x002B, 0x4A4B]
        assert our_answer(blob, record).extension(0x4A4B) == b"\x01\x02\x03"
        assert len(site.records) == 4 + 1  # one connection per probe order, then ours


def test_probes_carry_the_secret_host_and_vary_the_suite_order() -> None:
    with RawSite(server_hello_answer) as site:
        assert learn(site.port) is not None
    infos = [client_hello_info(record) for record in site.records]
    assert [info.suites[1:4] for info in infos] == [
        [0x1301, 0x1302, 0x1303],
        [0x1303, 0x1302, 0x1301],
        [0x1302, 0x1303, 0x1301],
        [0x1301, 0x1303, 0x1302],
    ]
    assert all(HOST.encode() in record for record in site.records)
    assert all(info.shares == [GROUP_X25519] for info in infos)
    assert len({info.session_id for info in infos}) == 4


def test_a_proxy_protocol_header_goes_first_when_asked() -> None:
    seen: list[bytes] = []

    def answer(first: bytes) -> bytes | None:
        seen.append(first)
        return None  # the hello behind the header is never read: the learner times out

    with RawSite(answer) as site:
        assert learn(site.port, timeout=0.5, proxy_protocol=True) is None
    assert seen and seen[0].startswith(b"\r\n\r\n\x00\r\nQUIT\n")


# -- sites that teach nothing ----------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_tls12_site_teaches_nothing(ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    for port in python_site(ca, max_tls12=True):
        assert learn(port) is None
    assert cannot_learn(caplog) == ["the site answers TLS version 0x0303, not TLS 1.3"]


def cannot_learn(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = []
    for record in caplog.records:
        if record.name == LOGGER and record.getMessage() == "cannot learn":
            assert record.levelno == logging.WARNING
            out.append(record.error)  # type: ignore[attr-defined]
    return out


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (lambda r: b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a TLS handshake record"),
        (lambda r: b"\x15\x03\x03\x00\x02\x02\x46", "TLS alert 70"),
        (lambda r: retry_request(r, 0x0017), "another key share (secp256r1)"),
        (lambda r: server_hello_answer(r)[:40], "timeout"),  # a slow site
        (lambda r: None, "timeout"),  # a silent one
    ],
)
def test_sites_that_teach_nothing(
    answer: object, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    with RawSite(answer) as site:  # type: ignore[arg-type]
        started = time.monotonic()
        assert learn(site.port, timeout=0.5) is None
        assert time.monotonic() - started < 2
    [text] = cannot_learn(caplog)
    assert (error == "timeout" and text == "no ServerHello within 0.5s") or error in text


def test_a_site_that_is_down_teaches_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    assert learn(closed_port()) is None
    [text] = cannot_learn(caplog)
    assert "refused" in text.lower()


def test_a_site_that_closes_teaches_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    listener = socket.create_server(("127.0.0.1", 0))

    def close_one() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.close()

    thread = threading.Thread(target=close_one, daemon=True)
    thread.start()
    try:
        assert learn(int(listener.getsockname()[1])) is None
    finally:
        thread.join(5)
        listener.close()
    assert cannot_learn(caplog) == ["the site closed the connection without an answer"]


def test_the_reader_decodes_once_and_ignores_a_bad_blob(caplog: pytest.LogCaptureFixture) -> None:
    state = SharedState.private()
    reader = ShapeReader(state.shape)
    assert reader() is None
    state.set_shape(bytes.fromhex("010213020202002b0033"), 1.0)
    first = reader()
    assert first is not None and first.top == 0x1302
    assert reader() is first  # not decoded again
    state.set_shape(b"\x07garbage", 2.0)
    assert reader() is None and reader() is None
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "cannot use the stored server hello shape"
    ]


def test_the_shape_fits_the_doppelganger_slot() -> None:
    from mtgworkers.protocol import serverhello

    assert serverhello.SHAPE_MAX == SharedState.SHAPE_MAX
