"""The proxy side of a client handshake as a state machine over bytes (no I/O).

One :class:`ServerHandshake` per accepted connection takes what the client sends, from
its first byte until the obfuscated2 frame, and says what to do next. It reads the
optional PROXY protocol header, the FakeTLS ClientHello (all of its records, up to the
size limit), checks the hello against the secret and the clock, asks the replay filter,
builds the ServerHello and reads the obfuscated2 frame inside TLS records. It keeps no
socket, timer or clock: time comes in as ``now``, the replay filter and the randomness
as callables, so a test can drive it with bytes alone.

Use (h11's shape)::

    machine = ServerHandshake(secret, peer, ...)
    machine.receive(data)              # any number of bytes, split anywhere
    while (action := machine.next_action(now)) is not NEED_DATA:
        ...                            # carry it out; see the action classes

What comes out, in order:

- :class:`ClientKnown` once the client address is decided (after the PROXY header when
  the listener expects one, at once otherwise): the caller admits the client (IP lists,
  concurrency) and either goes on calling :meth:`ServerHandshake.next_action` or closes.
- :class:`Reply`: bytes to send (the ServerHello answer).
- :class:`Front`: the client is not ours (bad hello, replay): relay ``data``, every byte
  read after the PROXY header, to the fronting host. Terminal.
- :class:`Dial`: the obfuscated2 frame is valid: connect to DC ``dc``. Terminal.
- :class:`Close`: end the connection, for ``reason``. Terminal.

After a terminal action the machine only answers :data:`NEED_DATA`; bytes that arrive
later are the caller's to handle (for example, to forward to the fronting host).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from mtgworkers.protocol import faketls, obfs2, proxyproto
from mtgworkers.protocol.errors import ProtocolError
from mtgworkers.protocol.secret import Secret
from mtgworkers.protocol.serverhello import Shape

__all__ = [
    "MAX_HELLO_BYTES",
    "NEED_DATA",
    "ClientKnown",
    "Close",
    "CloseReason",
    "Dial",
    "Front",
    "FrontReason",
    "Reply",
    "ServerHandshake",
]

# A ClientHello may span at most 11 records of at most 65535 bytes each (mtg's limits).
MAX_HELLO_BYTES: Final = faketls.MAX_HELLO_RECORDS * (faketls.RECORD_HEADER_LEN + 0xFFFF)


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Nothing to do until more bytes arrive."""


class CloseReason(enum.Enum):
    """Why a handshake ends without fronting; the caller logs it."""

    PROXY_MALFORMED = "cannot parse proxy protocol header"
    PROXY_UNTRUSTED = "proxy protocol header from an untrusted address"
    PROXY_NO_CLIENT = "proxy protocol header without a client (LOCAL or UNKNOWN)"
    OBFS2_FAILED = "obfuscated handshake is failed"


class FrontReason(enum.Enum):
    """Why a client is sent to the fronting host."""

    BAD_HELLO = "cannot read client hello"
    REPLAY = "replay attack has been detected!"


@dataclass(frozen=True, slots=True)
class ClientKnown:
    """The client's address: the PROXY header's source, else the TCP peer."""

    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``data``, the answer to a valid hello. ``without_sni``: that hello had no
    server_name extension (served on its HMAC alone; the caller counts these)."""

    data: bytes
    without_sni: bool = False


@dataclass(frozen=True, slots=True)
class Front:
    reason: FrontReason
    error: str  # the parse or verification error ("" for a replay)
    data: bytes  # everything the client sent after the PROXY header, unchanged


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to DC ``dc`` (mtg's number: ``abs(raw)``, 0 -> 2).

    ``handshake`` holds the client's transport tag and both client cipher contexts;
    ``reader`` continues the client's TLS record stream; ``pending`` are record payload
    bytes that came right behind the frame, still encrypted with the client's stream.
    """

    dc: int
    handshake: obfs2.ClientHandshake
    reader: faketls.RecordReader
    pending: bytes


@dataclass(frozen=True, slots=True)
class Close:
    reason: CloseReason
    error: str


Action = ClientKnown | Reply | Front | Dial | Close | _NeedData

# states
_PROXY_HEADER, _ADMIT, _HELLO, _OBFS2, _DONE = range(5)


class ServerHandshake:
    """The handshake of one client connection; see the module docstring.

    ``peer`` is the TCP peer (ip, port). ``proxy_header`` says whether a PROXY header may
    come first (``proxy-protocol-listener``) and ``header_allowed`` whether this peer may
    send one (``proxy-protocol-trusted``). ``replayed(session_id)`` tests and records a
    hello's session id in the anti-replay filter. ``random_bytes(n)`` is the source of the
    ServerHello's randomness. ``tolerance`` is the allowed clock skew in seconds.
    ``noise_length()`` gives the length of the ServerHello's noise record (None: the
    built-in range), the doppelganger's calibration to the fronting site.
    ``shape()``, when given, returns the fronting site's learned ServerHello shape (or
    None: nothing learned), asked once per valid hello; the answer then picks the suite
    and orders the extensions as the site does (``faketls.build_server_hello``).
    """

    __slots__ = (
        "_buf",
        "_failed",
        "_need",
        "_reader",
        "_state",
        "client",
        "header_allowed",
        "noise_length",
        "peer",
        "random_bytes",
        "replayed",
        "secret",
        "shape",
        "tolerance",
    )

    def __init__(
        self,
        secret: Secret,
        peer: tuple[str, int],
        *,
        tolerance: float,
        replayed: Callable[[bytes], bool],
        random_bytes: Callable[[int], bytes],
        proxy_header: bool = False,
        header_allowed: bool = True,
        noise_length: Callable[[], int | None] | None = None,
        shape: Callable[[], Shape | None] | None = None,
    ) -> None:
        self.secret = secret
        self.shape = shape
        self.peer = peer
        self.client = peer
        self.tolerance = tolerance
        self.replayed = replayed
        self.random_bytes = random_bytes
        self.header_allowed = header_allowed
        self.noise_length = noise_length
        self._state = _PROXY_HEADER if proxy_header else _ADMIT
        self._buf = bytearray()
        # Length the buffer must reach before the hello is worth parsing again: a hello
        # that comes in many small segments is parsed once per record, not per segment.
        self._need = 1
        self._reader: faketls.RecordReader | None = None
        self._failed = ""  # why the TLS records around the frame are unreadable

    @property
    def done(self) -> bool:
        """True after a terminal action (Front, Dial, Close)."""
        return self._state == _DONE

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes the client sent (ignored after a terminal action)."""
        if self._state == _OBFS2:
            assert self._reader is not None
            try:
                payloads = self._reader.feed(data)
            except ProtocolError as exc:
                self._buf = bytearray()
                self._reader = None
                self._failed = f"cannot read frame: {exc}"
                return
            for payload in payloads:
                self._buf += payload
        elif self._state != _DONE:
            self._buf += data

    def next_action(self, now: float) -> Action:
        """What to do now, given the bytes received so far; ``now`` is the UNIX time."""
        state = self._state
        if state == _HELLO:
            return self._hello(now)
        if state == _OBFS2:
            return self._obfs2()
        if state == _ADMIT:
            self._state = _HELLO
            return ClientKnown(self.client)
        if state == _PROXY_HEADER:
            return self._proxy_header()
        return NEED_DATA

    # -- states ---------------------------------------------------------------------------

    def _proxy_header(self) -> Action:
        buf = self._buf
        try:
            parsed = proxyproto.parse_header(buf)
        except ProtocolError as exc:
            return self._close(CloseReason.PROXY_MALFORMED, str(exc))
        if parsed is None:
            return NEED_DATA
        if parsed is not proxyproto.NOT_PROXY:
            header, consumed = parsed
            if not self.header_allowed:
                return self._close(
                    CloseReason.PROXY_UNTRUSTED, "the address is not in proxy-protocol-trusted"
                )
            if header.local:
                return self._close(CloseReason.PROXY_NO_CLIENT, "")
            del buf[:consumed]
            if header.src is not None:
                self.client = header.src
        self._state = _HELLO
        return ClientKnown(self.client)

    def _hello(self, now: float) -> Action:
        buf = self._buf
        if len(buf) < self._need:
            return NEED_DATA
        try:
            result = faketls.read_client_hello(buf)
            if result is None:
                if len(buf) > MAX_HELLO_BYTES:
                    raise faketls.TLSError("client hello is too large")
                self._need = faketls.records_end(buf, 0)
                return NEED_DATA
            hello, consumed = result
            faketls.verify_client_hello(hello, self.secret, now, self.tolerance)
        except ProtocolError as exc:
            return self._front(FrontReason.BAD_HELLO, str(exc))
        if self.replayed(hello.session_id):
            return self._front(FrontReason.REPLAY, "")
        noise = self.noise_length() if self.noise_length is not None else None
        answer = faketls.build_server_hello(
            hello,
            self.secret.key,
            noise_len=noise,
            urandom=self.random_bytes,
            shape=None if self.shape is None else self.shape(),
        )
        rest = bytes(buf[consumed:])
        self._buf = bytearray()
        self._reader = faketls.RecordReader()
        self._state = _OBFS2
        if rest:
            self.receive(rest)
        return Reply(answer, hello.sni is None)

    def _obfs2(self) -> Action:
        if self._failed:
            return self._close(CloseReason.OBFS2_FAILED, self._failed)
        buf = self._buf
        if len(buf) < obfs2.FRAME_LEN:
            return NEED_DATA
        try:
            handshake = obfs2.parse_client_frame(buf[: obfs2.FRAME_LEN], self.secret.key)
        except ProtocolError as exc:
            return self._close(CloseReason.OBFS2_FAILED, str(exc))
        reader = self._reader
        assert reader is not None
        pending = bytes(buf[obfs2.FRAME_LEN :])
        self._end()
        return Dial(obfs2.dc_number(handshake.dc), handshake, reader, pending)

    # -- endings --------------------------------------------------------------------------

    def _front(self, reason: FrontReason, error: str) -> Front:
        data = bytes(self._buf)
        self._end()
        return Front(reason, error, data)

    def _close(self, reason: CloseReason, error: str) -> Close:
        self._end()
        return Close(reason, error)

    def _end(self) -> None:
        self._state = _DONE
        self._buf = bytearray()
        self._reader = None
