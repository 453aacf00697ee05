"""FakeTLS, server side (docs/protocol.md §2, §3).

The client opens with a TLS 1.3-looking ClientHello whose random is an HMAC of the hello under
the secret key, XOR-ed with a timestamp. We answer with ServerHello + ChangeCipherSpec + one
ApplicationData record of noise, signed the same way; after that both directions are plain
``17 03 03`` records carrying the obfuscated2 stream.

Error texts follow mtg's wording (including its ``cannot read client hello: ...`` wrapping), so
log lines read the same as mtg's.
"""

from __future__ import annotations

import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mtgworkers.protocol.errors import ProtocolError
from mtgworkers.protocol.secret import Secret
from mtgworkers.protocol.serverhello import Shape

__all__ = [
    "MAX_HELLO_RECORDS",
    "MAX_RECORD_PAYLOAD",
    "RANDOM_OFFSET",
    "BadDigest",
    "BadTimestamp",
    "ClientHello",
    "RecordReader",
    "TLSError",
    "build_server_hello",
    "read_client_hello",
    "verify_client_hello",
    "wrap_application_data",
]

RECORD_HEADER_LEN = 5
TYPE_CHANGE_CIPHER_SPEC = 0x14
TYPE_HANDSHAKE = 0x16
TYPE_APPLICATION_DATA = 0x17
HANDSHAKE_CLIENT_HELLO = 0x01
HANDSHAKE_SERVER_HELLO = 0x02

#: mtg treats 16384 as the size of a whole record including its 5-byte header.
MAX_RECORD_PAYLOAD = 16384 - RECORD_HEADER_LEN
#: Offset of the 32-byte random in a single-record hello / in our ServerHello packet.
RANDOM_OFFSET = RECORD_HEADER_LEN + 4 + 2
RANDOM_LEN = 32
#: mtg reassembles a ClientHello from at most this many handshake records.
MAX_HELLO_RECORDS = 11

# Default ServerHello noise: 2500 + U[0, 2200) bytes, as mtg without doppelganger calibration.
NOISE_MIN = 2500
NOISE_SPREAD = 2200

_HEADER = struct.Struct(">BHH")  # type, version, length
_U16 = struct.Struct(">H")
_VERSION_TLS12 = 0x0303
_ZERO_RANDOM = bytes(RANDOM_LEN)
_DIGEST_ZEROS = bytes(RANDOM_LEN - 4)
_EXT_SERVER_NAME = 0x0000
_SNI_HOST_NAME = 0x00

_HELLO = "cannot read client hello: "
_HELLO_HEADER = "cannot read client hello: cannot read handshake header: "
_PARSE = "cannot parse handshake: "
_SNI = "cannot parse SNI: "

# compression "null", 46 bytes of extensions: supported_versions = TLS 1.3, then key_share
# x25519 announcing a 32-byte key (the key itself follows).
_SERVER_HELLO_TAIL = bytes.fromhex("00002e002b0002030400330024001d0020")
_CHANGE_CIPHER_SPEC = bytes.fromhex("140303000101")


class TLSError(ProtocolError):
    """Malformed or unacceptable FakeTLS bytes (the client is sent to the fronting host)."""


class BadDigest(TLSError):
    """The ClientHello random is not an HMAC under our key (wrong secret or a probe)."""


class BadTimestamp(TLSError):
    """The timestamp hidden in the ClientHello random is outside the tolerated skew."""


@dataclass(frozen=True)
class ClientHello:
    """What the proxy needs from a parsed ClientHello.

    ``random`` is the client random as sent (digest XOR timestamp), ``cipher_suite`` the first
    non-GREASE suite, ``sni`` the server names in order (``None`` when the hello has no
    server_name extension at all, as Telegram iOS sends it), ``canonical`` the hello as one
    record ``16 03 01 ...`` (equal to the wire bytes unless the client fragmented it),
    ``suites`` the offered cipher suites as sent (2 bytes each, GREASE included).
    """

    random: bytes
    session_id: bytes
    cipher_suite: int
    sni: tuple[bytes, ...] | None
    canonical: bytes
    suites: bytes = b""


# -- reading the ClientHello ---------------------------------------------------------------


def read_client_hello(
    buf: bytes | bytearray | memoryview, *, eof: bool = False
) -> tuple[ClientHello, int] | None:
    """Parse the ClientHello record(s) at the start of ``buf``.

    Returns ``None`` while more bytes are needed, or ``(hello, consumed)`` where ``consumed``
    counts the bytes of the records that made up the hello; anything after them was not looked
    at. Like mtg, only whole records are used, at most :data:`MAX_HELLO_RECORDS` of them, and
    payload left in the last record after the hello is dropped. A wrong record type or version
    is reported as soon as its byte arrives, so an HTTP probe fails on its first byte.

    With ``eof=True`` ``buf`` is everything the peer will ever send: an incomplete hello then
    raises mtg's end-of-stream error instead of returning ``None``.

    Raises :class:`TLSError`. Keeps no reference to ``buf`` (a bytearray can grow afterwards).
    """
    hello = _one_record_hello(buf)
    if hello is not None:
        return hello
    return _read_records(buf, eof)


def _read_records(buf: bytes | bytearray | memoryview, eof: bool) -> tuple[ClientHello, int] | None:
    """:func:`read_client_hello` for any hello: fragmented, malformed, incomplete."""
    n = len(buf)
    pos = 0
    records = 0
    spans: list[tuple[int, int]] = []
    have = 0  # reassembled payload bytes so far
    body_len = -1  # unknown until the 4-byte handshake header is complete

    while body_len < 0 or have < 4 + body_len:
        prefix = _HELLO_HEADER if body_len < 0 else _HELLO
        if records == MAX_HELLO_RECORDS:
            raise TLSError(prefix + "too many fragments")
        left = n - pos
        if left < 1:
            return _incomplete(eof, prefix + "cannot read record header: EOF")
        if buf[pos] != TYPE_HANDSHAKE:
            raise TLSError(f"{prefix}unexpected record type {buf[pos]:#x}")
        if left < 3:
            return _incomplete(eof, prefix + "cannot read record header: unexpected EOF")
        if buf[pos + 1] != 3 or buf[pos + 2] != 1:
            raise TLSError(
                f"{prefix}unexpected protocol version {buf[pos + 1]:#x} {buf[pos + 2]:#x}"
            )
        if left < RECORD_HEADER_LEN:
            return _incomplete(eof, prefix + "cannot read record header: unexpected EOF")
        start = pos + RECORD_HEADER_LEN
        end = start + ((buf[pos + 3] << 8) | buf[pos + 4])
        if end > n:
            # Go's io.ReadFull turns a short read into "unexpected EOF" once it got something.
            short = "unexpected EOF" if body_len < 0 and have else "EOF"
            return _incomplete(eof, prefix + short)
        records += 1
        pos = end
        if end > start:
            spans.append((start, end))
            have += end - start
        if body_len < 0 and have >= 4:
            head = _join(buf, spans)[:4]
            if head[0] != HANDSHAKE_CLIENT_HELLO:
                raise TLSError(f"{_HELLO}incorrect handshake type: {head[0]:#x}")
            body_len = int.from_bytes(head[1:4], "big")

    body = _join(buf, spans)[4 : 4 + body_len]
    canonical = b"".join(
        (
            _HEADER.pack(TYPE_HANDSHAKE, 0x0301, (4 + body_len) & 0xFFFF),
            bytes((HANDSHAKE_CLIENT_HELLO,)),
            body_len.to_bytes(3, "big"),
            body,
        )
    )
    return _parse_body(body, canonical), pos


def _one_record_hello(buf: bytes | bytearray | memoryview) -> tuple[ClientHello, int] | None:
    """The common hello (one record holding exactly the handshake message, every field
    well-formed), parsed by offsets; None for anything else, which the general reader
    then parses or rejects with mtg's wording. Same result as the general reader: the
    record is the canonical form as it is. A fifth of the general reader's time for the
    benchmark's Telegram-like hello (5 vs 25 us, timeit on the loaded benchmark host);
    tests/unit/test_faketls.py checks that both readers agree.
    """
    n = len(buf)
    if n < 9 or buf[0] != TYPE_HANDSHAKE or buf[1] != 3 or buf[2] != 1:
        return None
    end = 5 + ((buf[3] << 8) | buf[4])
    if end > n or buf[5] != HANDSHAKE_CLIENT_HELLO:
        return None
    if (buf[6] << 16) | (buf[7] << 8) | buf[8] != end - 9:
        return None  # several records, or bytes behind the hello in its record
    rec = bytes(buf[:end])
    p = 9 + 2 + RANDOM_LEN  # version, random
    if p >= end:
        return None
    sid_end = p + 1 + rec[p]
    p = sid_end + 2
    if p > end:
        return None
    suites_len = (rec[p - 2] << 8) | rec[p - 1]
    suites_end = p + suites_len
    if suites_len & 1 or suites_end >= end:
        return None
    cipher_suite = 0
    for i in range(p, suites_end, 2):
        suite = (rec[i] << 8) | rec[i + 1]
        if suite & 0x0F0F != 0x0A0A:
            cipher_suite = suite
            break
    if cipher_suite == 0:
        return None
    p = suites_end + 1 + rec[suites_end]  # compression methods
    exts_end = p + 2
    if exts_end > end:
        return None
    exts_end += (rec[p] << 8) | rec[p + 1]
    if exts_end > end:
        return None
    p += 2
    sni: tuple[bytes, ...] | None = None
    while p < exts_end:
        data = p + 4
        if data > exts_end:
            return None
        data_end = data + ((rec[p + 2] << 8) | rec[p + 3])
        if data_end > exts_end:
            return None
        if rec[p] == 0 and rec[p + 1] == 0:  # server_name: read as _parse_server_names
            if data_end - data < 2:
                return None
            if rec[data] == 0 and rec[data + 1] == 0:
                sni = ()
                break
            q = data + 3
            if q > data_end or rec[data + 2] != _SNI_HOST_NAME:
                return None
            names = []
            while q < data_end:
                name = q + 2
                if name > data_end:
                    return None
                name_end = name + ((rec[q] << 8) | rec[q + 1])
                if name_end > data_end:
                    return None
                names.append(rec[name:name_end])
                q = name_end
            sni = tuple(names)
            break
        p = data_end
    hello = ClientHello(
        random=rec[11 : 11 + RANDOM_LEN],
        session_id=rec[44:sid_end],
        cipher_suite=cipher_suite,
        sni=sni,
        canonical=rec,
        suites=rec[suites_end - suites_len : suites_end],
    )
    return hello, end


def _incomplete(eof: bool, message: str) -> tuple[ClientHello, int] | None:
    """Not enough bytes yet: ``None``, or mtg's end-of-stream error when nothing more comes."""
    if eof:
        raise TLSError(message)
    return None


def _join(buf: bytes | bytearray | memoryview, spans: list[tuple[int, int]]) -> bytes:
    return b"".join([buf[start:end] for start, end in spans])


class _Cursor:
    """Bounds-checked reads over the hello body, failing with Go's wording."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def read_full(self, count: int, what: str, prefix: str = _PARSE) -> bytes:
        """``io.ReadFull``: EOF when nothing is left, unexpected EOF when some is."""
        left = self.remaining()
        if left < count:
            short = "unexpected EOF" if left else "EOF"
            raise TLSError(f"{prefix}cannot read {what}: {short}")
        start = self.pos
        self.pos = start + count
        return self.data[start : self.pos]

    def next(self, count: int) -> bytes:
        """``bytes.Buffer.Next``: up to ``count`` bytes, fewer at the end."""
        start = self.pos
        self.pos = min(start + count, len(self.data))
        return self.data[start : self.pos]


def _parse_body(body: bytes, canonical: bytes) -> ClientHello:
    cur = _Cursor(body)
    cur.read_full(2, "client version")  # read but, like mtg, not checked
    random = cur.read_full(RANDOM_LEN, "client random")
    session_id_len = cur.read_full(1, "session ID length")[0]
    session_id = cur.read_full(session_id_len, "session id")

    suites_len = _U16.unpack(cur.read_full(2, "cipher suite length"))[0]
    # Suites are 2 bytes each; an odd length leaves one byte to shift the next fields (as mtg).
    # mtg reads them one by one, so a short list fails on a 0- or 1-byte tail.
    if cur.remaining() < suites_len // 2 * 2:
        short = "unexpected EOF" if cur.remaining() % 2 else "EOF"
        raise TLSError(f"{_PARSE}cannot read cipher suite: {short}")
    suites = cur.next(suites_len // 2 * 2)
    cipher_suite = 0
    for i in range(0, len(suites), 2):
        suite = (suites[i] << 8) | suites[i + 1]
        if suite & 0x0F0F != 0x0A0A:  # skip GREASE: a real server never picks one
            cipher_suite = suite
            break
    if cipher_suite == 0:
        raise TLSError(_PARSE + "cannot find a cipher")

    compression_len = cur.read_full(1, "compression methods length")[0]
    if cur.remaining() < compression_len:
        raise TLSError(_PARSE + "cannot skip compression methods: EOF")
    cur.pos += compression_len

    return ClientHello(
        random=random,
        session_id=session_id,
        cipher_suite=cipher_suite,
        sni=_parse_sni(cur),
        canonical=canonical,
        suites=suites,
    )


def _parse_sni(cur: _Cursor) -> tuple[bytes, ...] | None:
    ext_len = _U16.unpack(cur.read_full(2, "length of TLS extensions", _SNI))[0]
    if cur.remaining() < ext_len:
        raise TLSError(_SNI + "cannot read extensions: EOF")
    exts = _Cursor(cur.next(ext_len))

    while exts.remaining():
        ext_type = exts.next(2)
        if len(ext_type) != 2:
            raise TLSError(f"{_SNI}cannot read extension type: {_go_bytes(ext_type)}")
        length_b = exts.next(2)
        if len(length_b) != 2:
            raise TLSError(
                f"{_SNI}cannot read extension {_go_bytes(ext_type)} length: {_go_bytes(length_b)}"
            )
        length = _U16.unpack(length_b)[0]
        data = exts.next(length)
        if len(data) != length:
            raise TLSError(
                f"{_SNI}cannot read extension {_go_bytes(ext_type)} data: "
                f"len {length} != {len(data)}"
            )
        if _U16.unpack(ext_type)[0] == _EXT_SERVER_NAME:
            return _parse_server_names(_Cursor(data))
    return None


def _parse_server_names(cur: _Cursor) -> tuple[bytes, ...]:
    list_len = cur.next(2)
    if len(list_len) != 2:
        raise TLSError(f"{_SNI}cannot read the length of the SNI record: {_go_bytes(list_len)}")
    if list_len == b"\x00\x00":
        return ()
    # mtg reads the name-type byte once, then names until the extension ends; the list length
    # itself is not used further.
    list_type = cur.next(1)
    if not list_type:
        raise TLSError(_SNI + "cannot read SNI list type: EOF")
    if list_type[0] != _SNI_HOST_NAME:
        raise TLSError(f"{_SNI}incorrect SNI list type {list_type[0]:#x}")
    names = []
    while cur.remaining():
        length_b = cur.next(2)
        if len(length_b) != 2:
            raise TLSError(f"{_SNI}incorrect length of the hostname: {_go_bytes(length_b)}")
        length = _U16.unpack(length_b)[0]
        name = cur.next(length)
        if len(name) != length:
            raise TLSError(f"{_SNI}incorrect length of SNI hostname: len {length} != {len(name)}")
        names.append(name)
    return tuple(names)


def _go_bytes(data: bytes) -> str:
    """Go's ``%v`` of a byte slice: ``[0 171]``."""
    return "[" + " ".join(str(b) for b in data) + "]"


# -- verifying the ClientHello -------------------------------------------------------------


def verify_client_hello(hello: ClientHello, secret: Secret, now: float, tolerance: float) -> None:
    """Check a parsed hello against our secret, in mtg's order: SNI, HMAC, timestamp.

    ``now`` is the current UNIX time and ``tolerance`` the allowed skew in seconds (inclusive,
    both directions). Returns nothing; raises :class:`TLSError` when the hello names hosts
    and the secret's host is not among them, :class:`BadDigest` when the random is not our
    HMAC, and :class:`BadTimestamp` when the embedded time is too far from ``now``.

    A hello without a server_name extension (Telegram iOS since 12.2) is checked on its
    HMAC and time alone: only the key makes a valid one, so a censor's no-SNI probe still
    fails (mtg fronts every such hello, which turns those users away).
    """
    host = secret.host_bytes
    if hello.sni is not None and host not in hello.sni:
        names = " ".join(name.decode("utf-8", "backslashreplace") for name in hello.sni)
        shown = host.decode("utf-8", "backslashreplace")
        raise TLSError(f"cannot find {shown} in [{names}]")

    canon = hello.canonical
    # hmac.digest: OpenSSL's one-shot HMAC, without the hmac.HMAC object (~2 us a call).
    mac = hmac.digest(
        secret.key,
        b"".join((canon[:RANDOM_OFFSET], _ZERO_RANDOM, canon[RANDOM_OFFSET + RANDOM_LEN :])),
        "sha256",
    )
    # mac XOR random must be 28 zero bytes + timestamp: compare the 28-byte prefixes directly,
    # in constant time.
    if not hmac.compare_digest(mac[: RANDOM_LEN - 4], hello.random[: RANDOM_LEN - 4]):
        raise BadDigest("incorrect client random")

    stamp = int.from_bytes(mac[RANDOM_LEN - 4 :], "little") ^ int.from_bytes(
        hello.random[RANDOM_LEN - 4 :], "little"
    )
    skew = abs(now - stamp)
    if skew > tolerance:
        created = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(stamp))
        raise BadTimestamp(f'timestamp "{created}" is too old {_go_duration(skew)}')


def _go_duration(seconds: float) -> str:
    """Format a non-negative duration like Go's ``time.Duration.String`` (``1m3.5s``)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    if ns < 1_000_000_000:
        for unit, size, digits in (("ms", 1_000_000, 6), ("µs", 1_000, 3), ("ns", 1, 0)):
            if ns >= size:
                whole, frac = divmod(ns, size)
                tail = f".{frac:0{digits}d}".rstrip("0") if frac else ""
                return f"{whole}{tail}{unit}"
    whole_s, frac = divmod(ns, 1_000_000_000)
    hours, rest = divmod(whole_s, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs}" + (f".{frac:09d}".rstrip("0") if frac else "") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


# -- answering -----------------------------------------------------------------------------


def build_server_hello(
    hello: ClientHello,
    key: bytes,
    *,
    noise_len: int | None = None,
    urandom: Callable[[int], bytes] = os.urandom,
    shape: Shape | None = None,
) -> bytes:
    """Build the whole answer to a verified hello: ServerHello, CCS, one ApplicationData.

    ``key`` is the 16-byte secret key. The session id and cipher suite are echoed, the key
    share is a real X25519 public key, and the single noise record holds ``noise_len`` random
    bytes (clamped to 1..:data:`MAX_RECORD_PAYLOAD`; default 2500..4699 like mtg). The server
    random is ``HMAC-SHA256(key, client_random || packet with zero random)``. ``urandom`` is
    the source of every random byte (injectable for tests). Returns the bytes to send at once.

    With the fronting site's ``shape`` (``serverhello.Shape``) the cipher suite is the one
    the site picks for this hello's suites and the extensions are in the site's order (with
    any others it sends); the key share stays X25519. Without it (or when the shape's rule
    says nothing for this hello) the answer is the one described above, byte for byte.
    """
    if noise_len is None:
        noise_len = NOISE_MIN + int.from_bytes(urandom(4), "big") % NOISE_SPREAD
    noise_len = min(max(noise_len, 1), MAX_RECORD_PAYLOAD)

    public_key = (
        X25519PrivateKey.from_private_bytes(urandom(32))
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    session_id = hello.session_id
    suite = hello.cipher_suite
    if shape is None:
        tail = _SERVER_HELLO_TAIL + public_key
    else:
        suite = shape.select_suite(hello.suites) or suite
        tail = b"\x00" + shape.extensions_block(public_key)
    server_hello = b"".join(
        (
            b"\x03\x03",
            _ZERO_RANDOM,
            bytes((len(session_id),)),
            session_id,
            _U16.pack(suite),
            tail,
        )
    )
    handshake_len = 4 + len(server_hello)
    packet = bytearray(
        b"".join(
            (
                _HEADER.pack(TYPE_HANDSHAKE, _VERSION_TLS12, handshake_len),
                bytes((HANDSHAKE_SERVER_HELLO,)),
                len(server_hello).to_bytes(3, "big"),
                server_hello,
                _CHANGE_CIPHER_SPEC,
                _HEADER.pack(TYPE_APPLICATION_DATA, _VERSION_TLS12, noise_len),
                urandom(noise_len),
            )
        )
    )
    digest = hmac.digest(key, hello.random + packet, "sha256")
    packet[RANDOM_OFFSET : RANDOM_OFFSET + RANDOM_LEN] = digest
    return bytes(packet)


# -- data path -----------------------------------------------------------------------------


def records_end(buf: bytes | bytearray | memoryview, start: int) -> int:
    """The length ``buf`` must reach before the records from ``start`` can say more: the
    end of the first incomplete record, or one byte more while its header is incomplete
    (each header byte can decide: a wrong type or version is an error at once).

    Lets a reader skip re-parsing an incomplete ClientHello on every small chunk.
    """
    pos = start
    n = len(buf)
    while True:
        if n < pos + RECORD_HEADER_LEN:
            return n + 1
        end = pos + RECORD_HEADER_LEN + ((buf[pos + 3] << 8) | buf[pos + 4])
        if n < end:
            return end
        pos = end


def record_header(payload_len: int) -> bytes:
    """The 5-byte header of an ApplicationData record of ``payload_len`` (<= 65535) bytes."""
    return _HEADER.pack(TYPE_APPLICATION_DATA, _VERSION_TLS12, payload_len)


class RecordReader:
    """Turns the client's TLS record stream into the obfuscated2 byte stream (§3.8).

    Feed it whatever the socket delivered; it returns the ApplicationData payload bytes in
    order, as views of the fed chunk where possible (a record may span chunks and its payload
    is delivered as it arrives). Other record types (CCS, alerts, handshake) are dropped.
    Between calls it keeps only the current record's remaining length and at most a 4-byte
    partial header.
    """

    __slots__ = ("_head", "_keep", "_left")

    def __init__(self) -> None:
        self._head = b""  # partial record header carried over from the previous chunk
        self._left = 0  # payload bytes of the current record still to come
        self._keep = False  # is the current record ApplicationData?

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview | bytes]:
        """Consume one chunk; return the payload slices it contained (possibly none).

        The returned memoryviews point into ``data``: use them before reusing that buffer.
        Raises :class:`TLSError` on a record whose version is not ``03 03``.
        """
        out: list[memoryview | bytes] = []
        view = memoryview(data)
        n = len(view)
        pos = 0
        left = self._left
        keep = self._keep
        while pos < n:
            if left:
                end = pos + left
                if end >= n:
                    if keep:
                        out.append(view[pos:] if pos else view)
                    left = end - n
                    break
                if keep:
                    out.append(view[pos:end])
                pos = end
                left = 0
                continue
            head = self._head
            if head:
                take = RECORD_HEADER_LEN - len(head)
                head += view[pos : pos + take]
                pos += take
                if len(head) < RECORD_HEADER_LEN:
                    self._head = head
                    break
                self._head = b""
                rtype, version, left = _HEADER.unpack(head)
            elif n - pos >= RECORD_HEADER_LEN:
                rtype, version, left = _HEADER.unpack_from(view, pos)
                pos += RECORD_HEADER_LEN
            else:
                self._head = bytes(view[pos:])
                break
            if version != _VERSION_TLS12:
                self._left = 0
                raise TLSError(f"incorrect tls version [{version >> 8} {version & 0xFF}]")
            keep = rtype == TYPE_APPLICATION_DATA
        self._left = left
        self._keep = keep
        return out


def wrap_application_data(
    data: bytes | bytearray | memoryview, max_payload: int = MAX_RECORD_PAYLOAD
) -> bytes:
    """Wrap ``data`` into ``17 03 03 len payload`` records of at most ``max_payload`` bytes.

    Empty ``data`` gives ``b""`` (no empty record). Raises ``ValueError`` if ``max_payload``
    is not in 1..65535.
    """
    if not 0 < max_payload <= 0xFFFF:
        raise ValueError(f"max_payload must be in 1..65535, not {max_payload}")
    n = len(data)
    if n <= max_payload:
        if not n:
            return b""
        return _HEADER.pack(TYPE_APPLICATION_DATA, _VERSION_TLS12, n) + data
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, n, max_payload):
        chunk = view[start : start + max_payload]
        parts.append(_HEADER.pack(TYPE_APPLICATION_DATA, _VERSION_TLS12, len(chunk)))
        parts.append(chunk)
    return b"".join(parts)
