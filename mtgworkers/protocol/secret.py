"""The proxy secret: ``0xee || 16-byte key || hostname`` (docs/protocol.md §1).

Only FakeTLS (``ee``) secrets exist in mtg v2; legacy plain 16-byte secrets and ``dd``
("secure") secrets are rejected with a message that says so. Text forms are hex (tried first)
and unpadded URL-safe base64, decoded with Go's rules rather than Python's lenient ones.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field

from mtgworkers.protocol.errors import ProtocolError

__all__ = ["FAKETLS_MARKER", "KEY_LEN", "Secret", "SecretError"]

FAKETLS_MARKER = 0xEE
KEY_LEN = 16

_LEGACY_DD_MARKER = 0xDD
_ONLY_EE = "only FakeTLS 'ee' secrets"

# Go's hex.DecodeString: even length, hex digits only. bytes.fromhex alone would also take spaces.
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class SecretError(ProtocolError):
    """A secret string that mtg would not accept."""


@dataclass(frozen=True)
class Secret:
    """An ``ee`` secret: the 16-byte key used in every HMAC/SHA-256 and the fronting host.

    ``host`` holds the raw hostname bytes as text (UTF-8, undecodable bytes kept as surrogate
    escapes), so :attr:`host_bytes` always gives back exactly the bytes that were parsed. The
    key is left out of ``repr`` so a secret can never leak through a log line.
    """

    key: bytes = field(repr=False)
    host: str

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LEN:
            raise SecretError(f"secret key must be {KEY_LEN} bytes")
        try:
            self.host_bytes  # noqa: B018 - a host that has no byte form cannot be compared to SNI
        except UnicodeEncodeError:
            raise SecretError("hostname cannot be encoded to bytes") from None

    @classmethod
    def parse(cls, text: str) -> Secret:
        """Parse a secret in hex or raw-URL base64 form, exactly as mtg does.

        Hex is tried first (so an even-length string of hex digits is always hex), then base64
        without padding. Raises :class:`SecretError` with mtg's message on any problem.
        """
        if text == "":
            raise SecretError("secret is empty")
        hex_form = _HEX_RE.fullmatch(text)
        decoded = bytes.fromhex(text) if hex_form else _decode_raw_url_base64(text)

        if len(decoded) < 2:
            raise SecretError(f"secret is truncated, length={len(decoded)}")
        if decoded[0] != FAKETLS_MARKER:
            raise SecretError(
                f"incorrect first byte of secret: {decoded[0]:#x} ({_why_not(decoded)})"
            )
        if len(decoded) - 1 < KEY_LEN:
            hint = f" ({_why_not(decoded)})" if len(decoded) == KEY_LEN else ""
            raise SecretError(f"secret has incorrect length {len(decoded) - 1}{hint}")
        host = decoded[1 + KEY_LEN :]
        if not host:
            raise SecretError(
                "hostname cannot be empty (the secret must end with the fronting host name)"
            )
        return cls(decoded[1 : 1 + KEY_LEN], host.decode("utf-8", "surrogateescape"))

    @classmethod
    def generate(cls, host: str) -> Secret:
        """Make a new secret for ``host`` with a key from the OS CSPRNG (host not validated)."""
        return cls(os.urandom(KEY_LEN), host)

    @property
    def host_bytes(self) -> bytes:
        """The hostname as raw bytes, as compared with the ClientHello SNI."""
        return self.host.encode("utf-8", "surrogateescape")

    def to_bytes(self) -> bytes:
        """Binary form: ``0xee || key || host``."""
        return bytes((FAKETLS_MARKER,)) + self.key + self.host_bytes

    def hex(self) -> str:
        """Lower-case hex of :meth:`to_bytes`."""
        return self.to_bytes().hex()

    def base64(self) -> str:
        """Raw-URL base64 (no ``=`` padding) of :meth:`to_bytes`; mtg's default form."""
        return base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode("ascii")

    def is_valid(self) -> bool:
        """True when the key is not all zeros and the host is not empty (mtg ``Valid()``)."""
        return any(self.key) and self.host != ""


def _why_not(decoded: bytes) -> str:
    """Explain a rejected first byte / length in words a user of an old proxy understands."""
    if decoded[0] == _LEGACY_DD_MARKER:
        return f"legacy 'dd' secrets are not supported: {_ONLY_EE}"
    if len(decoded) == KEY_LEN:
        return f"legacy 16-byte secrets are not supported: {_ONLY_EE}"
    return f"{_ONLY_EE} are supported"


def _decode_raw_url_base64(text: str) -> bytes:
    """Decode like Go's ``base64.RawURLEncoding.DecodeString``.

    Go works on the UTF-8 bytes, skips ``\\r``/``\\n``, refuses ``=``, ``+`` and ``/`` and a
    lone trailing character, and ignores non-zero unused bits. Python's urlsafe_b64decode
    differs in all of these, so the input is checked first and only then handed over.
    """
    raw = text.encode("utf-8", "surrogatepass")
    clean = bytearray()
    for offset, char in enumerate(raw):
        if char in _B64_ALPHABET:
            clean.append(char)
        elif char not in b"\r\n":
            raise _b64_error(offset)
    if len(clean) % 4 == 1:
        # Go reports the position of the character that cannot form a byte on its own.
        raise _b64_error(len(raw) - 1)
    clean += b"=" * (-len(clean) % 4)
    try:
        return base64.urlsafe_b64decode(bytes(clean))
    except binascii.Error as exc:  # pragma: no cover - excluded by the checks above
        raise SecretError(f"incorrect secret format: {exc}") from None


def _b64_error(offset: int) -> SecretError:
    return SecretError(f"incorrect secret format: illegal base64 data at input byte {offset}")
