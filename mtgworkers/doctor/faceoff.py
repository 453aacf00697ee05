"""doctor's side-by-side: the proxy's FakeTLS answer next to the fronting website's answer
to the same ClientHello, as a censor that sends one hello to both would compare them.

Part of the self-probe (section 7). Lines, each ``proxy … | website …``:

- **records**: the types and lengths of what each sent first (ServerHello, ChangeCipherSpec,
  then the encrypted handshake); the ServerHello sizes must match;
- **cipher suite** and **ServerHello extensions** (order, key share group): must match;
  the proxy copies them once it has learned the site's shape, and answers the client's
  first suite with supported_versions, key_share before that;
- **encrypted handshake**: the proxy's one ApplicationData record against the site's
  encrypted handshake (certificates, signature, Finished; measured with a real TLS
  handshake). Expected to differ: the proxy's length is random around the learned mean
  (2500..4699 bytes until the site is measured) and Telegram clients read exactly one
  record; information only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mtgworkers.defense import doppel
from mtgworkers.defense.shape import ask_server_hello
from mtgworkers.doctor import faketls_client as ftc
from mtgworkers.doctor.report import Section, Status
from mtgworkers.doctor.tlsclient import tls_handshake
from mtgworkers.protocol import serverhello as sh

__all__ = ["Face", "compare", "face_of", "measure_flight"]

_NAMES = {0x14: "ChangeCipherSpec", 0x15: "Alert", 0x16: "Handshake", 0x17: "ApplicationData"}
Opener = Callable[[], Awaitable[socket.socket]]


@dataclass(frozen=True)
class Face:
    """One side's first answer: its ServerHello and the records (type, payload length)."""

    hello: sh.ServerHello
    records: tuple[tuple[int, int], ...]

    @property
    def extensions(self) -> list[str]:
        """``["supported_versions", "key_share(x25519)"]``"""
        out = []
        for kind, _ in self.hello.extensions:
            name = sh.extension_name(kind)
            if kind == sh.EXT_KEY_SHARE:
                name += f"({sh.group_name(self.hello.group)})"
            out.append(name)
        return out

    @property
    def suite(self) -> str:
        return sh.suite_name(self.hello.cipher_suite)


def face_of(data: bytes) -> Face:
    """The face in the bytes a side sent first. Raises ServerHelloError."""
    parsed = sh.parse_server_hello(data)
    if parsed is None:
        raise sh.ServerHelloError(f"an incomplete ServerHello ({len(data)} bytes)")
    records, _ = ftc.split_records(data)
    return Face(parsed[0], tuple((r.type, len(r.payload)) for r in records))


def _layout(records: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> str:
    """``Handshake 122, ChangeCipherSpec 1, ApplicationData 23+596+95+69``"""
    parts: list[tuple[str, list[int]]] = []
    for rtype, length in records:
        name = _NAMES.get(rtype, f"{rtype:#04x}")
        if parts and parts[-1][0] == name:
            parts[-1][1].append(length)
        else:
            parts.append((name, [length]))
    return ", ".join(f"{name} {'+'.join(map(str, sizes))}" for name, sizes in parts)


async def measure_flight(
    open_socket: Opener, server_name: str, timeout: float
) -> list[tuple[int, int]]:
    """The records (type, length) of the site's first flight to a real TLS client, up to
    its Finished. Raises OSError, ssl.SSLError, EOFError or TimeoutError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    received = bytearray()
    sock = await open_socket()
    try:
        await tls_handshake(sock, context, server_name, timeout, received=received)
    finally:
        sock.close()
    records, _ = ftc.split_records(received)
    return [(r.type, len(r.payload)) for r in records]


def _why(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


async def compare(
    hello_record: bytes,
    proxy_answer: bytes,
    open_website: Opener,
    server_name: str,
    timeout: float,
    section: Section,
) -> None:
    """Add the side-by-side lines: the proxy's ``proxy_answer`` to ``hello_record`` against
    the website's answer to the very same bytes (``open_website()`` connects to it)."""
    prefix = "side by side with the fronting website (same ClientHello)"
    try:
        proxy = face_of(proxy_answer)
    except sh.ServerHelloError as exc:
        section.add(Status.ERROR, f"{prefix}: cannot read the proxy's answer: {exc}")
        return
    try:
        sock = await open_website()
    except (OSError, asyncio.TimeoutError) as exc:
        section.add(
            Status.ERROR,
            f"{prefix}: cannot compare: the fronting website is unreachable: {_why(exc)}",
        )
        return
    try:
        _, data = await asyncio.wait_for(ask_server_hello(sock, hello_record), timeout)
        website = face_of(data)
    except (OSError, asyncio.TimeoutError, sh.ServerHelloError) as exc:
        section.add(
            Status.ERROR,
            f"{prefix}: cannot compare: the fronting website does not answer the same "
            f"ClientHello with a ServerHello: {_why(exc)}",
        )
        return
    finally:
        sock.close()
    try:
        flight: list[tuple[int, int]] | None = await measure_flight(
            open_website, server_name, timeout
        )
    except (OSError, asyncio.TimeoutError, EOFError):
        flight = None
    _records_line(section, proxy, website, flight)
    _same_line(
        section,
        "cipher suite",
        proxy.suite,
        website.suite,
        "the proxy picks the site's suite once it has learned the site's ServerHello "
        "(until then: the client's first suite)",
    )
    _same_line(
        section,
        "ServerHello extensions",
        ", ".join(proxy.extensions),
        ", ".join(website.extensions),
        "the proxy copies the site's order once it has learned it; its key share is always "
        "x25519 (never a synthetic post-quantum share)",
    )
    _noise_line(section, proxy, flight)


def _records_line(
    section: Section, proxy: Face, website: Face, flight: list[tuple[int, int]] | None
) -> None:
    # the same-hello answer's ServerHello and CCS, then the encrypted flight as measured
    shown = list(website.records[:2])
    if flight is not None:
        after = next((i for i, (t, _) in enumerate(flight) if t == doppel.CHANGE_CIPHER_SPEC), None)
        shown += flight[after + 1 :] if after is not None else []
    else:
        shown = list(website.records)
    same = proxy.records[:2] == website.records[:2]
    status = Status.OK if same else Status.WARNING
    note = "" if same else " (the ServerHello records differ)"
    section.add(
        status,
        f"records: proxy {_layout(proxy.records)} | website {_layout(shown)}{note}",
        aspect="records",
        proxy=[list(r) for r in proxy.records],
        website=[list(r) for r in shown],
        expected=same,
    )


def _same_line(section: Section, aspect: str, ours: str, theirs: str, hint: str) -> None:
    key = aspect.lower().replace(" ", "_")
    if ours == theirs:
        section.add(
            Status.OK,
            f"{aspect}: proxy {ours} | website {theirs}",
            aspect=key,
            proxy=ours,
            website=theirs,
            expected=True,
        )
        return
    section.add(
        Status.WARNING,
        f"{aspect}: proxy {ours} | website {theirs}: a censor that compares them tells the "
        f"proxy from the site; {hint}",
        aspect=key,
        proxy=ours,
        website=theirs,
        expected=False,
    )


def _noise_line(section: Section, proxy: Face, flight: list[tuple[int, int]] | None) -> None:
    noise = [length for rtype, length in proxy.records[2:] if rtype == doppel.APPLICATION_DATA]
    figures: dict[str, Any] = {"aspect": "encrypted_handshake", "expected": True}
    ours = f"{len(noise)} record of {sum(noise)} bytes" if len(noise) == 1 else f"{noise}"
    if flight is None:
        section.add(
            Status.INFO,
            f"encrypted handshake: proxy {ours} | website not measured (no TLS handshake)",
            **figures,
            proxy=sum(noise),
            website=None,
        )
        return
    records = [doppel.Record(rtype, length, 0.0) for rtype, length in flight]
    size = doppel.handshake_size(records, None)
    count = sum(
        1
        for index, (rtype, _) in enumerate(flight)
        if rtype == doppel.APPLICATION_DATA
        and any(t == doppel.CHANGE_CIPHER_SPEC for t, _ in flight[:index])
    )
    section.add(
        Status.INFO,
        f"encrypted handshake: proxy {ours} | website {size} bytes in {count} records: "
        "expected to differ; the proxy's length is random around the learned mean of the "
        "site's (2500..4699 bytes until the site is measured) and Telegram clients read "
        "exactly one record",
        **figures,
        proxy=sum(noise),
        website=size,
        website_records=count,
    )
