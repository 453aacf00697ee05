"""doctor's section 7: probe a running proxy as a Telegram client and as a censor would.

As a client: a FakeTLS handshake with the secret (the ServerHello must carry the HMAC of
the secret, docs/protocol.md §3.7), then the obfuscated2 frame for a DC and an MTProto
``req_pq_multi`` whose answer comes back from the DC through the proxy.

As a censor: a TLS client with the secret's SNI but no secret, a random SNI, no SNI, plain
HTTP and a FakeTLS hello signed with a wrong key. Each goes to the proxy and, for
comparison, straight to the fronting website. What a censor must see from the proxy is
the website: its certificate (good), or a TLS alert (acceptable); a reset, a hang or an
answer the website does not give is the proxy's own signature (bad). Last, the client's
hello goes to the website too and the two answers are compared side by side (``faceoff``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mtgworkers.doctor import faceoff
from mtgworkers.doctor import faketls_client as ftc
from mtgworkers.doctor.checks import Context, close_quietly, open_fronting
from mtgworkers.doctor.report import Section, Status
from mtgworkers.doctor.tlsclient import (
    Observation,
    RawResult,
    certificate_summary,
    classify_tls_error,
    raw_exchange,
    tls_handshake,
)
from mtgworkers.netaddr import join_host_port

__all__ = ["PROBE_DC", "check_probe", "judge", "probe_target"]

PROBE_DC = 2
Opener = Callable[[], Awaitable[socket.socket]]


def probe_target(host: str, port: int) -> tuple[str, int]:
    """Where to reach a proxy bound to ``host:port`` from this host (0.0.0.0 -> 127.0.0.1)."""
    if host == "0.0.0.0":
        return "127.0.0.1", port
    if host == "::":
        return "::1", port
    return host, port


async def _connect(host: str, port: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _why(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


# -- the client probe ----------------------------------------------------------------------


class _Unwrapper:
    """TLS records in, decrypted ApplicationData payload out (the proxy -> client stream)."""

    def __init__(self, decrypt: Callable[[bytes], bytes]) -> None:
        self.buffer = bytearray()
        self.decrypt = decrypt

    def __call__(self, chunk: bytes) -> bytes:
        self.buffer += chunk
        records, used = ftc.split_records(self.buffer)
        del self.buffer[:used]
        return b"".join(
            self.decrypt(r.payload) for r in records if r.type == ftc.RECORD_APPLICATION_DATA
        )


def _hello_done(data: bytes) -> bool:
    if data and not ftc.looks_like_tls(data):
        return True
    records, _ = ftc.split_records(data)
    return len(records) >= 3 or any(r.type != ftc.RECORD_HANDSHAKE for r in records[:1])


def _describe_end(result: RawResult, timeout: float) -> str:
    if result.end == "eof":
        return "the proxy closed the connection"
    if result.end == "reset":
        return "the proxy reset the connection"
    return f"no answer within {timeout:g}s"


async def _client_probe(
    ctx: Context, host: str, port: int, section: Section, compare: Section
) -> None:
    """The FakeTLS and DC lines go to ``section``; the side-by-side with the fronting
    website's answer to the same hello goes to ``compare``."""
    key, name = ctx.config.secret.key, ctx.config.secret.host
    try:
        sock = await _connect(host, port, ctx.timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        section.add(Status.FAILURE, f"FakeTLS handshake: cannot connect: {_why(exc)}")
        return
    try:
        started = time.monotonic()
        hello = ftc.build_client_hello(key, name, ctx.clock())
        answer = await raw_exchange(sock, hello.record, _hello_done, ctx.timeout)
        records, _ = ftc.split_records(answer.data)
        if not ftc.verify_server_hello(records, key, hello.random):
            section.add(Status.FAILURE, _bad_hello(records, answer, ctx.timeout))
            return
        noise = len(records[2].payload)
        section.add(
            Status.OK,
            f"FakeTLS handshake with the secret accepted: ServerHello signed with the secret, "
            f"{noise} bytes of noise ({_ms(time.monotonic() - started)})",
            noise=noise,
            seconds=time.monotonic() - started,
        )

        async def to_website() -> socket.socket:
            return await open_fronting(ctx)

        await asyncio.gather(
            _dc_probe(ctx, sock, section),
            faceoff.compare(hello.record, answer.data, to_website, name, ctx.timeout, compare),
        )
    finally:
        close_quietly(sock)


def _bad_hello(records: list[ftc.Record], answer: RawResult, timeout: float) -> str:
    prefix = "FakeTLS handshake with the secret failed: "
    if records and records[0].type == ftc.RECORD_HANDSHAKE:
        return (
            prefix + "the answer is not signed with the secret: the proxy took the probe for "
            "a stranger and sent it to the fronting website (another secret? clock skew? its "
            "log says 'cannot read client hello')"
        )
    if records and records[0].type == ftc.RECORD_ALERT:
        return prefix + "the proxy answered with a TLS alert"
    if answer.data:
        return prefix + f"the answer is not TLS ({len(answer.data)} bytes)"
    return prefix + _describe_end(answer, timeout)


async def _dc_probe(ctx: Context, sock: socket.socket, section: Section) -> None:
    key = ctx.config.secret.key
    frame, encryptor, decryptor = ftc.client_frame(key, PROBE_DC)
    nonce = os.urandom(16)
    message = ftc.req_pq_multi(ctx.clock(), nonce, os.urandom(secrets.randbelow(16)))
    # The client's ChangeCipherSpec comes first, as Telegram clients send it.
    payload = b"\x14\x03\x03\x00\x01\x01" + ftc.wrap_application_data(
        frame + encryptor.update(message)
    )
    started = time.monotonic()
    result = await raw_exchange(
        sock,
        payload,
        lambda plain: ftc.read_answer(plain, nonce) is not None,
        ctx.timeout,
        on_data=_Unwrapper(decryptor.update),
    )
    elapsed = time.monotonic() - started
    answer = ftc.read_answer(result.data, nonce)
    if answer is not None:
        section.add(
            Status.OK,
            f"DC {PROBE_DC} answered through the proxy: {answer} ({_ms(elapsed)})",
            dc=PROBE_DC,
            answer=answer,
            seconds=elapsed,
        )
    elif result.end in ("eof", "reset"):
        section.add(
            Status.FAILURE,
            f"DC {PROBE_DC}: {_describe_end(result, ctx.timeout)} after the obfuscated2 frame: "
            "it could not reach the DC (its log says 'cannot dial to telegram')",
            dc=PROBE_DC,
        )
    else:
        section.add(
            Status.WARNING,
            f"DC {PROBE_DC}: no answer within {ctx.timeout:g}s, but the connection stays up",
            dc=PROBE_DC,
        )


# -- censor probes -------------------------------------------------------------------------


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def _observe(
    open_socket: Opener, probe: Callable[[socket.socket], Awaitable[Observation]]
) -> Observation:
    try:
        sock = await open_socket()
    except (OSError, asyncio.TimeoutError) as exc:
        return Observation("unreachable", f"cannot connect: {_why(exc)}")
    try:
        return await probe(sock)
    finally:
        close_quietly(sock)


def _tls_probe(
    sni: str | None, timeout: float
) -> Callable[[socket.socket], Awaitable[Observation]]:
    async def probe(sock: socket.socket) -> Observation:
        try:
            result = await tls_handshake(sock, _unverified_context(), sni, timeout)
        except (OSError, asyncio.TimeoutError, EOFError) as exc:
            return classify_tls_error(exc, timeout)
        fingerprint, subject, _ = certificate_summary(result.certificate)
        return Observation("certificate", f"certificate {subject}", fingerprint, subject)

    return probe


def _raw_observation(result: RawResult, timeout: float) -> Observation | None:
    if result.data:
        return None
    if result.end == "eof":
        return Observation("closed", "connection closed without an answer")
    if result.end == "reset":
        return Observation("reset", "connection reset")
    return Observation("hang", f"no answer within {timeout:g}s")


def _http_done(data: bytes) -> bool:
    if ftc.looks_like_tls(data):
        return bool(ftc.split_records(data)[0])
    return b"\n" in data or len(data) >= 1024


def _http_probe(host: str, timeout: float) -> Callable[[socket.socket], Awaitable[Observation]]:
    request = (
        f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
    ).encode()

    async def probe(sock: socket.socket) -> Observation:
        result = await raw_exchange(sock, request, _http_done, timeout)
        seen = _raw_observation(result, timeout)
        if seen is not None:
            return seen
        data = result.data
        if data.startswith(b"HTTP/"):
            line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
            return Observation("http", "HTTP answer " + line.decode("latin-1")[:80])
        records, _ = ftc.split_records(data)
        if records and records[0].type == ftc.RECORD_ALERT:
            return Observation("alert", "TLS alert record")
        return Observation("bytes", f"{len(data)} bytes starting {data[:8].hex()}")

    return probe


def _wrong_key_probe(
    ctx: Context, timeout: float
) -> Callable[[socket.socket], Awaitable[Observation]]:
    real_key, name = ctx.config.secret.key, ctx.config.secret.host

    async def probe(sock: socket.socket) -> Observation:
        hello = ftc.build_client_hello(os.urandom(16), name, ctx.clock())
        result = await raw_exchange(sock, hello.record, _hello_done, timeout)
        records, _ = ftc.split_records(result.data)
        if ftc.verify_server_hello(records, real_key, hello.random):
            return Observation("faketls", "the proxy accepted a hello signed with another key")
        if records and records[0].type == ftc.RECORD_HANDSHAKE:
            payload = records[0].payload
            if payload[:1] == bytes((ftc.HANDSHAKE_SERVER_HELLO,)):
                return Observation("server-hello", "a TLS ServerHello")
        if records and records[0].type == ftc.RECORD_ALERT:
            return Observation("alert", "TLS alert record")
        seen = _raw_observation(result, timeout)
        if seen is not None:
            return seen
        return Observation("not-tls", f"{len(result.data)} bytes that are not TLS")

    return probe


def judge(name: str, proxy: Observation, website: Observation) -> tuple[Status, str]:
    """The verdict on what a censor saw from the proxy, given what the website shows."""
    if proxy.kind == "faketls":
        return Status.FAILURE, f"{name}: {proxy.detail}"
    if proxy.kind == "certificate":
        if website.kind == "certificate" and proxy.fingerprint == website.fingerprint:
            short = (proxy.fingerprint or "")[:16]
            return (
                Status.OK,
                f"{name}: sees the fronting website's certificate ({proxy.subject}, "
                f"sha256 {short}...)",
            )
        if website.kind == "certificate":
            return (
                Status.FAILURE,
                f"{name}: sees a certificate ({proxy.subject}) that is not the fronting "
                f"website's ({website.subject})",
            )
        return (
            Status.WARNING,
            f"{name}: sees a certificate ({proxy.subject}), but the fronting website could "
            f"not be asked directly to compare: {website.detail}",
        )
    if proxy.kind == "server-hello":
        return Status.OK, f"{name}: sees the fronting website's TLS ServerHello"
    if proxy.kind == "alert":
        return (
            Status.OK,
            f"{name}: sees a TLS alert ({proxy.detail}): acceptable, TLS servers answer "
            "some clients so",
        )
    if proxy.kind == website.kind and proxy.detail == website.detail:
        return Status.OK, f"{name}: same as the fronting website: {proxy.detail}"
    if website.kind == "unreachable":
        return (
            Status.FAILURE,
            f"{name}: {proxy.detail}; the fronting website is unreachable from here "
            f"({website.detail}), so the proxy cannot hide behind it",
        )
    return (
        Status.FAILURE,
        f"{name}: {proxy.detail}, while the fronting website answers: {website.detail}",
    )


@dataclass(frozen=True)
class _CensorProbe:
    name: str
    make: Callable[[], Callable[[socket.socket], Awaitable[Observation]]]


async def _censor_probes(
    ctx: Context, host: str, port: int
) -> list[tuple[str, Observation, Observation]]:
    timeout = ctx.timeout
    secret_host = ctx.config.secret.host
    random_host = secrets.token_hex(5) + ".com"
    probes = [
        _CensorProbe(
            f"wrong secret (TLS client, SNI {secret_host})",
            lambda: _tls_probe(secret_host, timeout),
        ),
        _CensorProbe(f"random SNI ({random_host})", lambda: _tls_probe(random_host, timeout)),
        _CensorProbe("no SNI", lambda: _tls_probe(None, timeout)),
        _CensorProbe("plain HTTP", lambda: _http_probe(secret_host, timeout)),
        _CensorProbe("FakeTLS hello with a wrong key", lambda: _wrong_key_probe(ctx, timeout)),
    ]

    async def to_proxy() -> socket.socket:
        return await _connect(host, port, timeout)

    async def to_website() -> socket.socket:
        return await open_fronting(ctx)

    observations = await asyncio.gather(
        *(_observe(opener, probe.make()) for probe in probes for opener in (to_proxy, to_website))
    )
    return [
        (probe.name, observations[2 * index], observations[2 * index + 1])
        for index, probe in enumerate(probes)
    ]


async def check_probe(
    ctx: Context, section: Section, target: tuple[str, int], *, required: bool
) -> None:
    """Probe the proxy at ``target``. Without ``required``, a proxy that does not answer
    there makes the section a skipped (informational) one instead of a failure."""
    host, port = target
    shown = join_host_port(host, port)
    try:
        sock = await _connect(host, port, min(ctx.timeout, 2.0))
    except (OSError, asyncio.TimeoutError) as exc:
        if required:
            section.add(Status.FAILURE, f"nothing answers on {shown}: {_why(exc)}", address=shown)
        else:
            section.add(
                Status.INFO,
                f"Skipped: nothing answers on {shown} ({_why(exc)}); start the proxy, or run "
                "with --probe to require this check",
                address=shown,
            )
        return
    close_quietly(sock)
    client = Section(section.key, section.title)
    side_by_side = Section(section.key, section.title)
    _, censor = await asyncio.gather(
        _client_probe(ctx, host, port, client, side_by_side), _censor_probes(ctx, host, port)
    )
    section.checks.extend(client.checks)
    for name, proxy_seen, website_seen in censor:
        status, message = judge(name, proxy_seen, website_seen)
        section.add(
            status,
            message,
            probe=name,
            proxy={"kind": proxy_seen.kind, "detail": proxy_seen.detail},
            website={"kind": website_seen.kind, "detail": website_seen.detail},
        )
    section.checks.extend(side_by_side.checks)
