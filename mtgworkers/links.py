"""Proxy links (``tg://proxy?...``, ``https://t.me/proxy?...``): one builder for ``access``
and for the start-up log line.

The secret is the proxy's password, so what goes to a log carries ``REDACTED`` in its
place; only ``mtgworkers access CONFIG`` prints full links, on the operator's terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote_plus

from mtgworkers.config import REDACTED

if TYPE_CHECKING:
    from mtgworkers.config import Config

WILDCARDS = ("0.0.0.0", "::")


def form_encode(values: Mapping[str, str]) -> str:
    """Go's ``url.Values.Encode()``: keys sorted, ``QueryEscape`` on keys and values."""
    return "&".join(
        f"{quote_plus(key, safe='')}={quote_plus(values[key], safe='')}" for key in sorted(values)
    )


def link_query(server: str, port: int, secret_text: str) -> str:
    """The query string shared by the tg:// and t.me links."""
    return form_encode({"server": server, "port": str(port), "secret": secret_text})


def tg_url(server: str, port: int, secret_text: str) -> str:
    return f"tg://proxy?{link_query(server, port, secret_text)}"


def tme_url(server: str, port: int, secret_text: str) -> str:
    return f"https://t.me/proxy?{link_query(server, port, secret_text)}"


def known_servers(config: Config) -> list[str]:
    """The proxy's addresses known without asking the network: public-ipv4/6, else a
    bind-to address that is not a wildcard."""
    servers = [ip for ip in (config.public_ipv4, config.public_ipv6) if ip]
    if not servers and config.bind_to.host not in WILDCARDS:
        servers = [config.bind_to.host]
    return servers


def redacted_links(config: Config) -> list[str]:
    """tg:// links of :func:`known_servers` with the secret replaced by ``REDACTED``."""
    return [tg_url(server, config.bind_to.port, REDACTED) for server in known_servers(config)]


def access_hint(config_path: str | None) -> str:
    """Where the operator finds the full links (the log line never has them)."""
    if config_path is None:
        return "the link's secret is the one given on the command line"
    return f"run 'mtgworkers access {config_path}' for links with the secret"
