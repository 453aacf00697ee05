"""SOCKS5 client side (RFC 1928 CONNECT, RFC 1929 username/password), without I/O.

The exchange as mtg does it (docs/protocol.md §11.1):

    client -> server   05 n methods          greeting: 00 (no auth), plus 02 with credentials
    server -> client   05 method             method choice
    [client -> server  01 ulen user plen pw  only if the server chose 02
     server -> client  01 status]            00 = authenticated
    client -> server   05 01 00 atyp addr port    CONNECT
    server -> client   05 rep 00 atyp addr port   reply; rep 00 = succeeded

Builders return bytes; parsers take the bytes received so far (from the start of
the message), return ``None`` while the message is incomplete and raise
:class:`Socks5Error` when it is malformed or a refusal.  :class:`ClientHandshake`
strings the steps together and tells the caller exactly how many bytes to read
next, so that a caller reading from a socket never swallows bytes that follow
the final reply.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from mtgworkers.protocol.errors import ProtocolError

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_CONNECT",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "METHOD_USERPASS",
    "REPLY_SUCCEEDED",
    "ClientHandshake",
    "Reply",
    "Socks5Error",
    "build_auth_request",
    "build_connect_request",
    "build_greeting",
    "parse_auth_reply",
    "parse_method_choice",
    "parse_reply",
    "reply_text",
]

Buffer = bytes | bytearray | memoryview

VERSION = 0x05
AUTH_VERSION = 0x01  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REPLY_SUCCEEDED = 0x00

METHOD_CHOICE_LEN = 2
AUTH_REPLY_LEN = 2
# ver rep rsv atyp + the first address byte (the domain length for ATYP 03).
# Every well-formed reply is at least this long, so reading it never over-reads.
_REPLY_PREFIX_LEN = 5

_REPLY_TEXTS = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

_METHOD_NAMES = {
    METHOD_NO_AUTH: "no authentication",
    METHOD_USERPASS: "username/password",
}


class Socks5Error(ProtocolError):
    """A malformed SOCKS5 message, or the server refused us.

    ``reply`` holds the CONNECT reply code when the server answered with one
    other than ``00``; it is ``None`` for every other failure.
    """

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Reply:
    """A successful CONNECT reply: the address the server bound for us."""

    bound_host: str  # IP text for ATYP 01/04, the name for ATYP 03
    bound_port: int
    atyp: int


def reply_text(code: int) -> str:
    """Readable meaning of a CONNECT reply code (RFC 1928 §6); unknown codes included."""
    text = _REPLY_TEXTS.get(code)
    if text is None:
        return f"unknown reply code 0x{code:02x}"
    return text


# ---------------------------------------------------------------------------
# Builders


def build_greeting(with_auth: bool) -> bytes:
    """Method-selection message: offers 00, and 02 as well when ``with_auth``."""
    if with_auth:
        return bytes((VERSION, 2, METHOD_NO_AUTH, METHOD_USERPASS))
    return bytes((VERSION, 1, METHOD_NO_AUTH))


def build_auth_request(username: str | bytes, password: str | bytes | None) -> bytes:
    """RFC 1929 username/password request; a missing password is sent empty.

    Raises Socks5Error when the username is empty or either field is longer
    than 255 bytes (UTF-8) -- the format has one length byte per field.
    """
    user = username.encode() if isinstance(username, str) else bytes(username)
    if password is None:
        pw = b""
    else:
        pw = password.encode() if isinstance(password, str) else bytes(password)
    if not 1 <= len(user) <= 255:
        raise Socks5Error(
            f"invalid SOCKS5 username: must be 1..255 bytes long, got {len(user)} bytes"
        )
    if len(pw) > 255:
        raise Socks5Error(f"invalid SOCKS5 password: must be at most 255 bytes, got {len(pw)}")
    return bytes((AUTH_VERSION, len(user))) + user + bytes((len(pw),)) + pw


def build_connect_request(host: str, port: int) -> bytes:
    """CONNECT request for ``host:port``.

    IP literals (an IPv6 one optionally in brackets) go out as ATYP 01/04, any
    other host as a domain name (ATYP 03, IDNA-encoded when not ASCII).
    Raises Socks5Error for a port outside 0..65535 or a name that cannot be
    encoded in 1..255 bytes.
    """
    if not 0 <= port <= 0xFFFF:
        raise Socks5Error(f"invalid port for SOCKS5 CONNECT: {port}")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        ip = None
    head = bytes((VERSION, CMD_CONNECT, 0x00))
    tail = port.to_bytes(2, "big")
    if isinstance(ip, ipaddress.IPv4Address):
        return head + bytes((ATYP_IPV4,)) + ip.packed + tail
    if isinstance(ip, ipaddress.IPv6Address):
        # A scope id ("%eth0") has no meaning to the SOCKS server; only the address goes.
        return head + bytes((ATYP_IPV6,)) + ip.packed + tail
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = host.encode("idna")
        except UnicodeError as exc:
            raise Socks5Error(f"cannot encode host name {host!r} for SOCKS5: {exc}") from None
    if not 1 <= len(name) <= 255:
        raise Socks5Error(f"host name for SOCKS5 must be 1..255 bytes long, got {len(name)} bytes")
    return head + bytes((ATYP_DOMAIN, len(name))) + name + tail


# ---------------------------------------------------------------------------
# Parsers


def _check_version(got: int, what: str) -> None:
    if got != VERSION:
        raise Socks5Error(f"unexpected SOCKS version 0x{got:02x} in {what} (want 0x05)")


def parse_method_choice(buf: Buffer, offered: Collection[int]) -> int | None:
    """Parse the server's method choice (always 2 bytes).

    ``offered`` are the methods our greeting listed. Returns the chosen method,
    or None while fewer than 2 bytes are available. Raises Socks5Error on a
    wrong version, on FF ("no acceptable methods") and on a method we did not offer.
    """
    if len(buf) < METHOD_CHOICE_LEN:
        return None
    _check_version(buf[0], "method choice")
    method = buf[1]
    if method == METHOD_NO_ACCEPTABLE:
        names = ", ".join(_METHOD_NAMES.get(m, f"0x{m:02x}") for m in offered)
        raise Socks5Error(
            f"SOCKS5 server accepts none of our authentication methods (offered: {names})"
        )
    if method not in offered:
        raise Socks5Error(f"SOCKS5 server chose authentication method 0x{method:02x}, not offered")
    return method


def parse_auth_reply(buf: Buffer) -> bool | None:
    """Parse the RFC 1929 status reply (always 2 bytes).

    Returns True when authenticated, None while incomplete. Raises Socks5Error
    on a wrong sub-negotiation version or a non-zero status (bad credentials).
    """
    if len(buf) < AUTH_REPLY_LEN:
        return None
    if buf[0] != AUTH_VERSION:
        raise Socks5Error(
            f"unexpected version 0x{buf[0]:02x} in SOCKS5 username/password reply (want 0x01)"
        )
    if buf[1] != 0x00:
        raise Socks5Error(f"SOCKS5 username/password authentication failed (status 0x{buf[1]:02x})")
    return True


def _check_atyp(atyp: int) -> None:
    if atyp not in (ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN):
        raise Socks5Error(f"unknown address type 0x{atyp:02x} in SOCKS5 reply")


def _reply_length(buf: Buffer) -> int:
    """Total length of the CONNECT reply whose first 5 bytes are in ``buf``."""
    atyp = buf[3]
    _check_atyp(atyp)
    if atyp == ATYP_IPV4:
        return 4 + 4 + 2
    if atyp == ATYP_IPV6:
        return 4 + 16 + 2
    return 4 + 1 + buf[4] + 2


def parse_reply(buf: Buffer) -> tuple[Reply, int] | None:
    """Parse the CONNECT reply from the start of ``buf``.

    Returns ``(reply, consumed)`` once the whole reply (with the bound address
    of any type) is there, None while incomplete. A refusal is raised as soon
    as its code is known (2 bytes), since some servers close without sending the
    rest: Socks5Error with ``reply`` set and the code's meaning in the text.
    Also raises Socks5Error on a wrong version or an unknown address type.
    """
    if len(buf) < 2:
        return None
    _check_version(buf[0], "CONNECT reply")
    code = buf[1]
    if code != REPLY_SUCCEEDED:
        raise Socks5Error(
            f"SOCKS5 server refused CONNECT: {reply_text(code)} (reply 0x{code:02x})", reply=code
        )
    # The reserved byte (buf[2]) is ignored on purpose, as common clients do.
    if len(buf) >= 4:
        _check_atyp(buf[3])
    if len(buf) < _REPLY_PREFIX_LEN:
        return None
    total = _reply_length(buf)
    if len(buf) < total:
        return None
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(bytes(buf[4:8])))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(bytes(buf[4:20])))
    else:
        host = bytes(buf[5 : total - 2]).decode("ascii", "backslashreplace")
    port = int.from_bytes(buf[total - 2 : total], "big")
    return Reply(bound_host=host, bound_port=port, atyp=atyp), total


# ---------------------------------------------------------------------------
# The whole client exchange as a state machine


class ClientHandshake:
    """Client side of one SOCKS5 CONNECT exchange, with no I/O.

    Usage: send :meth:`start`; then, until :attr:`done`, read at most
    :attr:`bytes_needed` bytes, :meth:`feed` them and send whatever it returns.
    Reading no more than ``bytes_needed`` guarantees that no byte after the
    final reply is consumed. Any protocol failure raises Socks5Error.
    """

    _GREETING = "greeting"
    _METHOD = "method"
    _AUTH = "auth"
    _REPLY = "reply"
    _DONE = "done"

    def __init__(
        self, host: str, port: int, username: str | None = None, password: str | None = None
    ) -> None:
        """Prepare a CONNECT to ``host:port``; credentials (username set) enable RFC 1929.

        Raises Socks5Error at once when the target or the credentials cannot be encoded.
        """
        self._connect = build_connect_request(host, port)
        self._auth = None if username is None else build_auth_request(username, password)
        self._offered = (
            (METHOD_NO_AUTH,) if self._auth is None else (METHOD_NO_AUTH, METHOD_USERPASS)
        )
        self._state = self._GREETING
        self._buf = bytearray()
        self.reply: Reply | None = None

    @property
    def done(self) -> bool:
        """True once the server's successful CONNECT reply has been parsed."""
        return self._state == self._DONE

    @property
    def bytes_needed(self) -> int:
        """How many more bytes the current server message has at least (0 when done)."""
        have = len(self._buf)
        if self._state == self._METHOD:
            return METHOD_CHOICE_LEN - have
        if self._state == self._AUTH:
            return AUTH_REPLY_LEN - have
        if self._state == self._REPLY:
            if have < _REPLY_PREFIX_LEN:
                return _REPLY_PREFIX_LEN - have
            return _reply_length(self._buf) - have
        return 0

    def start(self) -> bytes:
        """The greeting to send first."""
        if self._state != self._GREETING:
            raise Socks5Error("SOCKS5 handshake already started")
        self._state = self._METHOD
        return build_greeting(self._auth is not None)

    def feed(self, data: Buffer) -> bytes:
        """Take bytes from the server; return bytes to send next (possibly empty).

        Raises Socks5Error on a malformed message, a refusal, or bytes that
        arrive after the final reply (which this object must never be given).
        """
        if self._state in (self._GREETING, self._DONE):
            raise Socks5Error(f"unexpected {len(data)} bytes from the SOCKS5 server")
        self._buf += data
        out = bytearray()
        while self._buf and self._state != self._DONE:
            step = self._step()
            if step is None:
                break
            out += step
        if self._state == self._DONE and self._buf:
            raise Socks5Error(f"{len(self._buf)} unexpected bytes after the SOCKS5 reply")
        return bytes(out)

    def _step(self) -> bytes | None:
        """Advance by one server message; None when it is incomplete."""
        if self._state == self._METHOD:
            method = parse_method_choice(self._buf, self._offered)
            if method is None:
                return None
            del self._buf[:METHOD_CHOICE_LEN]
            if method == METHOD_USERPASS and self._auth is not None:
                self._state = self._AUTH
                return self._auth
            self._state = self._REPLY
            return self._connect
        if self._state == self._AUTH:
            if parse_auth_reply(self._buf) is None:
                return None
            del self._buf[:AUTH_REPLY_LEN]
            self._state = self._REPLY
            return self._connect
        parsed = parse_reply(self._buf)
        if parsed is None:
            return None
        self.reply, consumed = parsed
        del self._buf[:consumed]
        self._state = self._DONE
        return b""
