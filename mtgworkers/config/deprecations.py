"""Deprecated config keys: mtg v2 still reads them and its doctor says what replaces each.

:data:`DEPRECATED_KEYS` lists them as full dotted keys, spelled as in mtg, in the order mtg's
doctor reports them; :attr:`Config.deprecated <mtgworkers.config.model.Config.deprecated>`
holds the ones a file sets.
"""

from __future__ import annotations

__all__ = ["DEPRECATED_KEYS"]

# Deprecated keys (mtg spelling, full dotted key), in the order mtg's doctor reports them.
DEPRECATED_KEYS = (
    "domain-fronting-ip",
    "domain-fronting-port",
    "domain-fronting-proxy-protocol",
    "network.doh-ip",
)
