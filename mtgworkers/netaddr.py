"""Writing addresses as text: the one ``host:port`` formatter of the proxy.

An IPv6 literal is written in brackets (``[2001:db8::1]:443``), as in URLs, Go's
``net.JoinHostPort`` and everything mtg prints; IPv4 literals and host names are written as
they are (``192.0.2.1:443``, ``dc.example:443``). No imports, so every module can use it.
"""

from __future__ import annotations

__all__ = ["bracket_host", "join_host_port"]


def bracket_host(host: str) -> str:
    """``"2001:db8::1"`` -> ``"[2001:db8::1]"``; IPv4 literals and host names unchanged.

    For URLs and HTTP ``Host`` headers. ``host`` is an address without brackets.
    """
    return f"[{host}]" if ":" in host else host


def join_host_port(host: str, port: int) -> str:
    """``("2001:db8::1", 443)`` -> ``"[2001:db8::1]:443"``, ``("192.0.2.1", 443)`` ->
    ``"192.0.2.1:443"``. ``host`` is an IP literal or a host name, without brackets."""
    return f"{bracket_host(host)}:{port}"
