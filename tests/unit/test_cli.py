"""mtgworkers.cli and mtgworkers.publicip: mtg v2's commands, outputs and exit codes.

Command-line behaviour is checked on real ``python -m mtgworkers`` processes; public IP
detection talks to echo servers on the loopback interface only (``MTGWORKERS_IP_ECHO_URLS``
is always set for ``access`` so no test can reach the internet).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import os
import platform
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mtgworkers import __version__, cli, publicip
from mtgworkers.protocol.secret import Secret

ROOT = Path(__file__).resolve().parents[2]

SECRET_B64 = "7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t"
SECRET_HEX = "eed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d"

# Nothing listens on port 1: detection fails at once instead of reaching the internet.
NO_ECHO = "http://127.0.0.1:1/"

# mtg's access output for this secret (docs/mtg-compat.md b.4), byte for byte.
ACCESS_IPV4 = """\
{
  "ipv4": {
    "ip": "1.2.3.4",
    "port": 443,
    "tg_url": "tg://proxy?port=443&secret=7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t&server=1.2.3.4",
    "tg_qrcode": "https://api.qrserver.com/v1/create-qr-code?data=tg%3A%2F%2Fproxy%3Fport%3D443%26secret%3D7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t%26server%3D1.2.3.4&format=svg&qzone=4",
    "tme_url": "https://t.me/proxy?port=443&secret=7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t&server=1.2.3.4",
    "tme_qrcode": "https://api.qrserver.com/v1/create-qr-code?data=https%3A%2F%2Ft.me%2Fproxy%3Fport%3D443%26secret%3D7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t%26server%3D1.2.3.4&format=svg&qzone=4"
  },
  "secret": {
    "hex": "eed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d",
    "base64": "7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t"
  }
}
"""

ACCESS_IPV6_ONLY_PORT_8443_HEX = """\
{
  "ipv6": {
    "ip": "2001:db8::1",
    "port": 8443,
    "tg_url": "tg://proxy?port=8443&secret=eed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d&server=2001%3Adb8%3A%3A1",
    "tg_qrcode": "https://api.qrserver.com/v1/create-qr-code?data=tg%3A%2F%2Fproxy%3Fport%3D8443%26secret%3Deed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d%26server%3D2001%253Adb8%253A%253A1&format=svg&qzone=4",
    "tme_url": "https://t.me/proxy?port=8443&secret=eed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d&server=2001%3Adb8%3A%3A1",
    "tme_qrcode": "https://api.qrserver.com/v1/create-qr-code?data=https%3A%2F%2Ft.me%2Fproxy%3Fport%3D8443%26secret%3Deed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d%26server%3D2001%253Adb8%253A%253A1&format=svg&qzone=4"
  },
  "secret": {
    "hex": "eed11c6cbbd9efe7fed5bc0db220b09665676f6f676c652e636f6d",
    "base64": "7tEcbLvZ7-f-1bwNsiCwlmVnb29nbGUuY29t"
  }
}
"""


def mtgworkers(
    *args: str, env: dict[str, str] | None = None, timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, publicip.ENV_URLS: NO_ECHO, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mtgworkers", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(f'secret = "{SECRET_B64}"\nbind-to = "0.0.0.0:443"\n{text}')
    return str(path)


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------------------------------------
# generate-secret, --version, --help


def test_generate_secret_prints_a_base64_secret_that_parses_back() -> None:
    first = mtgworkers("generate-secret", "storage.googleapis.com")
    second = mtgworkers("generate-secret", "storage.googleapis.com")
    assert first.returncode == 0 and first.stderr == ""
    text = first.stdout
    assert text.endswith("\n") and text.count("\n") == 1
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text.strip())
    secret = Secret.parse(text.strip())
    assert secret.host == "storage.googleapis.com"
    assert secret.is_valid()
    assert secret.base64() == text.strip()
    assert secret.hex() == "ee" + secret.key.hex() + b"storage.googleapis.com".hex()
    assert Secret.parse(second.stdout.strip()).key != secret.key


@pytest.mark.parametrize("flag", ["--hex", "-x"])
def test_generate_secret_hex(flag: str) -> None:
    result = mtgworkers("generate-secret", flag, "google.com")
    assert result.returncode == 0
    text = result.stdout.strip()
    assert re.fullmatch("ee[0-9a-f]{32}" + b"google.com".hex(), text)
    assert Secret.parse(text).hex() == text


def test_generate_secret_does_not_validate_the_hostname() -> None:
    assert Secret.parse(mtgworkers("generate-secret", "not a host!").stdout.strip()).host == (
        "not a host!"
    )


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(flag: str) -> None:
    result = mtgworkers(flag)
    assert result.returncode == 0
    assert result.stdout == f"mtgworkers {__version__} (python {platform.python_version()})\n"


def test_help_lists_the_commands() -> None:
    result = mtgworkers("--help")
    assert result.returncode == 0
    for command in ("run", "simple-run", "generate-secret", "access", "doctor"):
        assert f"\n  {command} " in result.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("run", "<config>"),
        ("simple-run", "--antireplay-cache-size"),
        ("generate-secret", "--hex"),
        ("access", "--ipv6=IP"),
        ("access", "--qr"),
        ("doctor", "--probe-address=ADDR"),
    ],
)
def test_command_help(command: str, expected: str) -> None:
    result = mtgworkers(command, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout and expected in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "missing command"),
        (("frobnicate",), "unknown command 'frobnicate'"),
        (("generate-secret",), "missing argument <hostname>"),
        (("simple-run", "0.0.0.0:443"), "missing argument <secret>"),
        (
            ("simple-run", "--bogus", "0.0.0.0:443", SECRET_B64),
            "unknown or repeated option --bogus",
        ),
        (("access", "--port"), "--port requires argument"),
        (("generate-secret", "a", "b"), "unexpected argument b"),
    ],
)
def test_usage_errors_exit_2_with_the_usage(args: tuple[str, ...], message: str) -> None:
    result = mtgworkers(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    first, rest = result.stderr.split("\n", 1)
    assert first == f"mtgworkers: error: {message}"
    assert rest.startswith("Usage:\n  mtgworkers ")


# ---------------------------------------------------------------------------------------------
# access


def test_access_matches_mtg_byte_for_byte(tmp_path: Path) -> None:
    result = mtgworkers("access", "--ipv4", "1.2.3.4", write_config(tmp_path, ""))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ACCESS_IPV4


def test_access_ipv6_hex_and_port(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    result = mtgworkers("access", "-I", "2001:DB8:0::1", "-p", "8443", "-x", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ACCESS_IPV6_ONLY_PORT_8443_HEX


def test_access_both_families_in_mtg_order(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'public-ipv6 = "2001:db8::1"\n')
    result = mtgworkers("access", "-i", "1.2.3.4", "--port=8443", "--hex", config)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert list(document) == ["ipv4", "ipv6", "secret"]
    ipv4 = json.loads(ACCESS_IPV4)["ipv4"]
    assert list(document["ipv4"]) == list(ipv4)
    assert document["ipv4"]["port"] == 8443
    assert document["ipv6"] == json.loads(ACCESS_IPV6_ONLY_PORT_8443_HEX)["ipv6"]


def test_access_uses_config_addresses_and_flags_win(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'public-ipv4 = "5.6.7.8"\npublic-ipv6 = "2001:db8::2"\n')
    from_config = json.loads(mtgworkers("access", config).stdout)
    assert (from_config["ipv4"]["ip"], from_config["ipv6"]["ip"]) == ("5.6.7.8", "2001:db8::2")
    assert from_config["ipv4"]["port"] == 443
    overridden = json.loads(mtgworkers("access", "-i", "1.2.3.4", config).stdout)
    assert overridden["ipv4"] == json.loads(ACCESS_IPV4)["ipv4"]


def test_access_drops_addresses_of_the_wrong_family(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    result = mtgworkers("access", "--ipv4", "2001:db8::1", "--ipv6", "1.2.3.4", config)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"secret": {"hex": SECRET_HEX, "base64": SECRET_B64}}
    # Go's To4() reads an IPv4-mapped IPv6 address as IPv4.
    mapped = json.loads(mtgworkers("access", "--ipv4", "::ffff:1.2.3.4", config).stdout)
    assert mapped["ipv4"]["ip"] == "1.2.3.4"


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the client's address, like ifconfig.co with Accept: text/plain."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(
            {"path": self.path, "accept": self.headers["Accept"], "ua": self.headers["User-Agent"]}
        )
        body = f"{self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class EchoServer6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def echo_server(host: str) -> Iterator[str]:
    server_class = EchoServer6 if ":" in host else http.server.ThreadingHTTPServer
    server = server_class((host, 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield f"http://[{host}]:{port}/ip" if ":" in host else f"http://{host}:{port}/ip"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_access_detects_public_addresses_from_an_echo_service(tmp_path: Path) -> None:
    EchoHandler.seen = []
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(echo_server("127.0.0.1"))]
        has_v6 = ipv6_loopback_available()
        if has_v6:
            urls.append(stack.enter_context(echo_server("::1")))
        # The IPv4 URL is first: the IPv6 detection must skip it (no IPv6 route to an
        # IPv4 literal) and use the next one.
        result = mtgworkers(
            "access", write_config(tmp_path, ""), env={publicip.ENV_URLS: ",".join(urls)}
        )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ipv4"]["ip"] == "127.0.0.1"
    assert document["ipv4"]["tg_url"].endswith("&server=127.0.0.1")
    if has_v6:
        assert document["ipv6"]["ip"] == "::1"
    else:
        assert "ipv6" not in document
    assert EchoHandler.seen
    for request in EchoHandler.seen:
        assert request == {"path": "/ip", "accept": "text/plain", "ua": "curl/8.5.0"}


def test_access_qr_prints_each_link_with_its_qr_code(tmp_path: Path) -> None:
    import io

    import segno

    result = mtgworkers(
        "access", "--qr", "--ipv4", "1.2.3.4", "--ipv6", "2001:db8::1", write_config(tmp_path, "")
    )
    assert result.returncode == 0, result.stderr
    expected = io.StringIO()
    for label, ip, server in (
        ("IPv4", "1.2.3.4", "1.2.3.4"),
        ("IPv6", "2001:db8::1", "2001%3Adb8%3A%3A1"),
    ):
        link = f"https://t.me/proxy?port=443&secret={SECRET_B64}&server={server}"
        expected.write(f"{label} {ip} port 443:\n{link}\n")
        segno.make(link, error="m").terminal(out=expected, compact=True)
        expected.write("\n")
    assert result.stdout == expected.getvalue()
    assert "\u2580" in result.stdout or "\u2584" in result.stdout  # half blocks, no escapes
    assert "\x1b[" not in result.stdout


def test_access_qr_without_any_address(tmp_path: Path) -> None:
    result = mtgworkers("access", "--qr", write_config(tmp_path, ""))
    assert result.returncode == 0
    assert result.stdout == (
        "no public address known: pass --ipv4/--ipv6 or set public-ipv4/public-ipv6\n"
    )


def test_access_uses_the_doctor_echo_urls_of_the_config(tmp_path: Path) -> None:
    EchoHandler.seen = []
    with echo_server("127.0.0.1") as url:
        config = write_config(tmp_path, f'[doctor]\nip-echo-urls = ["{url}"]\n')
        result = mtgworkers("access", config)  # $MTGWORKERS_IP_ECHO_URLS points nowhere
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ipv4"]["ip"] == "127.0.0.1"
    assert EchoHandler.seen


def test_access_without_any_address_prints_only_the_secret(tmp_path: Path) -> None:
    result = mtgworkers("access", write_config(tmp_path, ""))
    assert result.returncode == 0
    assert result.stdout == (
        '{\n  "secret": {\n    "hex": "' + SECRET_HEX + '",\n    "base64": "' + SECRET_B64 + '"\n'
        "  }\n}\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ipv4", "1.2.3"), "incorrect ipv4: '1.2.3' is not an IP address"),
        (("--port", "x"), "incorrect port: 'x' is not an integer"),
        (("--port", "70000"), "incorrect port: 70000 is not in 1..65535"),
    ],
)
def test_access_bad_flags(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = mtgworkers("access", *args, write_config(tmp_path, ""))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"mtgworkers: error: {message}\n"


def test_render_access_encodes_like_go() -> None:
    secret = Secret.parse(SECRET_B64)
    assert cli.render_access(secret, 443, "1.2.3.4", None) == ACCESS_IPV4
    document = cli.access_document(secret, 1, None, "fe80::1")
    assert document["ipv6"]["tg_url"] == (
        f"tg://proxy?port=1&secret={SECRET_B64}&server=fe80%3A%3A1"
    )


# ---------------------------------------------------------------------------------------------
# configuration errors (run and access)


@pytest.mark.parametrize("command", ["run", "access"])
def test_missing_config_file(tmp_path: Path, command: str) -> None:
    path = str(tmp_path / "nope.toml")
    result = mtgworkers(command, path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"mtgworkers: error: config file {path} does not exist\n"


@pytest.mark.parametrize("command", ["run", "access"])
def test_config_errors_name_the_key(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path, '[network.timeout]\nidle = "-1s"\n')
    result = mtgworkers(command, config)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"mtgworkers: error: invalid config {config}: ")
    assert "network.timeout.idle: " in result.stderr
    assert result.stderr.count("\n") == 1


def test_unknown_key_and_bad_toml(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[network]\ntimeuot = 1\n")
    unknown = mtgworkers("run", config)
    assert unknown.returncode == 1
    assert "network.timeuot" in unknown.stderr
    Path(config).write_text("secret = \n")
    broken = mtgworkers("run", config)
    assert broken.returncode == 1
    assert broken.stderr.startswith("mtgworkers: error: cannot parse toml config")


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    result = mtgworkers("run", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == f"mtgworkers: error: config file {tmp_path} is a directory\n"


# ---------------------------------------------------------------------------------------------
# run / simple-run (in process, with a fake supervisor.run)


class _FakeSupervisorError(Exception):
    pass


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace the supervisor package with one whose run() records its config.

    The config paths it was given are in ``sys.modules["supervisor"].paths``; a config with
    ``[supervisor] workers = 13`` makes it fail like a port that is taken.
    """
    configs: list[Any] = []
    paths: list[str | None] = []

    def run(config: Any, config_path: str | None = None, source: Any = None) -> int:
        configs.append(config)
        paths.append(config_path)
        if config.supervisor.workers == 13:
            raise _FakeSupervisorError("cannot listen on 127.0.0.1:3128: Address already in use")
        return 7

    fake = types.ModuleType("supervisor")
    fake.run = run  # type: ignore[attr-defined]
    fake.paths = paths  # type: ignore[attr-defined]
    fake.SupervisorError = _FakeSupervisorError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "supervisor", fake)
    return configs


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_run_warns_about_deprecated_keys_and_serves(
    tmp_path: Path, served: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path, 'debug = true\ndomain-fronting-port = 8443\n[network]\ndoh-ip = "9.9.9.9"\n'
    )
    assert cli.main(["run", config]) == 7
    (cfg,) = served
    assert cfg.domain_fronting.port == 8443
    out = capsys.readouterr().out
    lines = json_lines(out)
    warnings = [(line["level"], line["logger"], line["message"]) for line in lines[:2]]
    assert warnings == [
        (
            "warn",
            "",
            'Option "domain-fronting-port" is deprecated. '
            'Please use "port" in [domain-fronting] section instead.',
        ),
        (
            "warn",
            "",
            'Option "doh-ip" from section [network] is deprecated. '
            'Please use "dns" in [network] section instead.',
        ),
    ]
    (configuration,) = [line for line in lines if line["message"] == "configuration"]
    assert configuration["level"] == "debug"
    assert configuration["configuration"]["network"]["dns"] == "https://9.9.9.9"
    assert configuration["configuration"]["secret"] == "REDACTED"
    assert SECRET_B64 not in out and SECRET_HEX[2:34] not in out


def test_run_without_debug_prints_no_configuration(
    tmp_path: Path, served: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", write_config(tmp_path, "")]) == 7
    assert capsys.readouterr().out == ""


def test_run_gives_the_supervisor_the_absolute_config_path(
    tmp_path: Path, served: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, "[supervisor]\nworkers = 3\n")
    monkeypatch.chdir(os.path.dirname(config))
    assert cli.main(["run", os.path.basename(config)]) == 7
    (cfg,) = served
    assert cfg.supervisor.workers == 3
    # SIGHUP re-reads the file: the path must not depend on the working directory later
    assert sys.modules["supervisor"].paths == [config]  # type: ignore[attr-defined]


def test_supervisor_start_errors_are_cli_errors(
    tmp_path: Path, served: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "[supervisor]\nworkers = 13\n")
    assert cli.main(["run", config]) == 1
    assert capsys.readouterr().err == (
        "mtgworkers: error: cannot listen on 127.0.0.1:3128: Address already in use\n"
    )


def test_simple_run_workers_flag(served: list[Any]) -> None:
    assert cli.main(["simple-run", "--workers=3", "127.0.0.1:3128", SECRET_HEX]) == 7
    assert cli.main(["simple-run", "--workers", "0", "127.0.0.1:3128", SECRET_HEX]) == 7
    assert [cfg.supervisor.workers for cfg in served] == [3, 0]
    # simple-run has no file to re-read on SIGHUP
    assert sys.modules["supervisor"].paths == [None, None]  # type: ignore[attr-defined]


def test_simple_run_builds_mtgs_config(
    served: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["simple-run", "127.0.0.1:3128", SECRET_HEX]) == 7
    (cfg,) = served
    assert cfg.secret.base64() == SECRET_B64
    assert str(cfg.bind_to) == "127.0.0.1:3128"
    assert cfg.debug is False
    assert cfg.concurrency == 8192
    assert cfg.prefer_ip == "prefer-ipv6"
    assert cfg.allow_fallback_on_unknown_dc is True
    assert cfg.defense.anti_replay.enabled is True
    assert cfg.defense.anti_replay.max_size == 1024 * 1024
    assert cfg.domain_fronting.port == 443 and cfg.domain_fronting.host is None
    assert str(cfg.network.dns) == "https://1.1.1.1"
    timeout = cfg.network.timeout
    assert (timeout.tcp, timeout.http, timeout.idle, timeout.handshake) == (10, 10, 10, 10)
    assert cfg.network.proxies == ()
    assert dict(cfg.dc_overrides) == {}
    assert cfg.tolerate_time_skewness == 3.0
    assert cfg.defense.doppelganger.pacing is True
    assert capsys.readouterr().out == ""


def test_simple_run_no_pacing(served: list[Any]) -> None:
    assert cli.main(["simple-run", "--no-pacing", "127.0.0.1:3128", SECRET_HEX]) == 7
    assert served[0].defense.doppelganger.pacing is False


def test_simple_run_flags(served: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "simple-run",
        "-d",
        "-c",
        "100",
        "-b",
        "16kb",
        "-i",
        "only-ipv4",
        "-p",
        "8443",
        "--domain-fronting-ip=10.0.0.1",
        "-n",
        "9.9.9.9",
        "-t",
        "1m",
        "-s",
        "socks5://127.0.0.1:1080",
        "--socks5-proxy",
        "socks5h://u:p@127.0.0.2",
        "-a",
        "2mb",
        "--dc-override",
        "2=10.1.0.1:443",
        "--dc-override=-4=[2001:db8::4]:8888",
        "--dc-override",
        "2=dc2.example:443",
        "[::]:443",
        SECRET_B64,
    ]
    assert cli.main(argv) == 7
    (cfg,) = served
    assert cfg.debug is True
    assert cfg.concurrency == 100
    assert cfg.prefer_ip == "only-ipv4"
    assert (cfg.domain_fronting.host, cfg.domain_fronting.port) == ("10.0.0.1", 8443)
    assert str(cfg.network.dns) == "https://9.9.9.9"
    assert cfg.network.timeout.idle == 60.0 and cfg.network.timeout.tcp == 60.0
    assert [(p.scheme, p.host, p.port) for p in cfg.network.proxies] == [
        ("socks5", "127.0.0.1", 1080),
        ("socks5h", "127.0.0.2", 1080),
    ]
    assert cfg.defense.anti_replay.max_size == 2 * 1024 * 1024
    assert dict(cfg.dc_overrides) == {
        2: (("10.1.0.1", 443), ("dc2.example", 443)),
        -4: (("2001:db8::4", 8888),),
    }
    lines = json_lines(capsys.readouterr().out)
    assert lines[0]["level"] == "warn"
    assert lines[0]["message"] == "Option tcp-buffer is deprecated and ignored."
    assert [line["message"] for line in lines[1:]] == ["configuration"]
    assert "u:p@" not in json.dumps(lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-c", "many"), "incorrect concurrency: 'many' is not an integer"),
        (("-c", "70000"), "incorrect concurrency: "),
        (("-t", "-1s"), "incorrect timeout: duration has to be a positive"),
        (("-i", "ipv5"), "incorrect prefer-ip: "),
        (("-s", "http://proxy"), "incorrect socks5-proxy: "),
        (("-a", "lots"), "incorrect antireplay-cache-size: "),
        (("--dc-override", "two=1.2.3.4:443"), "incorrect dc-override: 'two=1.2.3.4:443'"),
        (("--dc-override", "0=1.2.3.4:443"), "incorrect dc-override: incorrect dc number"),
        (("--dc-override", "2=1.2.3.4"), "incorrect dc-override: missing port"),
        (("--workers", "many"), "incorrect workers: 'many' is not an integer"),
        (("--workers", "-1"), "incorrect workers: negative number -1 is not allowed"),
        (("--workers", "999"), "incorrect workers: value should be 0..256"),
    ],
)
def test_simple_run_errors_name_the_flag(
    served: list[Any], capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    assert cli.main(["simple-run", *args, "0.0.0.0:443", SECRET_B64]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mtgworkers: error: {message}"), err
    assert served == []


@pytest.mark.parametrize(
    ("bind_to", "secret", "message"),
    [
        ("0.0.0.0:443", "dd" + SECRET_HEX[2:], "incorrect secret: incorrect first byte"),
        ("example.com:443", SECRET_B64, "incorrect bind-to: host is not an IP address"),
    ],
)
def test_simple_run_bad_arguments(
    served: list[Any], capsys: pytest.CaptureFixture[str], bind_to: str, secret: str, message: str
) -> None:
    assert cli.main(["simple-run", bind_to, secret]) == 1
    assert capsys.readouterr().err.startswith(f"mtgworkers: error: {message}")


def test_simple_run_process_reports_errors(tmp_path: Path) -> None:
    result = mtgworkers("simple-run", "0.0.0.0:443", "d11c6cbbd9efe7fed5bc0db220b09665")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("mtgworkers: error: incorrect secret: ")
    assert "legacy" in result.stderr


def test_simple_run_usage_lists_the_prefer_ip_values() -> None:
    from mtgworkers.config import PREFER_IP_VALUES

    usage = " ".join(cli.SIMPLE_RUN_DOC.split())
    listed = ", ".join(PREFER_IP_VALUES[:-1]) + " or " + PREFER_IP_VALUES[-1]
    assert f"IP preference: {listed}. [default: {PREFER_IP_VALUES[0]}]" in usage


def test_deprecation_messages() -> None:
    assert cli.deprecation_message("network.doh-ip") == cli.deprecation_message("doh-ip")
    assert cli.deprecation_message("domain-fronting-proxy-protocol") == (
        'Option "domain-fronting-proxy-protocol" is deprecated. '
        'Please use "proxy-protocol" in [domain-fronting] section instead.'
    )


# ---------------------------------------------------------------------------------------------
# publicip.detect against local servers

Responder = Callable[[bytes], Awaitable[bytes | None]]


@contextlib.asynccontextmanager
async def raw_http_server(
    respond: Responder, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads one request head and writes respond(head) (None: stay silent)."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            requests.append(head)
            answer = await respond(head)
            if answer is None:
                await reader.read()  # hold the connection until the client gives up
            else:
                writer.write(answer)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    try:
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        yield f"{scheme}://{netloc}/", requests
    finally:
        server.close()
        await server.wait_closed()


def fixed(answer: bytes | None) -> Responder:
    async def respond(head: bytes) -> bytes | None:
        return answer

    return respond


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def detect4(urls: list[str], timeout: float = 2.0, **kwargs: Any) -> str | None:
    return asyncio.run(publicip.detect(socket.AF_INET, urls, timeout, **kwargs))


async def detect_with(
    answer: bytes | None, family: int = socket.AF_INET, timeout: float = 2.0
) -> tuple[str | None, list[bytes]]:
    async with raw_http_server(fixed(answer)) as (url, requests):
        result = await publicip.detect(family, [url], timeout)
    return result, requests


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ok(b"203.0.113.7\n"), "203.0.113.7"),
        (ok(b"  ::ffff:203.0.113.7 \r\n"), "203.0.113.7"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n198.51.100.1", "198.51.100.1"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\n192.\r\n7;ext=1\r\n0.2.33\n\r\n0\r\n\r\n",
            "192.0.2.33",
        ),
        (b"HTTP/1.0 200 OK\r\n\r\n192.0.2.1", "192.0.2.1"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n192.0.2.1", None),
        (ok(b"<html>192.0.2.1</html>"), None),
        (ok(b"2001:db8::1"), None),  # IPv6 answer to an IPv4 question
        (ok(b"\xff\xfe"), None),
        (b"SSH-2.0-OpenSSH\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n1.2.3", None),  # truncated
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"1" * 10000, None),
    ],
)
def test_detect_parses_answers(answer: bytes, expected: str | None) -> None:
    result, requests = asyncio.run(detect_with(answer))
    assert result == expected
    (head,) = requests
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET / HTTP/1.1"
    assert "Accept: text/plain" in lines
    assert "User-Agent: curl/8.5.0" in lines
    assert any(re.fullmatch(r"Host: 127\.0\.0\.1:\d+", line) for line in lines)


def test_detect_tries_urls_in_order() -> None:
    async def scenario() -> tuple[str | None, list[bytes], list[bytes]]:
        async with (
            raw_http_server(fixed(b"HTTP/1.1 500 Oops\r\n\r\n")) as (broken, broken_requests),
            raw_http_server(fixed(ok(b"192.0.2.10"))) as (good, good_requests),
            raw_http_server(fixed(ok(b"192.0.2.99"))) as (never, never_requests),
        ):
            result = await publicip.detect(
                socket.AF_INET, [NO_ECHO, "ftp://x/", broken, good, never], 2.0
            )
            assert never_requests == []
        return result, broken_requests, good_requests

    result, broken_requests, good_requests = asyncio.run(scenario())
    assert result == "192.0.2.10"
    assert len(broken_requests) == 1 and len(good_requests) == 1


def test_detect_gives_up_after_the_timeout() -> None:
    started = time.monotonic()
    result, requests = asyncio.run(detect_with(None, timeout=0.3))
    assert result is None
    assert len(requests) == 1
    assert time.monotonic() - started < 3


def test_detect_uses_only_the_requested_family() -> None:
    # An IPv4 literal cannot be reached over IPv6: no request may arrive.
    result, requests = asyncio.run(detect_with(ok(b"2001:db8::1"), family=socket.AF_INET6))
    assert (result, requests) == (None, [])


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_detect_over_ipv6() -> None:
    async def scenario() -> tuple[str | None, str | None, list[bytes]]:
        async with raw_http_server(fixed(ok(b"2001:DB8::0:7\n")), host="::1") as (url, requests):
            v6 = await publicip.detect(socket.AF_INET6, [url], 2.0)
            v4 = await publicip.detect(socket.AF_INET, [url], 2.0)
        return v6, v4, requests

    v6, v4, requests = asyncio.run(scenario())
    assert (v6, v4) == ("2001:db8::7", None)
    assert len(requests) == 1
    assert re.search(rb"\r\nHost: \[::1\]:\d+\r\n", requests[0])


def test_detect_over_https() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def scenario() -> tuple[str | None, str | None]:
        async with raw_http_server(fixed(ok(b"192.0.2.44")), tls=server_context) as (url, _):
            trusted = await publicip.detect(socket.AF_INET, [url], 2.0, ssl_context=client_context)
            # The default context does not trust our test CA: the answer must be ignored.
            untrusted = await publicip.detect(socket.AF_INET, [url], 2.0)
        return trusted, untrusted

    assert asyncio.run(scenario()) == ("192.0.2.44", None)


def test_detect_rejects_unknown_families() -> None:
    with pytest.raises(ValueError, match="family"):
        asyncio.run(publicip.detect(socket.AF_UNIX, [NO_ECHO], 1.0))


def test_configured_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(publicip.ENV_URLS, raising=False)
    assert publicip.configured_urls() == publicip.DEFAULT_URLS
    assert publicip.DEFAULT_URLS[0] == "https://ifconfig.co"
    monkeypatch.setenv(publicip.ENV_URLS, " http://127.0.0.1:9/a , ,http://[::1]:9/b")
    assert publicip.configured_urls() == ("http://127.0.0.1:9/a", "http://[::1]:9/b")
