"""URL values (mtgworkers.config.urls): the DNS server, SOCKS5 proxies, IP-list sources,
doppelganger and IP echo URLs; passwords never in messages."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings

from mtgworkers.config import (
    ConfigError,
    DnsServer,
    ProxyURL,
    parse_dns,
    parse_echo_url,
    parse_https_url,
    parse_list_url,
    parse_proxy_url,
)
from mtgworkers.config.urls import DNS_DEFAULT_PORTS, DOH_DEFAULT_PATH
from tests.unit.config.helpers import FIREHOL, HOSTILE_TEXT, raises_only_config_error

# ---------------------------------------------------------------------------------------------
# DNS (TypeDNSURI)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # mtg's type_dns_uri_test.go
        ("1.1.1.1", DnsServer("udp", "1.1.1.1", 53, "", "udp://1.1.1.1")),
        ("tls://1.1.1.1", DnsServer("tls", "1.1.1.1", 853, "", "tls://1.1.1.1")),
        ("tls://dns.google", DnsServer("tls", "dns.google", 853, "", "tls://dns.google")),
        ("https://1.1.1.1", DnsServer("https", "1.1.1.1", 443, "/dns-query", "https://1.1.1.1")),
        (
            "https://1.1.1.1/dns-query",
            DnsServer("https", "1.1.1.1", 443, "/dns-query", "https://1.1.1.1/dns-query"),
        ),
        (
            "https://dns.google",
            DnsServer("https", "dns.google", 443, "/dns-query", "https://dns.google"),
        ),
        (
            "https://dns.google/dns-query",
            DnsServer("https", "dns.google", 443, "/dns-query", "https://dns.google/dns-query"),
        ),
        ("udp://1.1.1.1", DnsServer("udp", "1.1.1.1", 53, "", "udp://1.1.1.1")),
        # more
        ("udp://1.1.1.1:53", DnsServer("udp", "1.1.1.1", 53, "", "udp://1.1.1.1:53")),
        ("udp://1.1.1.1:5353", DnsServer("udp", "1.1.1.1", 5353, "", "udp://1.1.1.1:5353")),
        (
            "udp://[2606:4700:4700::1111]:53",
            DnsServer("udp", "2606:4700:4700::1111", 53, "", "udp://[2606:4700:4700::1111]:53"),
        ),
        ("tls://dns.google:853", DnsServer("tls", "dns.google", 853, "", "tls://dns.google:853")),
        (
            "tls://DNS.Google:8853",
            DnsServer("tls", "dns.google", 8853, "", "tls://DNS.Google:8853"),
        ),
        ("https://[::1]:8443/q", DnsServer("https", "::1", 8443, "/q", "https://[::1]:8443/q")),
        (
            "https://[2001:DB8::1]",
            DnsServer("https", "2001:db8::1", 443, "/dns-query", "https://[2001:DB8::1]"),
        ),
        ("HTTPS://1.1.1.1", DnsServer("https", "1.1.1.1", 443, "/dns-query", "https://1.1.1.1")),
        ("https://1.1.1.1/", DnsServer("https", "1.1.1.1", 443, "/", "https://1.1.1.1/")),
        (
            "https://dns.example/dns-query?x=1",
            DnsServer(
                "https", "dns.example", 443, "/dns-query?x=1", "https://dns.example/dns-query?x=1"
            ),
        ),
        # the query stays in the DoH path, the fragment is never sent
        (
            "https://dns.example?ct=1#top",
            DnsServer(
                "https", "dns.example", 443, "/dns-query?ct=1", "https://dns.example?ct=1#top"
            ),
        ),
        (
            "https://dns.example/q#top?x",
            DnsServer("https", "dns.example", 443, "/q", "https://dns.example/q#top?x"),
        ),
        (
            "https://dns.example/q?",
            DnsServer("https", "dns.example", 443, "/q", "https://dns.example/q?"),
        ),
        # extension: bare IPv6 (mtg's URL parser rejects it)
        (
            "2606:4700:4700::1111",
            DnsServer("udp", "2606:4700:4700::1111", 53, "", "udp://[2606:4700:4700::1111]"),
        ),
        ("[::1]", DnsServer("udp", "::1", 53, "", "udp://[::1]")),
        ("::ffff:1.2.3.4", DnsServer("udp", "1.2.3.4", 53, "", "udp://1.2.3.4")),
    ],
)
def test_parse_dns_ok(text: str, expected: DnsServer) -> None:
    server = parse_dns(text)
    assert server == expected
    assert str(server) == expected.text


def test_dns_server_text() -> None:
    # str() is the configured text; a value built in code spells itself out
    assert str(parse_dns("9.9.9.9")) == "udp://9.9.9.9"
    assert str(DnsServer("udp", "::1", 5353)) == "udp://[::1]:5353"
    assert str(DnsServer("https", "dns.example", 443, "/dns-query")) == (
        "https://dns.example:443/dns-query"
    )
    # the text parses back to the same server
    for text in ("udp://[::1]:5353", "https://dns.example:443/dns-query", "tls://9.9.9.9:853"):
        server = parse_dns(text)
        assert parse_dns(str(server)) == server


def test_dns_default_ports_and_path() -> None:
    assert DNS_DEFAULT_PORTS == {"udp": 53, "tls": 853, "https": 443}
    assert DOH_DEFAULT_PATH == "/dns-query"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_dns_uri_test.go
        ("xx", "unsupported DNS address"),
        ("ppar", "unsupported DNS address"),
        ("", "unsupported DNS address"),
        ("dns://hahaha", "unsupported DNS type dns"),
        ("udp://xcxxcv", "simple DNS must be an IP address"),
        ("udp://1.1.1.1/xcv", "path is supported only for DoH"),
        ("1.1.1.1/xxx", "unsupported DNS address"),
        ("tls://dns/xx", "path is supported only for DoH"),
        ("tls://1.1.1.1/xx", "path is supported only for DoH"),
        ("https://user:password@1.1.1.1", "user info is not supported"),
        ("tls://user:password@1.1.1.1", "user info is not supported"),
        ("udp://user:password@1.1.1.1", "user info is not supported"),
        # more
        ("https://", "unsupported DNS address"),
        ("1.1.1.1:53", "unsupported DNS"),
        ("udp://1.1.1.1:70000", "incorrect port"),
        ("udp://1.1.1.1:", "incorrect port"),
        ("https://2606:4700::1111", "neither an IP address nor a valid host name"),
        ("tls://[dns.google]", "incorrect IPv6 address in brackets"),
        ("tls://bad host", "neither an IP address nor a valid host name"),
        ("https://1.1.1.1\n", "control character"),
        ("://1.1.1.1", "missing protocol scheme"),
        ("//1.1.1.1", r"unsupported DNS type \(none\): //1.1.1.1"),
        ("https://a b@dns.example", "invalid userinfo in URL"),
        ("https://u:%ff@dns.example", "invalid percent-encoding in userinfo"),
        ("https://[::1", "missing ']' in host"),
        ("https://[::1]x", "invalid port 'x' after host"),
        ("tls://[1.2.3.4]", "incorrect IPv6 address in brackets"),
        ("[1.2.3.4]", "unsupported DNS address"),
        ("tls://dns.example/", "path is supported only for DoH"),
    ],
)
def test_parse_dns_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_dns(text)


# ---------------------------------------------------------------------------------------------
# SOCKS5 proxies (TypeProxyURL)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # mtg's type_proxy_url_test.go (port 1080 added, query ignored)
        ("socks5://127.0.0.1/?open_threshold=1", ProxyURL("socks5", "127.0.0.1", 1080)),
        ("socks5://127.0.0.1:80", ProxyURL("socks5", "127.0.0.1", 80)),
        # more
        ("socks5h://proxy.example", ProxyURL("socks5h", "proxy.example", 1080)),
        ("SOCKS5://127.0.0.1:1081", ProxyURL("socks5", "127.0.0.1", 1081)),
        ("socks5://user@[::1]", ProxyURL("socks5", "::1", 1080, "user", None)),
        ("socks5://u:p@10.0.0.1:9050", ProxyURL("socks5", "10.0.0.1", 9050, "u", "p")),
        (
            "socks5://us%20er:pa%40ss:w@proxy.example:1080",
            ProxyURL("socks5", "proxy.example", 1080, "us er", "pa@ss:w"),
        ),
        ("socks5://:secret@h.example", ProxyURL("socks5", "h.example", 1080, "", "secret")),
    ],
)
def test_parse_proxy_url_ok(text: str, expected: ProxyURL) -> None:
    assert parse_proxy_url(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_proxy_url_test.go
        ("", "has to have a scheme and a host"),
        ("socks5://", "has to have a scheme and a host"),
        ("://lala", "missing protocol scheme"),
        ("/path", "has to have a scheme and a host"),
        # more
        ("http://127.0.0.1:1080", "unsupported schema: http"),
        ("socks4://127.0.0.1", "unsupported schema: socks4"),
        ("socks5://user@", "has to have a scheme and a host"),
        ("socks5://127.0.0.1:0", "incorrect port"),
        ("socks5://127.0.0.1:99999", "incorrect port"),
        ("socks5://127.0.0.1:x", "incorrect port"),
        ("socks5://bad host", "neither an IP address nor a valid host name"),
        ("socks5://u:p%zz@h.example", "invalid userinfo"),
        ("socks5://u:p%ff@h.example", "not UTF-8"),
        ("127.0.0.1:1080", "has to have a scheme and a host"),
    ],
)
def test_parse_proxy_url_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_proxy_url(text)


def test_proxy_url_never_shows_password() -> None:
    proxy = parse_proxy_url("socks5://alice:hunter2@[2001:db8::5]:1081")
    assert proxy.password == "hunter2"
    assert str(proxy) == "socks5://alice:REDACTED@[2001:db8::5]:1081"
    assert "hunter2" not in repr(proxy)
    assert str(parse_proxy_url("socks5://bob@h.example")) == "socks5://bob@h.example:1080"
    assert str(parse_proxy_url("socks5://1.2.3.4")) == "socks5://1.2.3.4:1080"


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_proxy_url, "socks5://u:hunter2@h.example:0"),
        (parse_proxy_url, "socks5://u:hunter2@bad host"),
        (parse_proxy_url, "socks5://u:hunter2%zz@h.example"),
        (parse_proxy_url, "http://u:hunter2@h.example"),
        (parse_proxy_url, "socks5://u:hunter2@h.example\n"),
        (parse_dns, "https://u:hunter2@1.1.1.1"),
        (parse_dns, "udp://u:hunter2@1.1.1.1/x"),
        (parse_https_url, "https://u:hunter2@example.com:99999"),
        (parse_list_url, "https://u:hunter2@/x"),
        (parse_list_url, "ftp://u:hunter2@h.example/x"),
    ],
)
def test_url_errors_never_show_passwords(parser: Any, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parser(text)
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# IP-list sources (TypeBlocklistURI) and doppelganger URLs (TypeHttpsURL)


@pytest.fixture
def list_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "list.netset").write_text("10.0.0.0/8\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.netset").write_text("192.0.2.1\n")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # mtg's type_blocklist_uri_test.go
        ("http://lalala", "http://lalala"),
        ("https://lalala", "https://lalala"),
        ("https://lalala/path", "https://lalala/path"),
        # more
        (FIREHOL, FIREHOL),
        ("HTTPS://example.com:8443/a?b=c", "https://example.com:8443/a?b=c"),
    ],
)
def test_parse_list_url_remote(text: str, value: str) -> None:
    assert parse_list_url(text) == value


def test_parse_list_url_files(list_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = str(list_dir / "list.netset")
    assert parse_list_url(absolute) == absolute
    assert parse_list_url(absolute, base_dir="/nonexistent") == absolute
    # relative paths: against base_dir, which load() sets to the config file's directory
    assert parse_list_url("list.netset", base_dir=str(list_dir)) == absolute
    assert parse_list_url("sub/other.netset", base_dir=str(list_dir)) == str(
        list_dir / "sub" / "other.netset"
    )
    assert parse_list_url("../list.netset", base_dir=str(list_dir / "sub")) == absolute
    # without base_dir: the working directory (mtg's behaviour)
    monkeypatch.chdir(list_dir / "sub")
    assert parse_list_url("other.netset") == str(list_dir / "sub" / "other.netset")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_blocklist_uri_test.go
        ("gopher://lalala", "unknown schema gopher"),
        ("https:///paths", "no host"),
        ("h:/=", "unknown schema h"),
        ("___", "neither an existing file nor an http"),
        ("sub/___", "neither an existing file nor an http"),
        ("sub", "directory"),
        (".", "directory"),
        # more
        ("", "neither an existing file nor an http"),
        ("list.netset\x00", "control character"),
        ("http://bad host/", "neither an IP address nor a valid host name"),
    ],
)
def test_parse_list_url_errors(list_dir: pathlib.Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_list_url(text, base_dir=str(list_dir))


def test_parse_list_url_rejects_special_files(list_dir: pathlib.Path) -> None:
    fifo = list_dir / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        parse_list_url(str(fifo))


def test_parse_list_url_rejects_unreadable_files(
    list_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = list_dir / "locked.netset"
    locked.write_text("")
    locked.chmod(0)
    if os.geteuid() == 0:  # root may read anything: pretend the permission check says no
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="not readable"):
        parse_list_url(str(locked))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # mtg's type_https_url_test.go
        ("https://example.com", "https://example.com"),
        ("https://example.com:8443", "https://example.com:8443"),
        ("https://example.com/path?q=1", "https://example.com/path?q=1"),
        ("https://user:pass@example.com", "https://user:pass@example.com"),
        ("HTTPS://example.com/", "https://example.com/"),
    ],
)
def test_parse_https_url_ok(text: str, value: str) -> None:
    assert parse_https_url(text) == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # mtg's type_https_url_test.go
        ("", "has to have a scheme and a host"),
        ("https://", "has to have a scheme and a host"),
        ("://lala", "missing protocol scheme"),
        ("/path", "has to have a scheme and a host"),
        ("http://example.com", "unsupported schema: http"),
        ("socks5://example.com", "unsupported schema: socks5"),
        # more
        ("https://example.com:0", "incorrect port"),
    ],
)
def test_parse_https_url_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_https_url(text)


# ---------------------------------------------------------------------------------------------
# IP echo services ([doctor] ip-echo-urls, ours)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("https://ifconfig.co", "https://ifconfig.co"),
        ("http://127.0.0.1:8080/ip", "http://127.0.0.1:8080/ip"),
        ("HTTP://[::1]/ip?format=text", "http://[::1]/ip?format=text"),
        ("https://u:pw@echo.example", "https://u:pw@echo.example"),
    ],
)
def test_parse_echo_url_ok(text: str, value: str) -> None:
    assert parse_echo_url(text) == value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", r"unsupported schema: \(none\): $"),
        ("ifconfig.co", r"unsupported schema: \(none\): ifconfig.co"),
        ("ftp://h.example", "unsupported schema: ftp: ftp://h.example"),
        ("https://", "url has to have a scheme and a host: https://"),
        ("https:ifconfig.co", "url has to have a scheme and a host"),
        ("https://h.example:0", "incorrect port number"),
        ("https://bad host/", "neither an IP address nor a valid host name"),
        ("https://[h.example]/", "incorrect IPv6 address in brackets"),
        ("https://u:hunter2@h.example:99999", "incorrect port number"),
    ],
)
def test_parse_echo_url_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        parse_echo_url(text)
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Fuzzing: hostile text raises ConfigError and nothing else


@pytest.mark.parametrize(
    "parser",
    [
        parse_dns,
        parse_proxy_url,
        parse_https_url,
        parse_echo_url,
        lambda text: parse_list_url(text, base_dir="/nonexistent-base-dir"),
    ],
)
@settings(max_examples=150, deadline=None)
@given(text=HOSTILE_TEXT)
def test_url_parsers_raise_only_config_error(parser: Any, text: str) -> None:
    raises_only_config_error(parser, text)


@settings(max_examples=300, deadline=None)
@given(text=HOSTILE_TEXT)
def test_dns_servers_are_complete(text: str) -> None:
    """Whatever parses is a server the resolver can use as it is."""
    try:
        server = parse_dns(text)
    except ConfigError:
        return
    assert server.scheme in DNS_DEFAULT_PORTS
    assert 1 <= server.port <= 65535
    assert server.host and "[" not in server.host
    assert server.path.startswith("/") if server.scheme == "https" else server.path == ""
    assert "#" not in server.path
    assert parse_dns(str(server)) == server
