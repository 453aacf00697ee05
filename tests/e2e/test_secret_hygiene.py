"""End to end: the secret never reaches the proxy's output, in any encoding, at debug level.

The secret is the proxy's password: anyone who reads a log that carries it can use the
proxy and hand it to a censor. One run goes through every path that logs something about
a client or the configuration, with ``debug = true``, and its whole output (JSON lines on
stdout, stderr) is searched for the key and the full secret in hex and in base64.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys

import pytest

from mtgworkers.protocol.secret import Secret
from tests.supervisor.helpers import signal_proxy
from tests.support.client import WireError, read_record
from tests.support.env import ClientFactory, KitSecret, ProxyPool
from tests.support.proxy import REPO_ROOT, ProxyProcess, deep_merge, to_toml

pytestmark = pytest.mark.e2e


def secret_encodings(secret: Secret) -> list[str]:
    """Texts that betray the key when they appear anywhere in the output.

    Hex (either case) of the key and of the whole secret, and base64 (standard and URL
    alphabets) of each of them. A base64 text of a longer blob that contains the key has
    one of the key's first three bytes on a 3-byte group boundary, so the encodings of the
    key's 3-byte-aligned runs from offsets 0, 1 and 2 catch the key inside any blob.
    """
    key, whole = secret.key, secret.to_bytes()
    found = {key.hex(), key.hex().upper(), whole.hex(), whole.hex().upper()}
    blobs = [whole, key] + [key[s : s + 3 * ((len(key) - s) // 3)] for s in range(3)]
    for blob in blobs:
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            found.add(encode(blob).decode().rstrip("="))
    return sorted(found)


def test_encodings_find_the_key_inside_larger_base64() -> None:
    secret = Secret(os.urandom(16), "site.test")
    encodings = secret_encodings(secret)
    for prefix in (b"", b"x", b"xy", b"xyz"):
        blob = base64.b64encode(prefix + secret.key + b"tail").decode()
        assert any(text in blob for text in encodings), prefix


def _assert_clean(text: str, secret: Secret) -> None:
    for encoding in secret_encodings(secret):
        assert encoding not in text, f"the secret appears in the output as {encoding!r}"


def _output(proxy: ProxyProcess) -> str:
    return proxy.output(tail=10**6)


def test_no_encoding_of_the_secret_in_a_debug_run(
    proxy_factory: ProxyPool, client_factory: ClientFactory, test_secret: KitSecret
) -> None:
    secret = Secret(test_secret.key, test_secret.host)
    proxy = proxy_factory(
        {
            "debug": True,
            "defense": {"anti-replay": {"enabled": True}},
        }
    )
    proxy.wait_for_log("proxy link")

    # a relayed session
    client = client_factory(proxy)
    client.handshake(dc=2)
    client.send(b"payload")
    assert client.recv_exactly(7) == b"payload"
    hello = client.hello
    client.close()
    # a replayed hello and a wrong key: both fronted
    replay = client_factory(proxy)
    replay.send_client_hello(raw=hello)
    assert read_record(replay.sock)[0] == 0x16
    stranger = client_factory(proxy, key=os.urandom(16))
    stranger.send_client_hello()
    assert read_record(stranger.sock)[0] == 0x16
    # a valid hello followed by a broken obfuscated2 frame
    broken = client_factory(proxy)
    broken.send_client_hello()
    broken.read_server_hello()
    broken.send_raw(b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x40" + os.urandom(64))
    assert broken.wait_closed(5) in ("eof", "reset")
    # an unknown DC without fallback
    lost = client_factory(proxy)
    lost.handshake(dc=9)
    with pytest.raises((WireError, OSError)):
        lost.recv_exactly(1)
    proxy.wait_for_log("cannot dial to telegram")

    # a reload that works, then one whose secret is broken (the error quotes no secret)
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", since=mark, timeout=15)
    broken_config = deep_merge(proxy.config, {"secret": test_secret.hex + "zz"})
    proxy.config_path.write_text(to_toml(broken_config))
    mark = proxy.mark()
    signal_proxy(proxy, signal.SIGHUP)
    refused = proxy.wait_for_log(
        "cannot reload configuration; keeping the running one", since=mark, timeout=15
    )
    assert "secret" in str(refused)
    proxy.stop()

    text = _output(proxy)
    assert '"message": "Stream has been finished"' in text  # the run did log sessions
    assert "configuration" in text
    _assert_clean(text, secret)


def test_the_start_up_link_is_redacted(proxy_factory: ProxyPool, test_secret: KitSecret) -> None:
    proxy = proxy_factory()
    record = proxy.wait_for_log("proxy link")
    assert record["tg_url"] == f"tg://proxy?port={proxy.port}&secret=REDACTED&server=127.0.0.1"
    assert (
        record["hint"] == f"run 'mtgworkers access {proxy.config_path}' for links with the secret"
    )
    # the operator's terminal gets the full link
    access = subprocess.run(
        [sys.executable, "-m", "mtgworkers", "access", str(proxy.config_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    full = Secret(test_secret.key, test_secret.host).base64()
    assert f"secret={full}" in access.stdout


def test_a_broken_secret_is_not_quoted_at_start(
    proxy_factory: ProxyPool, test_secret: KitSecret
) -> None:
    proxy = proxy_factory(start=False, secret=test_secret.hex[:-2] + "zz")
    with pytest.raises(RuntimeError) as failed:
        proxy.start(timeout=10)
    proxy_factory.started.remove(proxy)
    assert "secret" in str(failed.value)
    _assert_clean(str(failed.value), Secret(test_secret.key, test_secret.host))
