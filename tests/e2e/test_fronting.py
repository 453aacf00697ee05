"""End-to-end: everything that is not a valid, fresh FakeTLS hello goes to the website.

docs/protocol.md §6: the proxy replays every byte it read to the fronting host and then relays
both ways, so the website must receive exactly what the client sent and the client must
see the website's own TLS answers. One proxy with anti-replay on serves the module.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.support.client import FakeTLSClient, read_record
from tests.support.env import ClientFactory, ProxyPool, SharedEnv
from tests.support.fakedc import closed_port
from tests.support.proxy import LogRecord
from tests.support.website import BODY, HOSTNAME, https_get, https_get_wrapped

pytestmark = pytest.mark.e2e

SHARED_PROXY_OVERRIDES = {"defense": {"anti-replay": {"enabled": True}}}


def _error_contains(text: str) -> Callable[[LogRecord], bool]:
    return lambda record: text in str(record.get("error", ""))


def _expect_website_server_hello(client: FakeTLSClient) -> None:
    """The first record back must be the website's real TLS ServerHello."""
    rtype, header, payload = read_record(client.sock)
    assert rtype == 0x16, f"expected a TLS handshake record, got header {header.hex()}"
    assert payload[0] == 0x02, "expected a ServerHello from the website"


def _assert_fronted(env: SharedEnv, client: FakeTLSClient, index: int) -> None:
    """The website connection ``index`` got exactly the client's bytes, and only those."""
    client.close()
    conn = env.website.wait_closed(index, timeout=5)
    assert bytes(conn.received) == bytes(client.sent), (
        f"website got {len(conn.received)} bytes, client sent {len(client.sent)}; "
        f"first difference at {_first_difference(conn.received, client.sent)}"
    )


def _first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def test_wrong_secret_is_fronted(shared_env: SharedEnv) -> None:
    env = shared_env
    mark = env.proxy.mark()
    index = len(env.website.connections)
    client = env.client(key=os.urandom(16))
    client.send_client_hello()
    _expect_website_server_hello(client)
    env.proxy.wait_for_log(
        "cannot read client hello", since=mark, predicate=_error_contains("incorrect client random")
    )
    _assert_fronted(env, client, index)
    assert env.website.connections[index].sni == HOSTNAME


def test_wrong_sni_is_fronted(shared_env: SharedEnv) -> None:
    env = shared_env
    mark = env.proxy.mark()
    index = len(env.website.connections)
    client = env.client(sni="elsewhere.test")
    client.send_client_hello()
    _expect_website_server_hello(client)
    env.proxy.wait_for_log(
        "cannot read client hello",
        since=mark,
        predicate=_error_contains("cannot find fronting.test in"),
    )
    _assert_fronted(env, client, index)


def test_stranger_without_sni_is_fronted(shared_env: SharedEnv) -> None:
    env = shared_env
    index = len(env.website.connections)
    client = env.client(sni=None, key=os.urandom(16))
    client.send_client_hello()
    _expect_website_server_hello(client)
    _assert_fronted(env, client, index)
    assert env.website.connections[index].sni is None  # the site saw no SNI either


def test_our_client_without_sni_is_served(shared_env: SharedEnv) -> None:
    # Telegram iOS (12.2 and later) sends its FakeTLS hello with no server_name at all
    env = shared_env
    index = len(env.website.connections)
    mark = env.proxy.mark()
    with env.client(sni=None) as client:
        client.handshake(dc=2)
        client.send(b"no sni")
        assert client.recv_exactly(6) == b"no sni"
    env.proxy.wait_for_log("client hello without SNI", since=mark, level="debug")
    assert len(env.website.connections) == index


@pytest.mark.parametrize("offset", [-3600, -60, +60])
def test_stale_or_future_timestamp_is_fronted(shared_env: SharedEnv, offset: int) -> None:
    env = shared_env
    mark = env.proxy.mark()
    index = len(env.website.connections)
    client = env.client()
    client.send_client_hello(timestamp_offset=offset)
    _expect_website_server_hello(client)
    env.proxy.wait_for_log(
        "cannot read client hello", since=mark, predicate=_error_contains("too old")
    )
    _assert_fronted(env, client, index)


def test_garbage_is_fronted_byte_for_byte(shared_env: SharedEnv) -> None:
    env = shared_env
    mark = env.proxy.mark()
    index = len(env.website.connections)
    client = env.client()
    garbage = b"\x47" + os.urandom(4999)
    client.send_raw(garbage)
    env.website.wait_for_bytes(index, len(garbage))
    client.send_raw(os.urandom(3000))  # more bytes after fronting started: relayed too
    env.website.wait_for_bytes(index, len(garbage) + 3000)
    env.proxy.wait_for_log(
        "cannot read client hello",
        since=mark,
        predicate=_error_contains("unexpected record type 0x47"),
    )
    _assert_fronted(env, client, index)


def test_plain_http_probe_is_fronted(shared_env: SharedEnv) -> None:
    env = shared_env
    index = len(env.website.connections)
    client = env.client()
    client.send_raw(b"GET / HTTP/1.1\r\nHost: fronting.test\r\n\r\n")
    env.website.wait_for_bytes(index, len(client.sent))
    _assert_fronted(env, client, index)


def test_real_https_client_reaches_the_website(shared_env: SharedEnv) -> None:
    """A browser-like TLS client verifies the real site's certificate through the proxy."""
    env = shared_env
    mark = env.proxy.mark()
    index = len(env.website.connections)
    result = https_get(env.proxy.host, env.proxy.port, env.website.ca, HOSTNAME)
    assert result.status_line == b"HTTP/1.1 200 OK"
    assert result.body == BODY
    assert result.peer_cert is not None
    conn = env.website.wait_for_bytes(index, len(result.sent))
    assert bytes(conn.received) == result.sent
    assert conn.tls_established and conn.sni == HOSTNAME
    env.proxy.wait_for_log(
        "cannot read client hello", since=mark, predicate=_error_contains("incorrect client random")
    )


def test_real_https_client_with_wrap_socket(shared_env: SharedEnv) -> None:
    env = shared_env
    status, body = https_get_wrapped(env.proxy.host, env.proxy.port, env.website.ca, HOSTNAME)
    assert (status, body) == (b"HTTP/1.1 200 OK", BODY)


def test_replayed_hello_is_fronted(shared_env: SharedEnv) -> None:
    env = shared_env
    session_id = os.urandom(32)
    with env.client() as first:
        first.handshake(dc=2, session_id=session_id)
        first.send(b"hello")
        assert first.recv_exactly(5) == b"hello"
        hello = first.hello
    assert hello is not None
    mark = env.proxy.mark()

    # The very same bytes again (a recorded hello replayed by a censor's probe).
    index = len(env.website.connections)
    probe = env.client()
    probe.send_client_hello(raw=hello)
    _expect_website_server_hello(probe)
    env.proxy.wait_for_log("replay attack has been detected!", since=mark)
    _assert_fronted(env, probe, index)

    # A fresh, valid hello that reuses the session id is a replay too (docs/protocol.md §3.4).
    index = len(env.website.connections)
    probe = env.client()
    probe.send_client_hello(session_id=session_id)
    _expect_website_server_hello(probe)
    env.proxy.wait_for_log("replay attack has been detected!", since=mark, count=2)
    _assert_fronted(env, probe, index)


def test_fronting_host_down(proxy_factory: ProxyPool, client_factory: ClientFactory) -> None:
    proxy = proxy_factory(
        fronting_port=None,
        overrides={"domain-fronting": {"ip": "127.0.0.1", "port": closed_port()}},
    )
    client = client_factory(proxy, key=os.urandom(16))
    client.send_client_hello()
    proxy.wait_for_log("cannot dial to the fronting domain")
    assert client.wait_closed(5) in ("eof", "reset")
    proxy.assert_alive()
