"""Whole documents through parse() and load() (mtgworkers.config.loader): defaults, mtg's
example config, zero values, deprecated keys, every table, errors naming the dotted key,
unknown keys, TOML types, fuzzing."""

from __future__ import annotations

import math
import pathlib
import re
import sys
import textwrap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtgworkers import config, publicip
from mtgworkers.config import (
    Config,
    ConfigError,
    DnsServer,
    HostPort,
    PreferIP,
    ProxyURL,
    load,
    loads,
    parse,
)
from mtgworkers.protocol.secret import Secret
from tests.unit.config.helpers import (
    FIREHOL,
    MTG_EXAMPLE_TOML,
    REPO,
    SECRET_B64,
    SECRET_HEX,
    error_of,
    minimal,
    with_key,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ---------------------------------------------------------------------------------------------
# Whole documents


def test_minimal_config_defaults_are_the_code_defaults() -> None:
    cfg = parse(minimal())
    assert cfg == Config(secret=Secret.parse(SECRET_HEX), bind_to=HostPort("0.0.0.0", 443))
    # docs/mtg-compat.md a.4, spelled out
    assert cfg.secret.host == "google.com"
    assert not cfg.defense.anti_replay.enabled
    assert cfg.defense.anti_replay.max_size == 1048576
    assert cfg.defense.anti_replay.error_rate == 0.001
    assert not cfg.defense.blocklist.enabled and not cfg.defense.allowlist.enabled
    assert cfg.defense.blocklist.update_each == 6 * 3600
    assert cfg.defense.blocklist.download_concurrency == 1
    assert cfg.defense.doppelganger == config.Doppelganger((), 10, 6 * 3600.0, False)
    assert not cfg.stats.statsd.enabled and not cfg.stats.prometheus.enabled
    assert cfg.stats.statsd.metric_prefix == "mtg."
    assert cfg.stats.statsd.tag_format == "datadog"
    assert cfg.stats.prometheus.metric_prefix == "mtg"
    assert cfg.stats.prometheus.http_path == "/"
    assert cfg.stats.statsd.address is None and cfg.stats.prometheus.bind_to is None
    assert cfg.network.dns is None
    assert cfg.network.proxies == ()
    assert cfg.network.timeout == config.Timeouts(tcp=None, http=None, idle=300.0, handshake=10.0)
    assert cfg.network.keep_alive == config.KeepAlive(False, 15.0, 15.0, 9)
    assert cfg.tolerate_time_skewness == 3.0
    assert cfg.concurrency == 4096
    assert cfg.prefer_ip is PreferIP.PREFER_IPV6
    assert cfg.domain_fronting == config.DomainFronting(host=None, port=443, proxy_protocol=False)
    assert cfg.public_ipv4 is None and cfg.public_ipv6 is None
    assert not (cfg.debug or cfg.auto_update or cfg.allow_fallback_on_unknown_dc)
    assert not cfg.proxy_protocol_listener
    assert dict(cfg.dc_overrides) == {}
    assert cfg.deprecated == ()


def test_mtg_minimal_testdata_with_base64_secret() -> None:
    # mtg's internal/config/testdata/minimal.toml
    cfg = parse({"secret": SECRET_B64, "bind-to": "0.0.0.0:3128"})
    assert cfg.secret.base64() == SECRET_B64
    assert str(cfg.bind_to) == "0.0.0.0:3128"


def test_mtg_example_config_with_every_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mtg.toml"
    path.write_text(MTG_EXAMPLE_TOML)
    cfg = load(path)
    assert cfg.secret.host == "storage.googleapis.com"
    assert cfg.debug and cfg.proxy_protocol_listener and cfg.auto_update
    assert cfg.allow_fallback_on_unknown_dc
    assert cfg.bind_to == HostPort("0.0.0.0", 3128)
    assert cfg.concurrency == 8192
    assert cfg.prefer_ip is PreferIP.PREFER_IPV6
    assert (cfg.public_ipv4, cfg.public_ipv6) == ("203.0.113.1", "2001:db8::1")
    assert cfg.tolerate_time_skewness == 5.0
    # [domain-fronting] wins over the deprecated keys; proxy-protocol is OR-ed
    assert cfg.domain_fronting == config.DomainFronting("10.10.10.11", 8443, True)
    assert cfg.network.dns == DnsServer("https", "1.1.1.1", 443, "/dns-query", "https://1.1.1.1")
    assert cfg.network.proxies == (
        ProxyURL("socks5", "127.0.0.1", 1080, "user", "password"),
        ProxyURL("socks5h", "proxy.example", 1080),
    )
    assert cfg.network.timeout == config.Timeouts(5.0, 10.0, 300.0, 10.0)
    assert cfg.network.keep_alive == config.KeepAlive(True, 15.0, 15.0, 9)
    assert cfg.defense.anti_replay == config.AntiReplay(True, 1048576, 0.001)
    assert cfg.defense.blocklist == config.IPListConfig(True, 2, (FIREHOL,), 86400.0)
    assert cfg.defense.allowlist == config.IPListConfig(False, 2, (), 86400.0)
    assert cfg.defense.doppelganger == config.Doppelganger(
        ("https://www.example.com/",), 10, 21600.0, True
    )
    assert cfg.stats.statsd == config.Statsd(True, HostPort("127.0.0.1", 8888), "mtg", "datadog")
    assert cfg.stats.prometheus == config.Prometheus(True, HostPort("127.0.0.1", 3129), "/", "mtg")
    assert cfg.deprecated == (
        "domain-fronting-ip",
        "domain-fronting-port",
        "domain-fronting-proxy-protocol",
        "network.doh-ip",
    )


def test_example_file_of_this_repository_parses_to_the_defaults() -> None:
    cfg = load(REPO / "config.example.toml")
    assert cfg.bind_to == HostPort("0.0.0.0", 443)
    assert cfg.secret.host == "www.example.com"
    assert cfg.secret.is_valid()
    # every optional key is commented out, so the rest is the code defaults
    assert cfg == Config(secret=cfg.secret, bind_to=cfg.bind_to)


def _uncomment_example() -> str:
    """config.example.toml with every commented-out `key = value` line enabled."""
    setting = re.compile(r"# (-?[a-z0-9][a-z0-9-]*) = ")
    lines = (REPO / "config.example.toml").read_text().splitlines()
    return "\n".join(line[2:] if setting.match(line) else line for line in lines)


def test_example_file_documents_every_key(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "all.toml"
    path.write_text(_uncomment_example())
    (tmp_path / "allowed-clients.netset").write_text("10.0.0.0/8\n")
    (tmp_path / "fronting-ca.pem").write_text("")
    cfg = load(path)
    # the documented default IP echo services are the ones publicip really uses
    assert cfg.doctor == config.Doctor(
        ip_echo_urls=publicip.DEFAULT_URLS, ca_file=str(tmp_path / "fronting-ca.pem")
    )
    # every value in the example is valid, and every section's keys are known
    assert cfg.defense.allowlist.urls == (str(tmp_path / "allowed-clients.netset"),)
    assert cfg.dc_overrides == {
        2: (("127.0.0.1", 9443), ("::1", 9443)),
        -2: (("dc2-media.internal.example", 443),),
    }
    documented = set(_keys(tomllib.loads(MTG_EXAMPLE_TOML)))
    present = set(_keys(tomllib.loads(path.read_text())))
    deprecated = {
        "domain-fronting-ip",
        "domain-fronting-port",
        "domain-fronting-proxy-protocol",
        "network.doh-ip",
    }
    assert documented - deprecated <= present
    text = (REPO / "config.example.toml").read_text()
    for key in deprecated:
        assert key.split(".")[-1] in text


def _keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    result = []
    for name, value in data.items():
        if isinstance(value, dict):
            result += _keys(value, f"{prefix}{name}.")
        else:
            result.append(prefix + name)
    return result


# --- zero values and defaults


@pytest.mark.parametrize(
    ("key", "zero", "attribute", "default"),
    [
        ("concurrency", 0, "concurrency", 4096),
        ("prefer-ip", "", "prefer_ip", "prefer-ipv6"),
        ("public-ipv4", "", "public_ipv4", None),
        ("tolerate-time-skewness", "", "tolerate_time_skewness", 3.0),
        ("tolerate-time-skewness", "0", "tolerate_time_skewness", 3.0),
        ("tolerate-time-skewness", "0ms", "tolerate_time_skewness", 3.0),
        ("domain-fronting.port", 0, "domain_fronting.port", 443),
        ("domain-fronting.ip", "", "domain_fronting.host", None),
        ("network.dns", "", "network.dns", None),
        ("network.proxies", [], "network.proxies", ()),
        ("network.timeout.tcp", "0", "network.timeout.tcp", None),
        ("network.timeout.idle", "0s", "network.timeout.idle", 300.0),
        ("network.keep-alive.count", 0, "network.keep_alive.count", 9),
        ("defense.anti-replay.max-size", "0", "defense.anti_replay.max_size", 1048576),
        ("defense.anti-replay.max-size", "0.1b", "defense.anti_replay.max_size", 1048576),
        ("defense.anti-replay.error-rate", 0.0, "defense.anti_replay.error_rate", 0.001),
        ("defense.anti-replay.error-rate", 0, "defense.anti_replay.error_rate", 0.001),
        ("defense.anti-replay.error-rate", 1e-9, "defense.anti_replay.error_rate", 0.001),
        ("defense.blocklist.download-concurrency", 0, "defense.blocklist.download_concurrency", 1),
        ("defense.doppelganger.repeats-per-raid", 0, "defense.doppelganger.repeats_per_raid", 10),
        ("stats.statsd.metric-prefix", "", "stats.statsd.metric_prefix", "mtg."),
        ("stats.statsd.tag-format", "", "stats.statsd.tag_format", "datadog"),
        ("stats.statsd.address", "", "stats.statsd.address", None),
        ("stats.prometheus.http-path", "", "stats.prometheus.http_path", "/"),
        ("debug", False, "debug", False),
        ("supervisor.workers", 0, "supervisor.workers", 0),
        ("supervisor.graceful-timeout", "0", "supervisor.graceful_timeout", 30.0),
        ("supervisor.worker-max-rss", "0", "supervisor.worker_max_rss", None),
        ("supervisor.pid-file", "", "supervisor.pid_file", None),
        ("supervisor.worker-timeout", "0", "supervisor.worker_timeout", 30.0),
        ("doctor.ntp-servers", [], "doctor.ntp_servers", config.Doctor().ntp_servers),
        ("doctor.ip-echo-urls", [], "doctor.ip_echo_urls", ()),
        ("doctor.ca-file", "", "doctor.ca_file", None),
        ("doctor.timeout", "0", "doctor.timeout", 5.0),
    ],
)
def test_zero_values_mean_default(key: str, zero: Any, attribute: str, default: Any) -> None:
    value: Any = parse(with_key(key, zero))
    for name in attribute.split("."):
        value = getattr(value, name)
    assert value == default


def test_values_are_converted() -> None:
    cfg = parse(
        minimal(
            **{
                "prefer-ip": "ONLY-IPV4",
                "network": {
                    "dns": "9.9.9.9",
                    "timeout": {"handshake": "1.5S", "tcp": "250ms"},
                    "keep-alive": {"idle": "1 M", "count": 3},
                },
                "defense": {"anti-replay": {"max-size": "2MB512KB", "error-rate": 1}},
                "stats": {
                    "statsd": {"tag-format": "InfluxDB", "address": "[::1]:8125"},
                    "prometheus": {"http-path": "metrics/", "bind-to": "[::]:9090"},
                },
            }
        )
    )
    assert cfg.prefer_ip is PreferIP.ONLY_IPV4
    assert cfg.network.dns == DnsServer("udp", "9.9.9.9", 53, text="udp://9.9.9.9")
    assert cfg.network.timeout.handshake == 1.5
    assert cfg.network.timeout.tcp == 0.25
    assert cfg.network.keep_alive.idle == 60.0
    assert cfg.network.keep_alive.count == 3
    assert cfg.defense.anti_replay.max_size == 2 * 1048576 + 512 * 1024
    assert cfg.defense.anti_replay.error_rate == 1.0
    assert isinstance(cfg.defense.anti_replay.error_rate, float)
    assert cfg.stats.statsd.tag_format == "influxdb"
    assert str(cfg.stats.statsd.address) == "[::1]:8125"
    assert cfg.stats.prometheus.http_path == "/metrics"
    assert str(cfg.stats.prometheus.bind_to) == "[::]:9090"


# --- deprecated keys


@pytest.mark.parametrize(
    ("extra", "fronting", "deprecated"),
    [
        ({"domain-fronting-port": 8443}, (None, 8443, False), ("domain-fronting-port",)),
        (
            {"domain-fronting-port": 8443, "domain-fronting": {"port": 9443}},
            (None, 9443, False),
            ("domain-fronting-port",),
        ),
        ({"domain-fronting-ip": "10.0.0.10"}, ("10.0.0.10", 443, False), ("domain-fronting-ip",)),
        (
            {"domain-fronting-ip": "10.0.0.10", "domain-fronting": {"ip": "10.0.0.11"}},
            ("10.0.0.11", 443, False),
            ("domain-fronting-ip",),
        ),
        (
            {"domain-fronting-proxy-protocol": True},
            (None, 443, True),
            ("domain-fronting-proxy-protocol",),
        ),
        (
            {"domain-fronting-proxy-protocol": False, "domain-fronting": {"proxy-protocol": True}},
            (None, 443, True),
            (),
        ),
        # zero values are "not set": no warning
        ({"domain-fronting-port": 0, "domain-fronting-ip": ""}, (None, 443, False), ()),
    ],
)
def test_deprecated_domain_fronting_keys(
    extra: dict[str, Any], fronting: tuple[Any, ...], deprecated: tuple[str, ...]
) -> None:
    cfg = parse(minimal(**extra))
    assert cfg.domain_fronting == config.DomainFronting(*fronting)
    assert cfg.deprecated == deprecated


@pytest.mark.parametrize(
    ("network", "dns"),
    [
        ({"doh-ip": "1.1.1.1"}, "https://1.1.1.1"),
        ({"doh-ip": "2606:4700:4700::1111"}, "https://[2606:4700:4700::1111]"),
        ({"doh-ip": "1.1.1.1", "dns": "tls://dns.google"}, "tls://dns.google"),
        ({"doh-ip": "1.1.1.1", "dns": ""}, "https://1.1.1.1"),
    ],
)
def test_deprecated_doh_ip(network: dict[str, Any], dns: str) -> None:
    cfg = parse(minimal(network=network))
    assert str(cfg.network.dns) == dns
    assert cfg.deprecated == ("network.doh-ip",)


def test_deprecated_values_are_validated() -> None:
    assert error_of(minimal(**{"domain-fronting-port": 70000})).startswith(
        "domain-fronting-port: incorrect port number"
    )
    assert error_of(minimal(**{"domain-fronting-ip": "x"})) == "domain-fronting-ip: incorrect ip x"
    assert error_of(minimal(network={"doh-ip": "1.1.1"})) == "network.doh-ip: incorrect ip 1.1.1"


# --- [dc-overrides]


def test_dc_overrides_from_toml(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            secret = "{SECRET_HEX}"
            bind-to = "127.0.0.1:8443"

            [dc-overrides]
            2 = ["127.0.0.1:9443", "[::1]:9443"]
            -4 = ["dc4-media.example:443"]
            10002 = ["[2001:db8::2]:443"]
            """
        )
    )
    cfg = load(path)
    assert dict(cfg.dc_overrides) == {
        2: (("127.0.0.1", 9443), ("::1", 9443)),
        -4: (("dc4-media.example", 443),),
        10002: (("2001:db8::2", 443),),
    }
    with pytest.raises(TypeError):
        cfg.dc_overrides[3] = (("127.0.0.1", 1),)  # type: ignore[index]
    assert cfg.to_json_dict()["dc-overrides"] == {
        "2": ["127.0.0.1:9443", "[::1]:9443"],
        "-4": ["dc4-media.example:443"],
        "10002": ["[2001:db8::2]:443"],
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"2": ["localhost"]}, "dc-overrides.2[0]: missing port in address: localhost"),
        ({"2": ["127.0.0.1:1", "::1:443"]}, "dc-overrides.2[1]: too many colons"),
        ({"2": []}, "dc-overrides.2: expected a non-empty array"),
        ({"2": "127.0.0.1:443"}, "dc-overrides.2: expected an array of strings, got string"),
        ({"2": [443]}, "dc-overrides.2[0]: expected a string, got integer"),
        ({"two": ["127.0.0.1:443"]}, "dc-overrides.two: incorrect dc number"),
        ({"0": ["127.0.0.1:443"]}, "dc-overrides.0: incorrect dc number"),
        ({"2": {"a": 1}}, "dc-overrides.2: expected an array of strings, got table"),
    ],
)
def test_dc_overrides_errors(overrides: dict[str, Any], message: str) -> None:
    assert error_of(minimal(**{"dc-overrides": overrides})).startswith(message)


def test_dc_overrides_must_be_a_table() -> None:
    assert error_of(minimal(**{"dc-overrides": ["127.0.0.1:1"]})) == (
        "dc-overrides: expected a table, got array"
    )


# --- [supervisor]


def test_supervisor_table_is_optional_and_has_documented_defaults() -> None:
    cfg = parse(minimal())
    assert cfg.supervisor == config.Supervisor(
        workers=0, graceful_timeout=30.0, worker_max_rss=None, pid_file=None, worker_timeout=30.0
    )
    assert cfg.to_json_dict()["supervisor"] == {
        "workers": 0,
        "graceful-timeout": "30s",
        "worker-max-rss": None,
        "pid-file": None,
        "worker-timeout": "30s",
    }


def test_supervisor_values(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            secret = "{SECRET_HEX}"
            bind-to = "127.0.0.1:8443"

            [supervisor]
            workers = 4
            graceful-timeout = "1m30s"
            worker-max-rss = "512MB"
            pid-file = "run/mtgworkers.pid"
            worker-timeout = "2m"
            """
        )
    )
    cfg = load(path)
    assert cfg.supervisor == config.Supervisor(
        workers=4,
        graceful_timeout=90.0,
        worker_max_rss=512 * 1024 * 1024,
        pid_file=str(tmp_path / "run" / "mtgworkers.pid"),
        worker_timeout=120.0,
    )
    data = cfg.to_json_dict()["supervisor"]
    assert data == {
        "workers": 4,
        "graceful-timeout": "1m30s",
        "worker-max-rss": "512mib",
        "pid-file": str(tmp_path / "run" / "mtgworkers.pid"),
        "worker-timeout": "2m0s",
    }
    # the JSON form parses back to the same values
    again = parse(minimal(supervisor=data))
    assert again.supervisor == cfg.supervisor


def test_supervisor_absolute_pid_file_needs_no_base_dir() -> None:
    cfg = parse(minimal(supervisor={"pid-file": "/run/mtgworkers.pid"}))
    assert cfg.supervisor.pid_file == "/run/mtgworkers.pid"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("workers", 257, "supervisor.workers: value should be 0..256 (0 = one per CPU) (257)"),
        ("workers", -1, "supervisor.workers: negative number -1 is not allowed"),
        ("workers", "2", "supervisor.workers: expected an integer, got string"),
        ("graceful-timeout", "-1s", "supervisor.graceful-timeout: duration has to be a positive"),
        ("graceful-timeout", 30, "supervisor.graceful-timeout: expected a string, got integer"),
        ("worker-max-rss", "lots", "supervisor.worker-max-rss: incorrect bytes value (lots)"),
        ("worker-max-rss", "512", "supervisor.worker-max-rss: incorrect bytes value (512)"),
        ("pid-file", "/tmp/", "supervisor.pid-file: value is a path to a directory"),
        ("pid-file", "a\x00b", "supervisor.pid-file: path contains a NUL character"),
        ("worker-timeout", "-1s", "supervisor.worker-timeout: duration has to be a positive"),
        ("worker-timeout", "500ms", "supervisor.worker-timeout: has to be at least 1s (500ms)"),
        ("worker-timeout", 30, "supervisor.worker-timeout: expected a string, got integer"),
        ("threads", 2, "supervisor.threads: unknown key"),
    ],
)
def test_supervisor_errors_name_the_key(key: str, value: Any, message: str) -> None:
    assert error_of(minimal(supervisor={key: value})).startswith(message)


# --- [doctor]


def test_doctor_table_is_optional_and_has_documented_defaults() -> None:
    cfg = parse(minimal())
    assert cfg.doctor == config.Doctor(
        ntp_servers=(
            ("0.pool.ntp.org", 123),
            ("1.pool.ntp.org", 123),
            ("time.google.com", 123),
            ("time.cloudflare.com", 123),
        ),
        ip_echo_urls=(),
        ca_file=None,
        timeout=5.0,
    )
    assert cfg.to_json_dict()["doctor"] == {
        "ntp-servers": [
            "0.pool.ntp.org",
            "1.pool.ntp.org",
            "time.google.com",
            "time.cloudflare.com",
        ],
        "ip-echo-urls": [],
        "ca-file": None,
        "timeout": "5s",
    }


def test_doctor_values(tmp_path: pathlib.Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("")
    path = tmp_path / "c.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            secret = "{SECRET_HEX}"
            bind-to = "127.0.0.1:8443"

            [doctor]
            ntp-servers = ["127.0.0.1:1123", "ntp.example", "[::1]:9", "::1"]
            ip-echo-urls = ["http://127.0.0.1:8080/ip", "HTTPS://u:pw@echo.example"]
            ca-file = "certs/ca.pem"
            timeout = "1.5s"
            """
        )
    )
    cfg = load(path)
    assert cfg.doctor == config.Doctor(
        ntp_servers=(("127.0.0.1", 1123), ("ntp.example", 123), ("::1", 9), ("::1", 123)),
        ip_echo_urls=("http://127.0.0.1:8080/ip", "https://u:pw@echo.example"),
        ca_file=str(tmp_path / "certs" / "ca.pem"),
        timeout=1.5,
    )
    data = cfg.to_json_dict()["doctor"]
    assert data == {
        "ntp-servers": ["127.0.0.1:1123", "ntp.example", "[::1]:9", "::1"],
        "ip-echo-urls": ["http://127.0.0.1:8080/ip", "https://u:REDACTED@echo.example"],
        "ca-file": str(tmp_path / "certs" / "ca.pem"),
        "timeout": "1.5s",
    }
    data["ip-echo-urls"] = list(cfg.doctor.ip_echo_urls)
    assert parse(minimal(doctor=data)).doctor == cfg.doctor


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ntp-servers", ["bad host"], "doctor.ntp-servers[0]: host is neither an IP address"),
        ("ntp-servers", ["h.example:0"], "doctor.ntp-servers[0]: incorrect port number"),
        ("ntp-servers", ["", "x"], "doctor.ntp-servers[0]: empty host"),
        ("ntp-servers", "pool.ntp.org", "doctor.ntp-servers: expected an array of strings"),
        ("ip-echo-urls", ["ftp://h.example"], "doctor.ip-echo-urls[0]: unsupported schema: ftp"),
        ("ip-echo-urls", ["https://"], "doctor.ip-echo-urls[0]: url has to have a scheme and a"),
        ("ip-echo-urls", ["ifconfig.co"], "doctor.ip-echo-urls[0]: unsupported schema: (none)"),
        ("ca-file", "/nonexistent/ca.pem", "doctor.ca-file: cannot use file /nonexistent/ca.pem"),
        ("ca-file", "/tmp", "doctor.ca-file: value is not a regular file: /tmp"),
        ("timeout", "-1s", "doctor.timeout: duration has to be a positive"),
        ("timeout", 5, "doctor.timeout: expected a string, got integer"),
        ("deadline", "60s", "doctor.deadline: unknown key"),
    ],
)
def test_doctor_errors_name_the_key(key: str, value: Any, message: str) -> None:
    assert error_of(minimal(doctor={key: value})).startswith(message)


def test_doctor_ca_file_is_relative_to_the_config(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    cfg = parse(minimal(doctor={"ca-file": "ca.pem"}), base_dir=str(tmp_path))
    assert cfg.doctor.ca_file == str(tmp_path / "ca.pem")


def test_supervisor_pid_file_that_is_a_directory(tmp_path: pathlib.Path) -> None:
    assert error_of(minimal(supervisor={"pid-file": "."}), base_dir=str(tmp_path)) == (
        f"supervisor.pid-file: value is a path to a directory: {tmp_path}"
    )


# --- errors name the key


def test_secret_errors() -> None:
    assert error_of({"bind-to": "0.0.0.0:443"}) == "secret: secret is empty"
    assert error_of({"secret": "", "bind-to": "0.0.0.0:443"}) == "secret: secret is empty"
    dd = "dd" + SECRET_HEX[2:34]
    assert error_of(minimal(secret=dd)).startswith("secret: incorrect first byte of secret: 0xdd")
    zero_key = "ee" + "00" * 16 + "676f6f676c652e636f6d"
    assert error_of(minimal(secret=zero_key)).startswith("secret: invalid secret")
    assert error_of(minimal(secret=42)) == "secret: expected a string, got integer"


def test_secret_text_never_appears_in_errors() -> None:
    no_host = SECRET_HEX[:34]  # marker + key, no host: the secret parser quotes its input
    message = error_of(minimal(secret=no_host))
    assert message.startswith("secret: hostname cannot be empty")
    assert no_host not in message
    assert no_host[2:] not in message
    zero_key = "ee" + "00" * 16 + "676f6f676c652e636f6d"
    assert zero_key not in error_of(minimal(secret=zero_key))


def test_bind_to_is_required() -> None:
    assert error_of({"secret": SECRET_HEX}).startswith("bind-to: bind-to is required")
    assert error_of({"secret": SECRET_HEX, "bind-to": ""}).startswith("bind-to: bind-to is")
    assert error_of(minimal(**{"bind-to": "localhost:443"})) == (
        "bind-to: host is not an IP address: localhost:443"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("network.timeout.idle", "-1s", "network.timeout.idle: duration has to be a positive"),
        ("network.timeout.tcp", "5", "network.timeout.tcp: incorrect duration (5): missing unit"),
        ("network.keep-alive.interval", "1d", "network.keep-alive.interval: incorrect duration"),
        ("network.keep-alive.count", 65536, "network.keep-alive.count: value should be 1..65535"),
        ("network.keep-alive.count", -1, "network.keep-alive.count: negative number -1"),
        ("network.proxies", [""], "network.proxies[0]: url has to have a scheme and a host"),
        ("network.proxies", ["socks5://h.example", "x"], "network.proxies[1]: url has to have"),
        ("network.dns", "dns://1.1.1.1", "network.dns: unsupported DNS type dns"),
        ("concurrency", 65536, "concurrency: value should be 1..65535 (65536)"),
        ("prefer-ip", "ipv4", "prefer-ip: unsupported ip preference: ipv4"),
        ("public-ipv6", "::1%lo", "public-ipv6: incorrect ip ::1%lo"),
        ("tolerate-time-skewness", "-3s", "tolerate-time-skewness: duration has to be a positive"),
        ("domain-fronting.port", 65536, "domain-fronting.port: incorrect port number (65536)"),
        ("domain-fronting.port", -443, "domain-fronting.port: negative number -443"),
        ("defense.anti-replay.max-size", "1", "defense.anti-replay.max-size: incorrect bytes"),
        ("defense.anti-replay.error-rate", 100, "defense.anti-replay.error-rate: value should"),
        ("defense.anti-replay.error-rate", -0.5, "defense.anti-replay.error-rate: value should"),
        ("defense.anti-replay.error-rate", math.nan, "defense.anti-replay.error-rate: value"),
        ("defense.blocklist.urls", ["ftp://x"], "defense.blocklist.urls[0]: neither an existing"),
        ("defense.allowlist.update-each", "x", "defense.allowlist.update-each: incorrect"),
        ("defense.doppelganger.urls", ["http://a"], "defense.doppelganger.urls[0]: unsupported"),
        ("defense.doppelganger.raid-each", "-6h", "defense.doppelganger.raid-each: duration"),
        ("stats.statsd.address", "localhost:8125", "stats.statsd.address: host is not an IP"),
        ("stats.statsd.metric-prefix", "mtg.", "stats.statsd.metric-prefix: incorrect metric"),
        ("stats.statsd.tag-format", "json", "stats.statsd.tag-format: unknown tag format json"),
        ("stats.prometheus.bind-to", ":9090", "stats.prometheus.bind-to: empty host: :9090"),
        ("stats.prometheus.metric-prefix", "MTG", "stats.prometheus.metric-prefix: incorrect"),
    ],
)
def test_value_errors_name_the_dotted_key(key: str, value: Any, message: str) -> None:
    assert error_of(with_key(key, value)).startswith(message)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("debug", "true", "debug: expected a boolean, got string"),
        ("debug", 1, "debug: expected a boolean, got integer"),
        ("bind-to", 443, "bind-to: expected a string, got integer"),
        ("concurrency", "8192", "concurrency: expected an integer, got string"),
        ("concurrency", 1.0, "concurrency: expected an integer, got float"),
        ("concurrency", True, "concurrency: expected an integer, got boolean"),
        ("tolerate-time-skewness", 5, "tolerate-time-skewness: expected a string, got integer"),
        ("domain-fronting.port", "443", "domain-fronting.port: expected an integer, got string"),
        ("domain-fronting.port", 1.5, "domain-fronting.port: expected an integer, got float"),
        ("domain-fronting", "x", "domain-fronting: expected a table, got string"),
        ("network", [{}], "network: expected a table, got array"),
        ("network.proxies", "socks5://h", "network.proxies: expected an array of strings, got"),
        ("network.proxies", [1080], "network.proxies[0]: expected a string, got integer"),
        ("network.timeout", "5s", "network.timeout: expected a table, got string"),
        ("network.keep-alive.disabled", "yes", "network.keep-alive.disabled: expected a boolean"),
        ("defense.anti-replay.max-size", 1048576, "defense.anti-replay.max-size: expected a str"),
        ("defense.anti-replay.error-rate", "0.1", "defense.anti-replay.error-rate: expected a n"),
        ("defense.anti-replay.error-rate", True, "defense.anti-replay.error-rate: expected a n"),
        ("defense.blocklist.urls", [[FIREHOL]], "defense.blocklist.urls[0]: expected a string"),
        ("stats.prometheus.enabled", "true", "stats.prometheus.enabled: expected a boolean"),
    ],
)
def test_wrong_toml_type(key: str, value: Any, message: str) -> None:
    assert error_of(with_key(key, value)).startswith(message)


def test_wrong_toml_type_for_datetime(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'secret = "{SECRET_HEX}"\nbind-to = "0.0.0.0:1"\n'
        "[network.timeout]\nidle = 1979-05-27T07:32:00Z\n"
    )
    with pytest.raises(
        ConfigError, match=r"^network\.timeout\.idle: expected a string, got datetime$"
    ):
        load(path)


@pytest.mark.parametrize(
    "dotted",
    [
        "secrets",
        "bind_to",
        "domain-fronting.host",
        "network.timeot",
        "network.timeout.connect",
        "network.keep-alive.enabled",
        "network.doh",
        "defense.anti-replay.enable",
        "defense.blocklist.url",
        "defense.allowlist.update",
        "defense.doppelganger.repeats",
        "defense.antireplay",
        "stats.statsd.prefix",
        "stats.prometheus.path",
        "stats.influx",
    ],
)
def test_unknown_keys_are_errors(dotted: str) -> None:
    assert error_of(with_key(dotted, "x")) == f"{dotted}: unknown key"


def test_unknown_table_is_an_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'secret = "{SECRET_HEX}"\nbind-to = "0.0.0.0:1"\n[metrics]\nport = 1\n')
    with pytest.raises(ConfigError, match=r"^metrics: unknown key$"):
        load(path)


# --- load()


def test_load_resolves_list_files_against_the_config_directory(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "block.netset").write_text("10.0.0.0/8\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (conf_dir / "c.toml").write_text(
        f'secret = "{SECRET_HEX}"\nbind-to = "0.0.0.0:1"\n'
        f'[defense.blocklist]\nurls = ["block.netset", "{FIREHOL}"]\n'
    )
    cfg = load(pathlib.Path("..", "etc", "c.toml"))
    assert cfg.defense.blocklist.urls == (str(conf_dir / "block.netset"), FIREHOL)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"s = sdfsdfds", "cannot parse toml config"),  # mtg's testdata/broken.toml
        (b"", "secret: secret is empty"),
        (f'secret = "{SECRET_B64}"\n'.encode(), "bind-to: bind-to is required"),
        (b'secret = "\xff"', "cannot parse toml config"),
        (b"a = 1\na = 2\n", "cannot parse toml config"),
        # Found by the fuzz campaign (fuzz/corpus/config/): the decoder's recursion and
        # Python's int() digit limit used to escape as RecursionError and ValueError.
        (b"a = " + b"[" * 5000 + b"]" * 5000, "arrays or tables are nested too deeply"),
        (b"a = " + b"{b=" * 3000 + b"1" + b"}" * 3000, "arrays or tables are nested too deeply"),
        (b"a = " + b"7" * 5000, "cannot parse toml config .*integer string conversion"),
    ],
)
def test_load_errors(tmp_path: pathlib.Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_loads_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^cannot parse toml config <string>: "):
        loads(b"[" * 3000)
    with pytest.raises(ConfigError, match=r"^cannot parse toml config here: "):
        loads("s = sdfsdfds", source="here")
    assert loads(f'secret = "{SECRET_B64}"\nbind-to = "0.0.0.0:1"\n').bind_to.port == 1


def test_load_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.toml"):
        load(tmp_path / "nope.toml")


def test_parse_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a table"):
        parse(["secret"])  # type: ignore[arg-type]


TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["0", "5s", "1mb", "127.0.0.1:1", "socks5://h", "https://h", "1.1.1.1"]),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(["enabled", "urls", "port", "ip", "idle", "2", "x"]),
            children,
            max_size=3,
        ),
    ),
    max_leaves=8,
)
KNOWN_KEYS = [
    "debug",
    "concurrency",
    "prefer-ip",
    "public-ipv4",
    "domain-fronting",
    "domain-fronting-port",
    "network",
    "defense",
    "stats",
    "dc-overrides",
    "tolerate-time-skewness",
]


@settings(max_examples=300, deadline=None)
@given(extra=st.dictionaries(st.sampled_from(KNOWN_KEYS), TOML_VALUES, max_size=4))
def test_parse_raises_only_config_error(extra: dict[str, Any]) -> None:
    try:
        parse(minimal(**extra), base_dir="/nonexistent-base-dir")
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(
        [
            "network.timeout",
            "network.keep-alive",
            "network",
            "defense.anti-replay",
            "defense.blocklist",
            "defense.doppelganger",
            "stats.statsd",
            "stats.prometheus",
            "domain-fronting",
            "dc-overrides",
        ]
    ),
    key=st.sampled_from(
        [
            "idle",
            "count",
            "dns",
            "proxies",
            "max-size",
            "error-rate",
            "urls",
            "address",
            "metric-prefix",
            "http-path",
            "port",
            "ip",
            "2",
            "-2",
            "tcp",
            "drs",
        ]
    ),
    value=TOML_VALUES,
)
def test_parse_nested_raises_only_config_error(section: str, key: str, value: Any) -> None:
    try:
        parse(with_key(f"{section}.{key}", value), base_dir="/nonexistent-base-dir")
    except ConfigError:
        pass


def test_statsd_enabled_without_address_names_the_key() -> None:
    from mtgworkers.config import ConfigError, parse

    data = {
        "secret": "ee" + "11" * 16 + b"example.com".hex(),
        "bind-to": "127.0.0.1:443",
        "stats": {"statsd": {"enabled": True}},
    }
    with pytest.raises(ConfigError, match=r"^stats\.statsd\.address: "):
        parse(data)


# ---------------------------------------------------------------------------------------------
# proxy-protocol-trusted (ours)


def test_proxy_protocol_trusted_is_unset_by_default() -> None:
    cfg = parse(minimal(**{"proxy-protocol-listener": True}))
    assert cfg.proxy_protocol_trusted is None
    assert config.warnings(cfg) == [config.UNTRUSTED_PROXY_HEADERS]
    assert config.warnings(parse(minimal())) == []  # no listener: nothing to warn about


def test_proxy_protocol_trusted_networks() -> None:
    cfg = parse(
        minimal(
            **{
                "proxy-protocol-listener": True,
                "proxy-protocol-trusted": ["127.0.0.1", "10.1.2.3/8", "::1/128", "fd00::/8"],
            }
        )
    )
    assert [str(n) for n in cfg.proxy_protocol_trusted or ()] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
        "fd00::/8",
    ]
    assert config.warnings(cfg) == []
    assert cfg.to_json_dict()["proxy-protocol-trusted"] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
        "fd00::/8",
    ]
    empty = parse(minimal(**{"proxy-protocol-trusted": []}))
    assert empty.proxy_protocol_trusted == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["10.0.0.0/8", "x"], "proxy-protocol-trusted[1]: incorrect network 'x'"),
        (["10.0.0.0/33"], "proxy-protocol-trusted[0]: incorrect network '10.0.0.0/33'"),
        (["fe80::1%eth0"], "proxy-protocol-trusted[0]: incorrect network 'fe80::1%eth0'"),
        (["10.0.0.0/255.0.0.0"], "proxy-protocol-trusted[0]: incorrect network"),
        ([1], "proxy-protocol-trusted[0]: expected a string, got integer"),
        ("10.0.0.0/8", "proxy-protocol-trusted: expected an array of strings, got string"),
    ],
)
def test_proxy_protocol_trusted_errors(value: Any, message: str) -> None:
    assert error_of(minimal(**{"proxy-protocol-trusted": value})).startswith(message)


def test_pacing_is_on_by_default_and_can_be_turned_off() -> None:
    assert parse(minimal()).defense.doppelganger.pacing is True
    off = parse(minimal(defense={"doppelganger": {"pacing": False}}))
    assert off.defense.doppelganger.pacing is False
    assert off.to_json_dict()["defense"]["doppelganger"]["pacing"] is False
    assert error_of(minimal(defense={"doppelganger": {"pacing": "no"}})) == (
        "defense.doppelganger.pacing: expected a boolean, got string"
    )
