"""Talking to a peer the way doctor needs: a TLS handshake and raw exchanges that say
exactly how they ended (answer, TLS alert, end of stream, reset, silence).

asyncio's TLS streams fold a reset, an end of stream and a protocol error into similar
exceptions; doctor has to tell them apart (a censor does), so the TLS client here runs
``ssl.SSLObject`` over memory buffers on a plain non-blocking socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = [
    "Observation",
    "TLSResult",
    "certificate_summary",
    "classify_tls_error",
    "raw_exchange",
    "tls_handshake",
]

_READ = 65536


@dataclass(frozen=True)
class Observation:
    """What a client saw. ``kind`` is one of: ``certificate`` (TLS handshake completed),
    ``alert`` (a TLS alert), ``server-hello`` (a TLS ServerHello to a hand-made hello),
    ``faketls`` (the proxy's signed answer), ``http`` (an HTTP answer), ``bytes`` (other
    bytes), ``closed`` (end of stream), ``reset`` (connection reset), ``hang`` (no answer
    in time), ``not-tls`` (bytes that are not TLS), ``unreachable`` (no connection)."""

    kind: str
    detail: str
    fingerprint: str | None = None  # SHA-256 of the leaf certificate (hex), for comparison
    subject: str | None = None


@dataclass(frozen=True)
class TLSResult:
    """A completed handshake."""

    version: str
    alpn: str | None
    certificate: bytes  # DER of the leaf certificate
    seconds: float


def _alert_name(exc: ssl.SSLError) -> str | None:
    reason = exc.reason or ""
    if "ALERT" in reason or reason == "TLSV1_UNRECOGNIZED_NAME":
        name = reason.split("ALERT_", 1)[-1] if "ALERT_" in reason else reason
        return name.lower().replace("tlsv1_", "")
    return None


def classify_tls_error(exc: BaseException, timeout: float) -> Observation:
    """An Observation for an exception raised by :func:`tls_handshake`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Observation("bad-certificate", exc.verify_message or str(exc))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Observation("hang", f"no answer within {timeout:g}s")
    if isinstance(exc, ConnectionResetError):
        return Observation("reset", "connection reset")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, EOFError)):
        return Observation("closed", "connection closed without a TLS answer")
    if isinstance(exc, ssl.SSLError):
        alert = _alert_name(exc)
        if alert is not None:
            return Observation("alert", f"TLS alert {alert}")
        return Observation("not-tls", f"not TLS ({exc.reason or exc})")
    if isinstance(exc, OSError):
        return Observation("reset", exc.strerror or str(exc))
    return Observation("not-tls", f"{type(exc).__name__}: {exc}")


async def tls_handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_name: str | None,
    timeout: float,
    *,
    received: bytearray | None = None,
) -> TLSResult:
    """Run a TLS client handshake on the connected non-blocking ``sock``.

    ``received``, when given, collects every byte the server sent until the handshake
    was complete (its whole first flight, for measuring it).

    ``server_name``: SNI and the name to verify (None: no SNI; ``context`` must then not
    check host names). Raises ssl.SSLError (SSLCertVerificationError for certificate
    problems; an alert's name is in ``reason``), ConnectionResetError, EOFError (the peer
    closed without an answer) or TimeoutError after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    started = time.monotonic()

    async def run() -> None:
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    await loop.sock_sendall(sock, pending)
                data = await loop.sock_recv(sock, _READ)
                if data:
                    incoming.write(data)
                    if received is not None:
                        received.extend(data)
                else:
                    incoming.write_eof()
                continue
            except ssl.SSLError:
                pending = outgoing.read()  # our alert (e.g. bad certificate) goes out
                if pending:
                    try:
                        await loop.sock_sendall(sock, pending)
                    except OSError:
                        pass
                raise
            pending = outgoing.read()
            if pending:
                await loop.sock_sendall(sock, pending)
            return

    await asyncio.wait_for(run(), timeout)
    der = tls.getpeercert(binary_form=True) or b""
    return TLSResult(
        version=tls.version() or "unknown",
        alpn=tls.selected_alpn_protocol(),
        certificate=der,
        seconds=time.monotonic() - started,
    )


def certificate_summary(der: bytes) -> tuple[str, str, dict[str, str]]:
    """(fingerprint hex, short subject, details) of a DER certificate."""
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return fingerprint, "unparsable certificate", {}
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = f"CN={names[0].value!s}" if names else cert.subject.rfc4514_string() or "no subject"
    issuer_names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(issuer_names[0].value) if issuer_names else cert.issuer.rfc4514_string()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = ", ".join(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ""
    details = {
        "subject": subject,
        "issuer": issuer,
        "dns_names": dns_names,
        "not_after": _not_after(cert),
        "sha256": fingerprint,
    }
    return fingerprint, subject, details


def _not_after(cert: x509.Certificate) -> str:
    # not_valid_after_utc appeared in cryptography 42; the package allows 41.
    value = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    return str(value.isoformat())


@dataclass(frozen=True)
class RawResult:
    """What came back after a raw send: the bytes, and how the read ended:
    ``enough`` (``want`` was satisfied), ``eof``, ``reset`` or ``timeout``."""

    data: bytes
    end: str


async def raw_exchange(
    sock: socket.socket,
    send: bytes,
    want: Callable[[bytes], bool],
    timeout: float,
    *,
    on_data: Callable[[bytes], bytes] | None = None,
) -> RawResult:
    """Send ``send`` on the connected non-blocking ``sock``, then read until ``want(data)``
    is true, the peer closes or resets, or ``timeout`` seconds pass. ``on_data`` may
    transform each chunk (e.g. TLS unwrapping and decryption) before it is collected.
    Never raises for network failures.
    """
    loop = asyncio.get_running_loop()
    data = bytearray()

    async def run() -> str:
        if send:
            await loop.sock_sendall(sock, send)
        while not want(bytes(data)):
            chunk = await loop.sock_recv(sock, _READ)
            if not chunk:
                return "eof"
            data.extend(on_data(chunk) if on_data is not None else chunk)
        return "enough"

    try:
        end = await asyncio.wait_for(run(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        end = "timeout"
    except OSError:
        end = "reset"
    return RawResult(bytes(data), end)
