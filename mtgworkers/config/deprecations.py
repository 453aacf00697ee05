"""Deprecated config keys: the one table of them, and the one function that words the warning.

mtg v2 still reads these keys and its doctor tells what replaces each. The table is used by
the loader (which ones a file sets, in :attr:`Config.deprecated
<mtgworkers.config.model.Config.deprecated>`), by ``run``'s start-up warning
(:func:`mtgworkers.cli.deprecation_message`), by the supervisor's warning after a reload
and by doctor's "Deprecated options" section
(:func:`mtgworkers.doctor.checks.deprecated_message`, which adds mtg's removal notice).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEPRECATED",
    "DEPRECATED_KEYS",
    "REMOVED_IN",
    "DeprecatedKey",
    "deprecation_message",
    "find_deprecated",
]


@dataclass(frozen=True)
class DeprecatedKey:
    """One deprecated key and what to use instead, in mtg doctor's words."""

    key: str  # the full dotted key, spelled as in mtg: "network.doh-ip"
    replacement: str  # e.g. '"dns" in [network] section'

    @property
    def name(self) -> str:
        """The last component of the key: ``"doh-ip"``."""
        return self.key.rpartition(".")[2]

    @property
    def table(self) -> str | None:
        """The table the key is in (``"network"``), None at the top level."""
        return self.key.rpartition(".")[0] or None


# In the order mtg's doctor reports them (Config.deprecated keeps this order too).
DEPRECATED = (
    DeprecatedKey("domain-fronting-ip", '"ip" in [domain-fronting] section'),
    DeprecatedKey("domain-fronting-port", '"port" in [domain-fronting] section'),
    DeprecatedKey(
        "domain-fronting-proxy-protocol", '"proxy-protocol" in [domain-fronting] section'
    ),
    DeprecatedKey("network.doh-ip", '"dns" in [network] section'),
)
DEPRECATED_KEYS = tuple(entry.key for entry in DEPRECATED)

# The release in which, as mtg's doctor announces, the deprecated keys go away.
REMOVED_IN = "v2.3.0"


def find_deprecated(key: str) -> DeprecatedKey | None:
    """The table entry of ``key``, a full dotted key or its last component (``"doh-ip"``)."""
    for entry in DEPRECATED:
        if key in (entry.key, entry.name):
            return entry
    return None


def deprecation_message(key: str, *, removed_in: str | None = None) -> str:
    """The warning for a deprecated key, in mtg's words.

    ``'Option "doh-ip" from section [network] is deprecated. Please use "dns" in [network]
    section instead.'``; with ``removed_in`` (doctor) ``is deprecated and will be removed in
    v2.3.0.`` A key missing from the table gives ``'Option "<key>" is deprecated.'``.
    """
    removal = f" and will be removed in {removed_in}" if removed_in else ""
    entry = find_deprecated(key)
    if entry is None:
        return f'Option "{key}" is deprecated{removal}.'
    section = f" from section [{entry.table}]" if entry.table else ""
    return (
        f'Option "{entry.name}"{section} is deprecated{removal}. '
        f"Please use {entry.replacement} instead."
    )
