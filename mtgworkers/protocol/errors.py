"""The one exception type every protocol parser raises."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Malformed or unacceptable bytes from a peer (or a malformed secret)."""
