"""DNS-over-HTTPS against a real server: unbound's DoH endpoint (HTTP/2 only) on loopback.

unbound (Debian package "unbound", built with libnghttp2) runs in the foreground from a
config written here: a static local zone answers without any upstream, TLS with a
trustme certificate for doh.test. tests/run.sh installs it; without it the test skips.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mtgworkers.net.dns import DOH_ALPN, HttpsResolver, ResolveError, SystemResolver, make_resolver
from tests.unit.test_dns import run

DOH_HOST = "doh.test"
READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Unbound:
    port: int
    ca: trustme.CA


def _unbound_binary() -> str:
    binary = shutil.which("unbound") or shutil.which("unbound", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.skip("unbound not installed (Debian/Ubuntu package: unbound)")
    version = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    if "nghttp2" not in version.stdout + version.stderr:
        pytest.skip("unbound is built without libnghttp2: no DNS-over-HTTPS")
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp: Path, port: int, key: Path, pem: Path) -> str:
    return f"""\
server:
  interface: 127.0.0.1@{port}
  https-port: {port}
  http-endpoint: "/dns-query"
  tls-service-key: "{key}"
  tls-service-pem: "{pem}"
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{tmp}"
  pidfile: "{tmp / "unbound.pid"}"
  use-syslog: no
  logfile: ""
  verbosity: 1
  num-threads: 1
  do-ip6: no
  do-udp: no
  module-config: "iterator"
  local-zone: "test." static
  local-data: "front.test. 300 IN A 127.0.0.5"
  local-data: "front.test. 300 IN AAAA fd00:5::5"
  local-data: "v4.test. 300 IN A 127.0.0.6"
remote-control:
  control-enable: no
"""


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    """Poll a TCP connect to the DoH port until it works (bounded); False if unbound exited."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    pytest.fail(f"unbound did not listen within {READY_TIMEOUT:g}s: {log.read_text()[-2000:]}")


@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[Unbound]:
    binary = _unbound_binary()
    ca = trustme.CA()
    cert = ca.issue_cert(DOH_HOST)
    key, pem = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key))
    pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    log = tmp_path / "unbound.log"
    for _ in range(3):  # the port found free may be taken again before unbound binds it
        port = _free_port()
        conf = tmp_path / "unbound.conf"
        conf.write_text(_config(tmp_path, port, key, pem))
        with log.open("wb") as out:
            process = subprocess.Popen(
                [binary, "-d", "-p", "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if _wait_ready(process, port, log):
            break
    else:
        pytest.skip(f"unbound does not start with DNS-over-HTTPS: {log.read_text()[-2000:]}")
    try:
        yield Unbound(port, ca)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _DohTestName(SystemResolver):
    """Bootstrap that knows doh.test (there is no /etc/hosts entry for it)."""

    async def _query(self, host: str) -> tuple[list[str], float]:
        assert host == DOH_HOST
        return ["127.0.0.1"], 60.0


def test_doh_against_unbound(unbound: Unbound) -> None:
    context = ssl.create_default_context()
    unbound.ca.configure_trust(context)
    context.set_alpn_protocols(list(DOH_ALPN))

    async def main() -> None:
        resolver = make_resolver(
            f"https://{DOH_HOST}:{unbound.port}/dns-query", ssl_context=context, timeout=5
        )
        assert isinstance(resolver, HttpsResolver)
        resolver._bootstrap = _DohTestName()
        assert await resolver.resolve("front.test") == ["127.0.0.5", "fd00:5::5"]
        assert await resolver.resolve("v4.test") == ["127.0.0.6"]
        with pytest.raises(ResolveError, match=r"^cannot resolve missing\.test: NXDOMAIN$"):
            await resolver.resolve("missing.test")

    run(main())
