"""End to end: the SNI router stack of deploy/sni-router/ on loopback, with the real
programs: HAProxy in front, mtgworkers and nginx behind it.

The shipped templates are rendered by the shipped ``render.sh`` with this test's ports
and paths; only nginx's main file (pid, logs, temp paths), which Debian's package
provides on a server, is the test's own. Clients connect from 127.0.0.3 so that the
address the proxy and nginx log can be told from HAProxy's (127.0.0.1).

Checked: Telegram-like FakeTLS clients with and without SNI are relayed to the (fake) DC;
the field guide's probes as a real TLS client sends them (the right name, a random name,
no name) get nginx's answers (the site's certificate, an ``unrecognized_name`` alert),
never a reset or a hang; the proxy and nginx see the client's address; HAProxy's PROXY
v2 LOCAL health checks keep the proxy UP and are closed quietly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
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

from tests.stats.helpers import scrape_series, value, wait_until
from tests.support.client import FakeTLSClient, read_record
from tests.support.fakedc import FakeDC
from tests.support.proxy import REPO_ROOT, LogRecord, ProxyProcess, deep_merge, free_port
from tests.support.website import client_context

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

pytestmark = pytest.mark.e2e

DOMAIN = "router.test"  # the secret's host name, the site's name
ALIAS = "www.router.test"  # another name of the site: HAProxy sends it to nginx directly
CLIENT = "127.0.0.3"  # where every client of this test connects from
BLOCKED = "127.0.0.4"  # a client on the proxy's blocklist
ROUTER_DIR = REPO_ROOT / "deploy" / "sni-router"
PAGE = b"<h1>router.test</h1>\n"
NO_CLIENT = "proxy protocol header without a client (LOCAL or UNKNOWN)"
RESET = "connection was reset before it was accepted"
TIMEOUT = 5.0


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not listen on {port}\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Stack:
    public_port: int
    proxy: ProxyProcess
    fake_dc: FakeDC
    key: bytes
    ca: trustme.CA
    metrics_port: int
    access_log: Path
    haproxy_socket: Path

    def fake_tls(self, sni: str | None, key: bytes | None = None) -> FakeTLSClient:
        return FakeTLSClient(
            "127.0.0.1",
            self.public_port,
            self.key if key is None else key,
            sni,
            timeout=TIMEOUT,
            source=CLIENT,
        )

    def tls_probe(self, server_name: str | None) -> ssl.SSLSocket:
        """A TLS client as a browser or a censor's scanner makes it (SNI = server_name,
        none for None), verified against the test CA."""
        ctx = client_context(self.ca)
        if server_name is None:
            ctx.check_hostname = False
        sock = socket.create_connection(
            ("127.0.0.1", self.public_port), timeout=TIMEOUT, source_address=(CLIENT, 0)
        )
        try:
            return ctx.wrap_socket(sock, server_hostname=server_name)
        except BaseException:
            sock.close()
            raise

    def haproxy(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(self.haproxy_socket))
            sock.sendall(command.encode() + b"\n")
            out = bytearray()
            while chunk := sock.recv(65536):
                out += chunk
        return out.decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    haproxy, nginx = _binary("haproxy"), _binary("nginx")
    if haproxy is None or nginx is None:
        pytest.skip("haproxy and nginx are needed (Debian packages haproxy, nginx)")
    if os.geteuid() != 0:
        pytest.skip("the shipped haproxy.cfg drops privileges (user, chroot): run as root")
    tmp = tmp_path_factory.mktemp("sni-router")
    ca = trustme.CA()
    cert = ca.issue_cert(DOMAIN, ALIAS)
    cert.cert_chain_pems[0].write_to_path(str(tmp / "fullchain.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp / "fullchain.pem"), append=True)
    cert.private_key_pem.write_to_path(str(tmp / "privkey.pem"))
    webroot = tmp / "www"
    webroot.mkdir()
    (webroot / "index.html").write_bytes(PAGE)
    (tmp / "chroot").mkdir()
    (tmp / "block.netset").write_text(f"{BLOCKED}/32\n")
    key = os.urandom(16)
    ports = {name: free_port() for name in ("public", "mtg", "nginx", "http", "metrics")}
    env = dict(
        os.environ,
        DOMAIN=DOMAIN,
        SITE_NAMES=f"{DOMAIN} {ALIAS}",
        SECRET="ee" + key.hex() + DOMAIN.encode().hex(),
        PUBLIC_BIND=f"127.0.0.1:{ports['public']}",
        MTGW_ADDR=f"127.0.0.1:{ports['mtg']}",
        NGINX_TLS_ADDR=f"127.0.0.1:{ports['nginx']}",
        HTTP_LISTEN=f"127.0.0.1:{ports['http']}",
        CERT=str(tmp / "fullchain.pem"),
        KEY=str(tmp / "privkey.pem"),
        WEBROOT=str(webroot),
        ACCESS_LOG=str(tmp / "access.log"),
        METRICS_ADDR=f"127.0.0.1:{ports['metrics']}",
        HAPROXY_SOCKET=str(tmp / "haproxy.sock"),
        HAPROXY_MAXCONN="2000",  # its open-files limit must fit within this test's
        HAPROXY_USER="root",
        HAPROXY_GROUP="root",
        HAPROXY_CHROOT=str(tmp / "chroot"),
    )
    rendered = tmp / "rendered"
    subprocess.run(
        ["bash", str(ROUTER_DIR / "render.sh"), str(rendered)], env=env, check=True, timeout=30
    )

    # nginx's main file, as Debian's /etc/nginx/nginx.conf includes the site file.
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / f"nginx-{name}").mkdir()
    (tmp / "nginx.conf").write_text(
        f"user root;\nworker_processes 1;\npid {tmp}/nginx.pid;\n"
        f"error_log {tmp}/nginx-error.log info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"  client_body_temp_path {tmp}/nginx-client_body;\n"
        f"  proxy_temp_path {tmp}/nginx-proxy;\n  fastcgi_temp_path {tmp}/nginx-fastcgi;\n"
        f"  uwsgi_temp_path {tmp}/nginx-uwsgi;\n  scgi_temp_path {tmp}/nginx-scgi;\n"
        f"  access_log {tmp}/nginx-other.log;\n"
        f"  include {rendered}/nginx-site.conf;\n"
        "}\n"
    )
    started: list[subprocess.Popen[bytes]] = []
    dc = FakeDC("echo")
    dc.start()
    proxy: ProxyProcess | None = None
    # Set once the stack is up: a set-up failure (a program that did not start) is then
    # the error reported, not the stopped proxy's exit status under it.
    ready = False
    try:
        nginx_log = tmp / "nginx-error.log"
        with open(tmp / "nginx.out", "wb") as out:
            started.append(
                subprocess.Popen(
                    [nginx, "-e", str(nginx_log), "-c", str(tmp / "nginx.conf"), "-g",
                     "daemon off;"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        _wait_listening(ports["nginx"], started[-1], "nginx", tmp / "nginx.out")

        # The shipped mtgworkers config, plus what a test proxy needs: the fake DC, no
        # look-ups of public addresses or names, debug lines.
        config = tomllib.loads((rendered / "mtgworkers.toml").read_text())
        config = deep_merge(
            config,
            {
                "debug": True,
                "public-ipv4": "127.0.0.1",
                "public-ipv6": "::1",
                "network": {"dns": "udp://127.0.0.1:9", "timeout": {"handshake": "5s"}},
                "dc-overrides": {str(n): [f"127.0.0.1:{dc.port}"] for n in range(1, 6)},
                "supervisor": {"workers": 2, "graceful-timeout": "1s"},
                "defense": {"blocklist": {"enabled": True, "urls": [str(tmp / "block.netset")]}},
            },
        )
        proxy = ProxyProcess(config, tmp / "mtgworkers")
        proxy.start()

        haproxy_out = tmp / "haproxy.out"
        with open(haproxy_out, "wb") as out:
            started.append(
                subprocess.Popen(
                    [haproxy, "-db", "-f", str(rendered / "haproxy.cfg")],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait_listening(ports["public"], started[-1], "haproxy", haproxy_out)
        ready = True
        yield Stack(
            ports["public"],
            proxy,
            dc,
            key,
            ca,
            ports["metrics"],
            tmp / "access.log",
            tmp / "haproxy.sock",
        )
        for proc in started:
            assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
    finally:
        for proc in reversed(started):
            _stop(proc)
        if proxy is not None:
            try:
                proxy.stop(check=ready)
            finally:
                proxy.kill()
        dc.stop()


def _wait_fronting_finished(stack: Stack, since: int) -> None:
    """Wait for the debug line of a fronted connection's end; it names the client, and
    every line since ``since`` that names one names the client, not HAProxy."""

    def done(records: list[LogRecord]) -> bool:
        return any(
            str(r.get("message", "")).endswith("has been finished because of EOF")
            and "client-ip" in r
            for r in records
        )

    records = stack.proxy.wait_for_records(done, "a fronted connection's end", since=since)
    assert {r["client-ip"] for r in records if "client-ip" in r} == {CLIENT}


@pytest.mark.parametrize("sni", [DOMAIN, None], ids=["sni", "no-sni"])
def test_sni_router_relays_telegram_clients(stack: Stack, sni: str | None) -> None:
    mark = stack.proxy.mark()
    with stack.fake_tls(sni) as client:
        client.handshake(dc=2)
        for size in (1, 1000, 70000):
            data = os.urandom(size)
            client.send(data)
            assert client.recv_exactly(size) == data
    record = stack.proxy.wait_for_log("Stream has been started", since=mark)
    # The proxy took the client's address from HAProxy's PROXY v2 header.
    assert record["client-ip"] == CLIENT
    assert not stack.proxy.logs_matching("cannot read client hello", since=mark)
    if sni is None:
        wait_until(
            lambda: (
                value(scrape_series(stack.metrics_port), "mtg_client_hellos_without_sni_total") >= 1
            ),
            5,
            "the hello without SNI counted",
        )


def test_sni_router_right_name_gets_the_site(stack: Stack) -> None:
    # A TLS client with the secret's name but no secret: HAProxy routes it to the proxy,
    # which fronts it to nginx; the client sees the real site and its certificate.
    mark = stack.proxy.mark()
    for name in (DOMAIN, ALIAS):
        started = time.monotonic()
        with stack.tls_probe(name) as tls:
            cert = tls.getpeercert()
            assert cert is not None
            assert ("DNS", name) in cert["subjectAltName"]
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
        assert answer.endswith(PAGE)
        assert time.monotonic() - started < TIMEOUT
    # Only the secret's name went through the proxy; the alias went to nginx directly.
    stack.proxy.wait_for_log("cannot read client hello", since=mark)
    _wait_fronting_finished(stack, mark)
    assert len(stack.proxy.logs_matching("cannot read client hello", since=mark)) == 1

    # nginx logged the client's address for both: from the proxy's PROXY v2 header
    # (fronted) and from HAProxy's (direct), with the sender in via=.
    def logged() -> list[str]:
        lines = stack.access_log.read_text().splitlines() if stack.access_log.exists() else []
        return [line for line in lines if '"GET / HTTP/1.1" 200' in line]

    lines = wait_until(lambda: len(logged()) >= 2 and logged(), 5, "two access log lines")
    for name in (DOMAIN, ALIAS):
        (line,) = [line for line in lines if f"sni={name} " in line]
        assert line.startswith(CLIENT + " "), line
        assert line.endswith("via=127.0.0.1"), line


@pytest.mark.parametrize("server_name", ["a9e1c07f3b.com", None], ids=["random-sni", "no-sni"])
def test_sni_router_other_names_get_an_alert(stack: Stack, server_name: str | None) -> None:
    # A random name goes to nginx directly, a hello without SNI to the proxy, which
    # fronts it to nginx: both get nginx's refusal for a name it does not serve, an
    # unrecognized_name alert, as fast as nginx gives it: never a reset, never a hang.
    mark = stack.proxy.mark()
    started = time.monotonic()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        stack.tls_probe(server_name).close()
    assert time.monotonic() - started < TIMEOUT
    if server_name is None:
        stack.proxy.wait_for_log("cannot read client hello", since=mark)
        _wait_fronting_finished(stack, mark)
    else:
        assert not stack.proxy.logs_matching("cannot read client hello", since=mark)


def test_sni_router_fronts_wrong_secrets_and_plain_http(stack: Stack) -> None:
    # A FakeTLS hello signed with another key, with the secret's name: fronted to nginx,
    # whose TLS ServerHello comes back.
    with stack.fake_tls(DOMAIN, key=os.urandom(16)) as client:
        client.send_client_hello()
        record_type, _, _ = read_record(client.sock)
        assert record_type == 0x16  # handshake: nginx's ServerHello
    # Plain HTTP on the TLS port: HAProxy sees no hello and hands it to nginx, which
    # answers as an HTTPS server does.
    started = time.monotonic()
    with socket.create_connection(
        ("127.0.0.1", stack.public_port), timeout=TIMEOUT, source_address=(CLIENT, 0)
    ) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request"), answer[:200]
    assert b"The plain HTTP request was sent to HTTPS port" in answer
    assert time.monotonic() - started < TIMEOUT


def test_sni_router_blocklist_sees_the_client(stack: Stack) -> None:
    # The IP lists judge the address from HAProxy's header: a blocked client is closed
    # at once and counted, and HAProxy's own address (127.0.0.1) is never judged.
    mark = stack.proxy.mark()
    with FakeTLSClient(
        "127.0.0.1", stack.public_port, stack.key, DOMAIN, timeout=TIMEOUT, source=BLOCKED
    ) as client:
        client.send_client_hello()
        assert client.wait_closed(TIMEOUT) in ("eof", "reset")
    stack.proxy.wait_for_log("ip was blacklisted", since=mark, ip=BLOCKED)
    wait_until(
        lambda: (
            value(
                scrape_series(stack.metrics_port), "mtg_ip_blocklisted_total", ip_list="blocklist"
            )
            >= 1
        ),
        5,
        "the blocked client counted",
    )
    assert not stack.proxy.logs_matching("Stream has been started", since=mark)


def test_sni_router_health_checks_are_quiet(stack: Stack) -> None:
    # HAProxy checks the proxy with a PROXY v2 LOCAL header and resets the connection
    # right after it, so the proxy finds either the header or the reset: both are closed
    # with a debug line, never as a client, and HAProxy sees the proxy UP.
    def checks(records: list[LogRecord]) -> bool:
        quiet = [r for r in records if r.get("message") in (NO_CLIENT, RESET)]
        assert all(r["level"] == "debug" for r in quiet), quiet
        return len(quiet) >= 2

    stack.proxy.wait_for_records(checks, "two health checks", timeout=15)
    rows = list(csv.DictReader(io.StringIO(stack.haproxy("show stat").lstrip("# "))))
    (server,) = [r for r in rows if r["pxname"] == "mtgworkers" and r["svname"] == "mtgworkers"]
    assert server["status"] == "UP", server
    # "* L4OK" while a check is under way: the last result, then its status.
    assert server["check_status"].removeprefix("* ") == "L4OK", server
    # Health checks come from HAProxy's own address: not one was served, fronted or
    # counted as a client; every line that names a client names the test's.
    named = {r["client-ip"] for r in stack.proxy.records() if "client-ip" in r}
    assert named == {CLIENT}
    expected = {"proxy is listening", "proxy link", "SNI-DNS check: cannot resolve secret hostname"}
    problems = [
        r
        for r in stack.proxy.records()
        if (r.get("level") in ("warn", "error") or r.get("_raw"))
        and r.get("message") not in expected
    ]
    assert problems == []
