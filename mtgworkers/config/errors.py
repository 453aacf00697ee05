"""What every part of the configuration shares: :class:`ConfigError` and ``REDACTED``.

The value parsers raise ``ConfigError`` with the reason only; the TOML walker
(:mod:`mtgworkers.config.loader`) prefixes the dotted key. ``REDACTED`` replaces secrets and
passwords wherever a value is shown (messages, ``str()``, ``Config.to_json_dict()``).
"""

from __future__ import annotations

__all__ = ["REDACTED", "ConfigError"]

REDACTED = "REDACTED"


class ConfigError(Exception):
    """An invalid configuration. ``str(e)`` names the dotted key and the reason."""
