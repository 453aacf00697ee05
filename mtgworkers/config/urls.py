"""URL values: the DNS server (``network.dns``), SOCKS5 proxies, doppelganger, IP-list and IP
echo URLs, and the redaction of passwords in URLs.

A small subset of Go's ``url.Parse`` (:func:`_split_url`) tells the forms mtg accepts apart;
each kind has one parser on top of it, raising :class:`~mtgworkers.config.errors.ConfigError`
with the reason (passwords replaced by ``REDACTED`` in every message):

- :func:`parse_dns` -> :class:`DnsServer`: scheme, host, port and DoH path, defaults filled
  in, so :func:`mtgworkers.net.dns.make_resolver` uses it without parsing again;
- :func:`parse_proxy_url` -> :class:`ProxyURL`: ``socks5[h]://[user[:password]@]host[:port]``;
- :func:`parse_https_url` (doppelganger), :func:`parse_list_url` (IP lists: a file or an
  http(s) URL), :func:`parse_echo_url` (``[doctor] ip-echo-urls``): normalised text.
"""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

from mtgworkers.config.addresses import _host_or_ip, _ip_or_none, _port_from_text
from mtgworkers.config.errors import REDACTED, ConfigError
from mtgworkers.netaddr import bracket_host, join_host_port

__all__ = [
    "DNS_DEFAULT_PORTS",
    "DOH_DEFAULT_PATH",
    "DnsServer",
    "ProxyURL",
    "parse_dns",
    "parse_echo_url",
    "parse_https_url",
    "parse_list_url",
    "parse_proxy_url",
]

DnsScheme = Literal["udp", "tls", "https"]

# Ports and the DoH path used when network.dns does not name them.
DNS_DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"udp": 53, "tls": 853, "https": 443})
DOH_DEFAULT_PATH = "/dns-query"


@dataclass(frozen=True)
class DnsServer:
    """``network.dns``: the server that resolves names, and how to speak to it.

    ``scheme`` is ``udp`` (plain DNS, ``host`` an IP literal), ``tls`` (DNS-over-TLS) or
    ``https`` (DNS-over-HTTPS); ``host`` is a canonical IP literal (no brackets) or a host
    name (lower-cased); ``port`` and, for DoH, ``path`` (with the query, if any) have their
    defaults filled in (53, 853, 443; ``/dns-query``). ``text`` is the value as configured
    (scheme lower-cased, a bare IP written as ``udp://IP``): ``str()`` and the JSON dump
    show it.
    """

    scheme: DnsScheme
    host: str
    port: int
    path: str = ""  # DoH only: the request target, e.g. "/dns-query" or "/q?ct=1"
    text: str = ""

    def __str__(self) -> str:
        if self.text:
            return self.text
        return f"{self.scheme}://{join_host_port(self.host, self.port)}{self.path}"


@dataclass(frozen=True)
class ProxyURL:
    """One SOCKS5 upstream proxy. ``str()`` and ``repr()`` never show the password."""

    scheme: str  # "socks5" or "socks5h" (both behave the same)
    host: str  # IP literal (normalised) or host name
    port: int = 1080
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        userinfo = ""
        if self.username is not None:
            userinfo = self.username
            if self.password is not None:
                userinfo += ":" + REDACTED
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{join_host_port(self.host, self.port)}"


@dataclass(frozen=True)
class _URL:
    scheme: str  # lower-case, "" when absent
    authority: str | None  # None when there is no "//"
    username: str | None
    password: str | None
    host: str  # as written, brackets included for IPv6
    port: str | None  # None when absent (":" with nothing after it gives "")
    path: str
    rest: str  # query and fragment, with their "?" / "#"
    text: str  # the input with the scheme lower-cased

    @property
    def hostname(self) -> str:
        if self.host.startswith("[") and self.host.endswith("]"):
            return self.host[1:-1]
        return self.host


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_USERINFO_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*")


def _redact_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:REDACTED@host`` (for messages)."""
    start = text.find("://")
    if start < 0:
        return text
    start += 3
    ends = (text.find(separator, start) for separator in "/?#")
    end = min((i for i in ends if i >= 0), default=len(text))
    at = text.rfind("@", start, end)
    colon = text.find(":", start, at) if at >= 0 else -1
    if colon < 0:
        return text
    return text[: colon + 1] + REDACTED + text[at:]


def _split_url(text: str, context: str) -> _URL:
    # A small subset of Go's url.Parse: enough to tell the forms mtg accepts apart.
    # `context` is the text to quote in error messages (password redacted).
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ConfigError("invalid control character in URL")
    scheme = ""
    rest = text
    match = _SCHEME_RE.match(text)
    if match:
        scheme = match.group(1).lower()
        rest = text[match.end() :]
    elif text.startswith(":"):
        raise ConfigError(f"missing protocol scheme: {context}")
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    before_query, tail = rest[:query_at], rest[query_at:]
    authority: str | None = None
    path = before_query
    if before_query.startswith("//"):
        slash = before_query.find("/", 2)
        slash = len(before_query) if slash < 0 else slash
        authority, path = before_query[2:slash], before_query[slash:]
    username = password = None
    host, port = "", None
    if authority is not None:
        hostport = authority
        at = authority.rfind("@")
        if at >= 0:
            userinfo, hostport = authority[:at], authority[at + 1 :]
            if not _USERINFO_RE.fullmatch(userinfo):
                raise ConfigError(f"invalid userinfo in URL: {context}")
            name, colon, secret = userinfo.partition(":")
            username = _unquote(name)
            password = _unquote(secret) if colon else None
        host, port = _split_url_host(hostport, context)
    return _URL(
        scheme=scheme,
        authority=authority,
        username=username,
        password=password,
        host=host,
        port=port,
        path=path,
        rest=tail,
        text=scheme + text[len(scheme) :] if scheme else text,
    )


def _split_url_host(hostport: str, context: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ConfigError(f"missing ']' in host: {context}")
        host, after = hostport[: close + 1], hostport[close + 1 :]
        if after and not after.startswith(":"):
            raise ConfigError(f"invalid port {after!r} after host: {context}")
        return host, after[1:] if after else None
    host, colon, port = hostport.rpartition(":")
    if not colon:
        return hostport, None
    return host, port


def _unquote(text: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError("invalid percent-encoding in userinfo (not UTF-8)") from None


def _url_host(url: _URL, context: str) -> str:
    """Validated host of a URL: canonical IP (IPv6 only in brackets) or a host name."""
    if url.host.startswith("["):
        address = _ip_or_none(url.hostname)
        if address is None or ":" not in url.hostname:
            raise ConfigError(f"incorrect IPv6 address in brackets: {context}")
        return address
    return _host_or_ip(url.host, context)


def _url_port(url: _URL, default: int | None, context: str) -> int | None:
    if url.port is None:
        return default
    return _port_from_text(url.port, context)


def parse_dns(text: str) -> DnsServer:
    """Parse ``network.dns`` into a :class:`DnsServer`.

    Forms: ``https://host[:port][/path]`` (DoH), ``tls://host[:port]`` (DoT),
    ``udp://IP[:port]`` or a bare IP (plain DNS; its text becomes ``udp://IP``). No user
    info; a path only for DoH (a query is kept in the DoH path, a fragment is dropped).
    Raises ConfigError.
    """
    bracketed = text.startswith("[") and text.endswith("]")
    bare = _ip_or_none(text[1:-1] if bracketed else text)
    if bare is not None and (":" in bare or not bracketed):
        return DnsServer("udp", bare, DNS_DEFAULT_PORTS["udp"], text="udp://" + bracket_host(bare))
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.authority is None or not url.host:
        raise ConfigError(
            f"unsupported DNS address {shown}: expected https://, tls://, udp:// or IP"
        )
    if url.scheme not in DNS_DEFAULT_PORTS:
        raise ConfigError(f"unsupported DNS type {url.scheme or '(none)'}: {shown}")
    if url.username is not None:
        raise ConfigError(f"user info is not supported: {shown}")
    if url.scheme != "https" and url.path:
        raise ConfigError(f"path is supported only for DoH: {shown}")
    host = _url_host(url, shown)
    scheme = cast(DnsScheme, url.scheme)  # one of the three, checked above
    port = _url_port(url, DNS_DEFAULT_PORTS[scheme], shown)
    assert port is not None
    is_ip = _ip_or_none(host) is not None
    if scheme == "udp" and not is_ip:
        raise ConfigError(f"simple DNS must be an IP address: {url.host}")
    path = ""
    if scheme == "https":
        query = url.rest[1:].partition("#")[0] if url.rest.startswith("?") else ""
        path = (url.path or DOH_DEFAULT_PATH) + (f"?{query}" if query else "")
    return DnsServer(scheme, host if is_ip else host.lower(), port, path, url.text)


def parse_proxy_url(text: str) -> ProxyURL:
    """Parse a SOCKS5 proxy URL ``socks5[h]://[user[:password]@]host[:port]`` (port 1080).

    Path, query and fragment are accepted and ignored (mtg: circuit-breaker parameters of an
    old release). Raises ConfigError.
    """
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.authority is None or not url.host:
        raise ConfigError(f"url has to have a scheme and a host: {shown}")
    if url.scheme not in ("socks5", "socks5h"):
        raise ConfigError(f"unsupported schema: {url.scheme}")
    host = _url_host(url, shown)
    port = _url_port(url, 1080, shown)
    assert port is not None
    return ProxyURL(url.scheme, host, port, url.username, url.password)


def parse_https_url(text: str) -> str:
    """Parse a doppelganger URL: ``https://`` with a host. Returns it scheme-normalised."""
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.authority is None or not url.host:
        raise ConfigError(f"url has to have a scheme and a host: {shown}")
    if url.scheme != "https":
        raise ConfigError(f"unsupported schema: {url.scheme}")
    _url_host(url, shown)
    _url_port(url, None, shown)
    return url.text


def parse_list_url(text: str, base_dir: str | None = None) -> str:
    """Parse an IP-list source: an existing readable regular file or an http(s) URL with host.

    A relative path is resolved against ``base_dir`` (default: the working directory) and
    returned absolute. URLs are returned scheme-normalised. Raises ConfigError.
    """
    path = os.path.join(base_dir, text) if base_dir and text else text
    try:
        info = os.stat(path) if text else None
    except (OSError, ValueError):  # ValueError: embedded NUL
        info = None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"value is a path to a directory: {path}")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"value is a path but not a regular file: {path}")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"value is a path to a file that is not readable: {path}")
        return os.path.abspath(path)
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.scheme not in ("http", "https"):
        raise ConfigError(
            f"neither an existing file nor an http(s) URL: {shown}"
            + (f" (unknown schema {url.scheme})" if url.scheme else "")
        )
    if url.authority is None or not url.host:
        raise ConfigError(f"incorrect url {shown}: no host")
    _url_host(url, shown)
    _url_port(url, None, shown)
    return url.text


def parse_echo_url(text: str) -> str:
    """Parse an IP echo service URL (``[doctor] ip-echo-urls``): http(s) with a host."""
    shown = _redact_url(text)
    url = _split_url(text, shown)
    if url.scheme not in ("http", "https"):
        raise ConfigError(f"unsupported schema: {url.scheme or '(none)'}: {shown}")
    if url.authority is None or not url.host:
        raise ConfigError(f"url has to have a scheme and a host: {shown}")
    _url_host(url, shown)
    _url_port(url, None, shown)
    return url.text
