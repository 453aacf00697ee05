"""FakeTLS MTProto test client (blocking sockets), written from docs/protocol.md §3 and §4.

Typical use::

    client = FakeTLSClient("127.0.0.1", proxy.port, secret_key, "fronting.test")
    client.handshake(dc=2, tag="dd")
    client.send(b"ping")
    assert client.recv_exactly(4) == b"pong"
    client.close()

Every mismatch with the protocol raises :class:`WireError` with a readable message.
"""

from __future__ import annotations

import hmac
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import CipherContext
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.wire import (
    CCS_RECORD,
    MAX_RECORD_PAYLOAD,
    RECORD_APPDATA,
    RECORD_CCS,
    RECORD_HANDSHAKE,
    TAGS,
    WireError,
    obfs2_client_frame,
    recv_exactly,
    wrap_records,
)

RANDOM_OFFSET = 11  # record header 5 + handshake header 4 + client_version 2
DEFAULT_CIPHERS = (
    0x1301,
    0x1302,
    0x1303,
    0xC02B,
    0xC02F,
    0xC02C,
    0xC030,
    0xCCA9,
    0xCCA8,
    0xC013,
    0xC014,
    0x009C,
    0x009D,
    0x002F,
    0x0035,
)
GREASE = 0x5A5A
HELLO_HANDSHAKE_LEN = 512  # like browsers/Telegram: 512-byte handshake, 517-byte record


def _ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def _u16_list(values: Iterable[int]) -> bytes:
    body = b"".join(v.to_bytes(2, "big") for v in values)
    return len(body).to_bytes(2, "big") + body


def x25519_public_key() -> bytes:
    """Return a fresh, valid X25519 public key (32 bytes)."""
    return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def build_client_hello(
    secret_key: bytes,
    sni: str | bytes | Sequence[str | bytes] | None,
    *,
    timestamp: int | None = None,
    session_id: bytes | None = None,
    grease: bool = False,
    ciphers: Sequence[int] = DEFAULT_CIPHERS,
    alpn: Sequence[bytes] = (b"h2", b"http/1.1"),
    key_share: bytes | None = None,
) -> bytes:
    """Build one FakeTLS ClientHello record (517 bytes unless the SNI is very long).

    The random is HMAC-SHA256(secret_key, record with zero random) XOR
    (28 zero bytes || u32le(timestamp)); ``timestamp`` defaults to now. ``sni`` None
    leaves out the server_name extension; a sequence puts several names into it.
    ``grease`` puts GREASE values first (cipher list, an extension, groups, versions).
    """
    if timestamp is None:
        timestamp = int(time.time())
    if session_id is None:
        session_id = os.urandom(32)
    if key_share is None:
        key_share = x25519_public_key()

    suites = ([GREASE] if grease else []) + list(ciphers)
    exts = bytearray()
    if grease:
        exts += _ext(0x0A0A, b"")
    if sni is not None:
        names = [sni] if isinstance(sni, (str, bytes)) else list(sni)
        entries = b""
        for name in names:
            raw = name.encode() if isinstance(name, str) else name
            entries += b"\x00" + len(raw).to_bytes(2, "big") + raw
        exts += _ext(0x0000, len(entries).to_bytes(2, "big") + entries)
    exts += _ext(0x0017, b"")  # extended_master_secret
    exts += _ext(0xFF01, b"\x00")  # renegotiation_info
    exts += _ext(0x000A, _u16_list(([0x4A4A] if grease else []) + [0x001D, 0x0017, 0x0018]))
    exts += _ext(0x000B, b"\x01\x00")  # ec_point_formats: uncompressed
    exts += _ext(0x0023, b"")  # session_ticket
    alpn_body = b"".join(len(p).to_bytes(1, "big") + p for p in alpn)
    exts += _ext(0x0010, len(alpn_body).to_bytes(2, "big") + alpn_body)
    exts += _ext(0x0005, b"\x01\x00\x00\x00\x00")  # status_request
    exts += _ext(
        0x000D, _u16_list([0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601])
    )
    exts += _ext(0x0012, b"")  # signed_certificate_timestamp
    share = b"\x00\x1d" + len(key_share).to_bytes(2, "big") + key_share
    exts += _ext(0x0033, len(share).to_bytes(2, "big") + share)
    exts += _ext(0x002D, b"\x01\x01")  # psk_key_exchange_modes: psk_dhe_ke
    versions = ([0x6A6A] if grease else []) + [0x0304, 0x0303]
    vbody = b"".join(v.to_bytes(2, "big") for v in versions)
    exts += _ext(0x002B, len(vbody).to_bytes(1, "big") + vbody)

    def body_with(extensions: bytes) -> bytes:
        return _hello_body(session_id, suites, extensions)

    # Pad the handshake to 512 bytes the way browsers do (padding extension 0x0015).
    missing = HELLO_HANDSHAKE_LEN - 4 - len(body_with(bytes(exts))) - 4
    if missing >= 0:
        exts += _ext(0x0015, bytes(missing))
    return _signed_hello_record(body_with(bytes(exts)), secret_key, timestamp)


def _hello_body(session_id: bytes, suites: Sequence[int], extensions: bytes) -> bytes:
    """A ClientHello body with a zero random (signed later), no compression."""
    return (
        b"\x03\x03"
        + bytes(32)
        + len(session_id).to_bytes(1, "big")
        + session_id
        + _u16_list(suites)
        + b"\x01\x00"
        + len(extensions).to_bytes(2, "big")
        + extensions
    )


def _signed_hello_record(body: bytes, secret_key: bytes, timestamp: int) -> bytes:
    """Wrap a ClientHello body (zero random) in a record and sign its random, FakeTLS-style."""
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    record = bytearray(b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake)
    mac = hmac.new(secret_key, bytes(record), sha256).digest()
    mask = bytes(28) + (timestamp & 0xFFFFFFFF).to_bytes(4, "little")
    record[RANDOM_OFFSET : RANDOM_OFFSET + 32] = bytes(
        a ^ b for a, b in zip(mac, mask, strict=True)
    )
    return bytes(record)


X25519MLKEM768 = 0x11EC
MLKEM768_ENCAPSULATION_KEY = 1184  # FIPS 203; the hybrid share is this plus 32 of X25519


def build_layout_hello(
    secret_key: bytes,
    sni: str | None,
    layout: str,
    *,
    timestamp: int | None = None,
) -> bytes:
    """A FakeTLS-signed ClientHello laid out as a 2026 client sends it.

    ``layout`` is one of:

    - ``"chrome"``: Chrome 131+ on desktop: GREASE suite, groups, versions and two GREASE
      extensions; an X25519MLKEM768 hybrid key share (1216 bytes) next to an x25519 one;
      compress_certificate, application_settings and an encrypted_client_hello GREASE
      extension (outer type, HPKE suite, config id, a 32-byte enc and a 208-byte payload)
      as draft-ietf-tls-esni-22 §6.2 prescribes for clients without an ECH config; no
      padding, since the hello is already past 512 bytes.
    - ``"android"``: Telegram Android's hello with a post-quantum share: the classic
      TDLib layout padded to a 512-byte handshake, with the hybrid share on top.

    Both come to 1.7-1.9 KB, so they cross a 1,460-byte TCP segment: tests send them
    in two pieces. ``sni`` None leaves out server_name.
    """
    if layout not in ("chrome", "android"):
        raise ValueError(f"unknown hello layout {layout!r}")
    if timestamp is None:
        timestamp = int(time.time())
    hybrid = os.urandom(MLKEM768_ENCAPSULATION_KEY) + x25519_public_key()
    x25519 = x25519_public_key()
    chrome = layout == "chrome"

    exts: list[bytes] = []
    if chrome:
        exts.append(_ext(0x2A2A, b""))  # leading GREASE extension
    if sni is not None:
        raw = sni.encode()
        entry = b"\x00" + len(raw).to_bytes(2, "big") + raw
        exts.append(_ext(0x0000, len(entry).to_bytes(2, "big") + entry))
    exts.append(_ext(0x0017, b""))  # extended_master_secret
    exts.append(_ext(0xFF01, b"\x00"))  # renegotiation_info
    groups = [0x8A8A] if chrome else []
    exts.append(_ext(0x000A, _u16_list([*groups, X25519MLKEM768, 0x001D, 0x0017, 0x0018])))
    exts.append(_ext(0x000B, b"\x01\x00"))  # ec_point_formats
    exts.append(_ext(0x0023, b""))  # session_ticket
    exts.append(_ext(0x0010, b"\x00\x0c\x02h2\x08http/1.1"))  # ALPN
    exts.append(_ext(0x0005, b"\x01\x00\x00\x00\x00"))  # status_request
    exts.append(
        _ext(0x000D, _u16_list([0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]))
    )
    exts.append(_ext(0x0012, b""))  # signed_certificate_timestamp
    shares = b""
    if chrome:
        shares += b"\x8a\x8a\x00\x01\x00"  # GREASE share, one zero byte
    shares += X25519MLKEM768.to_bytes(2, "big") + len(hybrid).to_bytes(2, "big") + hybrid
    shares += b"\x00\x1d\x00\x20" + x25519
    exts.append(_ext(0x0033, len(shares).to_bytes(2, "big") + shares))
    exts.append(_ext(0x002D, b"\x01\x01"))  # psk_key_exchange_modes
    versions = ([0xBABA] if chrome else []) + [0x0304, 0x0303]
    vbody = b"".join(v.to_bytes(2, "big") for v in versions)
    exts.append(_ext(0x002B, len(vbody).to_bytes(1, "big") + vbody))
    if chrome:
        exts.append(_ext(0x001B, b"\x02\x00\x02"))  # compress_certificate: brotli
        exts.append(_ext(0x44CD, b"\x00\x03\x02h2"))  # application_settings
        ech = (
            b"\x00"  # ClientHelloOuter
            + b"\x00\x01\x00\x01"  # HKDF-SHA256, AES-128-GCM
            + os.urandom(1)  # config_id
            + b"\x00\x20"
            + os.urandom(32)  # enc: an X25519 public value's size
            + b"\x00\xd0"
            + os.urandom(208)  # payload
        )
        exts.append(_ext(0xFE0D, ech))
        exts.append(_ext(0x1A1A, b"\x00"))  # trailing GREASE extension
    suites = ([0x7A7A] if chrome else []) + list(DEFAULT_CIPHERS)
    session_id = os.urandom(32)

    def body_with(extensions: bytes) -> bytes:
        return _hello_body(session_id, suites, extensions)

    if not chrome:
        # TDLib pads its hello to a 512-byte handshake before the hybrid share is
        # counted: the share (and its group entry) come on top, giving ~1.74 KB.
        extra = 4 + len(hybrid) + 2
        missing = HELLO_HANDSHAKE_LEN - 4 - len(body_with(b"".join(exts))) - 4 + extra
        if missing >= 0:
            exts.append(_ext(0x0015, bytes(missing)))
    return _signed_hello_record(body_with(b"".join(exts)), secret_key, timestamp)


def hello_timestamp(record: bytes, secret_key: bytes) -> int | None:
    """Recover the timestamp hidden in a single-record ClientHello, None on a bad digest."""
    zeroed = bytearray(record)
    zeroed[RANDOM_OFFSET : RANDOM_OFFSET + 32] = bytes(32)
    mac = hmac.new(secret_key, bytes(zeroed), sha256).digest()
    x = bytes(a ^ b for a, b in zip(mac, record[RANDOM_OFFSET : RANDOM_OFFSET + 32], strict=True))
    if x[:28] != bytes(28):
        return None
    return int.from_bytes(x[28:32], "little")


@dataclass
class ServerHelloInfo:
    """What the client learned from the proxy's welcome packet."""

    raw: bytes
    session_id: bytes
    cipher_suite: int
    key_share: bytes
    noise_len: int
    extensions: list[tuple[int, bytes]] = field(default_factory=list)


def read_record(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Read one TLS record: (type, header 5 bytes, payload)."""
    header = recv_exactly(sock, 5)
    length = int.from_bytes(header[3:5], "big")
    return header[0], header, recv_exactly(sock, length)


def parse_server_hello(
    packet: bytes, client_random: bytes, secret_key: bytes, session_id: bytes
) -> ServerHelloInfo:
    """Check the proxy's ServerHello + CCS + ApplicationData against docs/protocol.md §3.7.

    Verifies the record layout, the echoed session id, the extensions and the HMAC in the
    server random. Raises WireError naming the first difference.
    """
    if packet[0:3] != b"\x16\x03\x03":
        raise WireError(f"first record must start 16 03 03, got {packet[0:3].hex()}")
    rec1_len = int.from_bytes(packet[3:5], "big")
    rec1 = packet[5 : 5 + rec1_len]
    rest = packet[5 + rec1_len :]
    if rest[:6] != CCS_RECORD:
        raise WireError(f"expected ChangeCipherSpec after ServerHello, got {rest[:6].hex()}")
    app = rest[6:]
    if app[0:3] != b"\x17\x03\x03":
        raise WireError(f"expected ApplicationData after CCS, got {app[0:3].hex()}")
    noise_len = int.from_bytes(app[3:5], "big")
    if len(app) != 5 + noise_len:
        raise WireError(f"application data record length mismatch: {len(app)} vs {noise_len}")

    if rec1[0] != 0x02:
        raise WireError(f"handshake type must be ServerHello (2), got {rec1[0]}")
    sh_len = int.from_bytes(rec1[1:4], "big")
    sh = rec1[4:]
    if len(sh) != sh_len:
        raise WireError(f"ServerHello length {sh_len} but record carries {len(sh)}")
    if sh[0:2] != b"\x03\x03":
        raise WireError(f"ServerHello legacy_version must be 03 03, got {sh[0:2].hex()}")
    pos = 2 + 32
    sid_len = sh[pos]
    echoed = sh[pos + 1 : pos + 1 + sid_len]
    pos += 1 + sid_len
    if echoed != session_id:
        raise WireError(f"session id not echoed: sent {session_id.hex()}, got {echoed.hex()}")
    suite = int.from_bytes(sh[pos : pos + 2], "big")
    pos += 2
    if sh[pos] != 0:
        raise WireError(f"compression method must be 0, got {sh[pos]}")
    pos += 1
    ext_total = int.from_bytes(sh[pos : pos + 2], "big")
    pos += 2
    if pos + ext_total != len(sh):
        raise WireError("ServerHello extensions length does not match the record")
    extensions = []
    end = pos + ext_total
    while pos < end:
        etype = int.from_bytes(sh[pos : pos + 2], "big")
        elen = int.from_bytes(sh[pos + 2 : pos + 4], "big")
        extensions.append((etype, sh[pos + 4 : pos + 4 + elen]))
        pos += 4 + elen
    ext_map = dict(extensions)
    if ext_map.get(0x002B) != b"\x03\x04":
        raise WireError(f"supported_versions must be TLS 1.3, got {ext_map.get(0x002B)!r}")
    share = ext_map.get(0x0033, b"")
    if share[0:4] != b"\x00\x1d\x00\x20" or len(share) != 36:
        raise WireError(f"key_share must be x25519 with 32 bytes, got {share.hex()}")

    server_random = packet[RANDOM_OFFSET : RANDOM_OFFSET + 32]
    zeroed = bytearray(packet)
    zeroed[RANDOM_OFFSET : RANDOM_OFFSET + 32] = bytes(32)
    expected = hmac.new(secret_key, client_random + bytes(zeroed), sha256).digest()
    if not hmac.compare_digest(expected, server_random):
        raise WireError("server random is not HMAC(key, client_random || packet)")
    return ServerHelloInfo(packet, echoed, suite, share[4:], noise_len, extensions)


class FakeTLSClient:
    """A Telegram-like client talking FakeTLS + obfuscated2 to the proxy.

    ``secret_key`` is the 16-byte key used for the HMACs and obfuscated2 (pass a wrong
    key to test the fronting path); ``sni`` is the server name to put in the hello;
    ``source`` is the local IP to connect from (another loopback address, say).
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret_key: bytes,
        sni: str | bytes | Sequence[str | bytes] | None,
        *,
        timeout: float = 10.0,
        max_record: int = MAX_RECORD_PAYLOAD,
        source: str | None = None,
    ) -> None:
        self.address = (host, port)
        self.secret_key = secret_key
        self.sni = sni
        self.max_record = max_record
        self.sock = socket.create_connection(
            self.address, timeout=timeout, source_address=None if source is None else (source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = bytearray()  # every raw byte written to the socket, for fronting checks
        self.hello: bytes | None = None
        self.server_hello: ServerHelloInfo | None = None
        self._enc: CipherContext | None = None
        self._dec: CipherContext | None = None
        self._plain = bytearray()
        self._record_left = 0  # bytes left of the current 0x17 record being read
        self._skip_left = 0  # bytes left of a non-0x17 record being dropped

    # -- raw access ---------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        """Write raw bytes to the socket (recorded in ``sent``)."""
        self.sent += data
        self.sock.sendall(data)

    def recv_raw(self, n: int) -> bytes:
        """Read exactly n raw bytes."""
        return recv_exactly(self.sock, n)

    # -- FakeTLS ------------------------------------------------------------------------
    def send_client_hello(
        self,
        *,
        raw: bytes | None = None,
        timestamp: int | None = None,
        timestamp_offset: int = 0,
        session_id: bytes | None = None,
        grease: bool = False,
        key: bytes | None = None,
    ) -> bytes:
        """Send a ClientHello (or ``raw`` bytes instead) and return what was sent.

        ``key`` overrides the HMAC key only (the obfuscated2 layer keeps secret_key).
        """
        if raw is None:
            if timestamp is None:
                timestamp = int(time.time()) + timestamp_offset
            raw = build_client_hello(
                key if key is not None else self.secret_key,
                self.sni,
                timestamp=timestamp,
                session_id=session_id,
                grease=grease,
            )
        self.hello = raw
        self.send_raw(raw)
        return raw

    def read_server_hello(self) -> ServerHelloInfo:
        """Read ServerHello + CCS + one ApplicationData record and verify them."""
        if self.hello is None:
            raise WireError("send_client_hello() first")
        packet = bytearray()
        for expected_type in (RECORD_HANDSHAKE, RECORD_CCS, RECORD_APPDATA):
            rtype, header, payload = read_record(self.sock)
            if rtype != expected_type:
                raise WireError(
                    f"welcome packet: expected record type {expected_type:#x}, got {rtype:#x}"
                    f" (header {header.hex()})"
                )
            packet += header + payload
        hello = self.hello
        session_id = hello[44 : 44 + hello[43]]
        client_random = hello[RANDOM_OFFSET : RANDOM_OFFSET + 32]
        info = parse_server_hello(bytes(packet), client_random, self.secret_key, session_id)
        self.server_hello = info
        return info

    # -- obfuscated2 --------------------------------------------------------------------
    def send_obfs2_frame(
        self, dc: int = 2, tag: str | bytes = "dd", *, initial: bytes = b"", ccs: bool = True
    ) -> bytes:
        """Send CCS + the obfuscated2 init frame inside ApplicationData record(s).

        ``initial`` payload bytes go into the same write (and record) right behind the
        frame; ``ccs`` False leaves out the client's ChangeCipherSpec record.
        """
        tag_bytes = TAGS[tag] if isinstance(tag, str) else tag
        obfs = obfs2_client_frame(self.secret_key, dc, tag_bytes)
        self._enc, self._dec = obfs.encryptor, obfs.decryptor
        data = obfs.wire + (obfs.encryptor.update(initial) if initial else b"")
        self.send_raw((CCS_RECORD if ccs else b"") + wrap_records(data, self.max_record))
        return obfs.wire

    def handshake(
        self,
        dc: int = 2,
        tag: str | bytes = "dd",
        *,
        initial: bytes = b"",
        **hello_options: Any,
    ) -> ServerHelloInfo:
        """Full client handshake: hello, verified welcome packet, CCS, obfuscated2 frame.

        ``hello_options`` go to :meth:`send_client_hello`. Returns the welcome packet info.
        """
        self.send_client_hello(**hello_options)
        info = self.read_server_hello()
        self.send_obfs2_frame(dc, tag, initial=initial)
        return info

    def send(self, data: bytes) -> None:
        """Encrypt payload bytes and send them in ApplicationData records."""
        if self._enc is None:
            raise WireError("handshake() first")
        self.send_raw(wrap_records(self._enc.update(data), self.max_record))

    def _fill(self, want: int) -> bool:
        """Read more records until ``want`` plaintext bytes are buffered; False on EOF."""
        assert self._dec is not None
        while len(self._plain) < want:
            if self._record_left == 0 and self._skip_left == 0:
                header = self.sock.recv(5)
                if not header:
                    return False
                if len(header) < 5:
                    header += recv_exactly(self.sock, 5 - len(header))
                if header[1:3] != b"\x03\x03":
                    raise WireError(f"record version must be 03 03, got header {header.hex()}")
                length = int.from_bytes(header[3:5], "big")
                if header[0] == RECORD_APPDATA:
                    if length > MAX_RECORD_PAYLOAD:
                        raise WireError(f"record payload {length} exceeds {MAX_RECORD_PAYLOAD}")
                    self._record_left = length
                else:
                    self._skip_left = length
                continue
            if self._skip_left:
                self._skip_left -= len(recv_exactly(self.sock, self._skip_left))
                continue
            chunk = self.sock.recv(min(self._record_left, 262144))
            if not chunk:
                raise WireError(f"connection closed inside a record ({self._record_left} left)")
            self._record_left -= len(chunk)
            self._plain += self._dec.update(chunk)
        return True

    def recv_exactly(self, n: int) -> bytes:
        """Return exactly n decrypted payload bytes; WireError on EOF before that."""
        if not self._fill(n):
            raise WireError(f"connection closed with {len(self._plain)} of {n} bytes read")
        data = bytes(self._plain[:n])
        del self._plain[:n]
        return data

    def recv_some(self, max_bytes: int = 262144) -> bytes:
        """Return 1..max_bytes decrypted bytes, b"" on a clean EOF."""
        if not self._plain and not self._fill(1):
            return b""
        data = bytes(self._plain[:max_bytes])
        del self._plain[:max_bytes]
        return data

    # -- closing ------------------------------------------------------------------------
    def wait_closed(self, timeout: float = 5.0) -> str:
        """Read and discard until the proxy closes; return "eof" or "reset".

        Raises WireError if the connection is still open after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireError(f"connection still open after {timeout} s")
                self.sock.settimeout(left)
                try:
                    if not self.sock.recv(65536):
                        return "eof"
                except TimeoutError:
                    raise WireError(f"connection still open after {timeout} s") from None
        except (ConnectionResetError, BrokenPipeError):
            return "reset"

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def __enter__(self) -> FakeTLSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


T = TypeVar("T")


def run_concurrently(count: int, work: Callable[[int], T], *, max_workers: int = 64) -> list[T]:
    """Run ``work(i)`` for i in range(count) on threads; return the results in order.

    The first exception raised by any worker is re-raised here.
    """
    with ThreadPoolExecutor(max_workers=min(count, max_workers) or 1) as pool:
        futures = [pool.submit(work, i) for i in range(count)]
        return [f.result() for f in futures]
