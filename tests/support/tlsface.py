"""Loopback sites with a chosen TLS "face", for the ServerHello-shape and doctor tests.

- :class:`OpenSSLSite`: ``openssl s_server`` with a trustme certificate and chosen TLS 1.3
  suites, server preference, ChaCha20 priority, ALPN (Debian's OpenSSL 3.0 has no ML-KEM);
- :class:`RawSite`: a TCP server that reads each ClientHello and answers with bytes a
  function makes from it: a ServerHello in a chosen extension order, a HelloRetryRequest,
  garbage, nothing;
- :func:`client_hello_info` reads the groups, key shares and suites of a ClientHello;
- :func:`server_hello_answer` / :func:`retry_request` build a site's answers;
- :func:`asks_post_quantum`: a hello that lists X25519MLKEM768 without sending its share
  (what a server that prefers it answers with a HelloRetryRequest).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme

HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
MLKEM = 0x11EC
X25519 = 0x001D


@dataclass
class HelloInfo:
    session_id: bytes
    suites: list[int]
    groups: list[int]
    shares: list[int]
    alpn: bytes | None


def client_hello_info(record: bytes) -> HelloInfo:
    """What a site decides on, read from a one-record ClientHello."""
    body = record[9:]
    pos = 34
    sid = body[pos + 1 : pos + 1 + body[pos]]
    pos += 1 + body[pos]
    n = int.from_bytes(body[pos : pos + 2], "big")
    suites = [int.from_bytes(body[pos + 2 + i : pos + 4 + i], "big") for i in range(0, n, 2)]
    pos += 2 + n
    pos += 1 + body[pos]
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    groups: list[int] = []
    shares: list[int] = []
    alpn = None
    while pos < end:
        kind, length = struct.unpack_from(">HH", body, pos)
        data = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if kind == 0x000A:
            groups = [int.from_bytes(data[i : i + 2], "big") for i in range(2, len(data), 2)]
        elif kind == 0x0033:
            at = 2
            while at + 4 <= len(data):
                group, size = struct.unpack_from(">HH", data, at)
                shares.append(group)
                at += 4 + size
        elif kind == 0x0010:
            alpn = data
    return HelloInfo(sid, suites, groups, shares, alpn)


def asks_post_quantum(info: HelloInfo) -> bool:
    return MLKEM in info.groups and MLKEM not in info.shares


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">HH", kind, len(data)) + data


def server_hello_record(
    session_id: bytes,
    suite: int,
    extensions: Sequence[tuple[int, bytes]],
    random: bytes | None = None,
) -> bytes:
    exts = b"".join(_ext(kind, data) for kind, data in extensions)
    body = (
        b"\x03\x03"
        + (random if random is not None else os.urandom(32))
        + bytes((len(session_id),))
        + session_id
        + struct.pack(">HB", suite, 0)
        + struct.pack(">H", len(exts))
        + exts
    )
    message = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + struct.pack(">H", len(message)) + message


def server_hello_answer(
    record: bytes,
    *,
    order: Sequence[int] = (0x002B, 0x0033),
    extra: Sequence[tuple[int, bytes]] = (),
    suite: int | None = None,
    encrypted: Sequence[int] = (2800,),
) -> bytes:
    """A TLS 1.3 site's first flight: ServerHello (x25519 share, extensions in ``order``
    with ``extra`` appended), CCS, and ApplicationData records of ``encrypted`` sizes."""
    info = client_hello_info(record)
    values = {0x002B: b"\x03\x04", 0x0033: b"\x00\x1d\x00\x20" + os.urandom(32)}
    chosen = suite or next(s for s in info.suites if s in (0x1301, 0x1302, 0x1303))
    hello = server_hello_record(
        info.session_id, chosen, [(kind, values[kind]) for kind in order] + list(extra)
    )
    flight = b"".join(b"\x17\x03\x03" + struct.pack(">H", n) + os.urandom(n) for n in encrypted)
    return hello + b"\x14\x03\x03\x00\x01\x01" + flight


def retry_request(record: bytes, group: int = MLKEM) -> bytes:
    """A HelloRetryRequest asking for ``group``."""
    info = client_hello_info(record)
    suite = next(s for s in info.suites if s in (0x1301, 0x1302, 0x1303))
    extensions = [(0x002B, b"\x03\x04"), (0x0033, struct.pack(">H", group))]
    return server_hello_record(info.session_id, suite, extensions, HRR_RANDOM) + (
        b"\x14\x03\x03\x00\x01\x01"
    )


def read_record(sock: socket.socket) -> bytes:
    """One whole TLS record (or what came before the peer closed)."""
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        if data and data[0] != 0x16:
            return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


class RawSite:
    """Accepts on 127.0.0.1; for each connection reads the first record and sends
    ``answer(record)`` (None: send nothing), then holds the connection until the peer
    closes. ``records`` keeps what each connection sent first."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.records: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._socks: list[socket.socket] = []
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError), sock:
            sock.settimeout(None)
            record = read_record(sock)
            self.records.append(record)
            reply = self.answer(record)
            if reply:
                sock.sendall(reply)
            while sock.recv(65536):
                pass

    def close(self) -> None:
        self._stop.set()
        for sock in list(self._socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> RawSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSSLSite:
    """``openssl s_server`` on 127.0.0.1 with a certificate for ``hostname`` from ``ca``."""

    def __init__(
        self,
        ca: trustme.CA,
        workdir: Path,
        hostname: str,
        *,
        ciphersuites: str | None = None,
        server_preference: bool = False,
        prioritize_chacha: bool = False,
        alpn: str | None = None,
    ) -> None:
        cert = ca.issue_cert(hostname)
        cert_file, key_file = workdir / "site-cert.pem", workdir / "site-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        command = ["stdbuf", "-oL", "openssl", "s_server", "-accept", "127.0.0.1:0"]
        command += ["-cert", str(cert_file), "-key", str(key_file), "-tls1_3", "-www"]
        if ciphersuites:
            command += ["-ciphersuites", ciphersuites]
        if server_preference:
            command.append("-serverpref")
        if prioritize_chacha:
            command.append("-prioritize_chacha")
        if alpn:
            command += ["-alpn", alpn]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        self.port = 0
        for line in self.process.stdout:  # "ACCEPT 127.0.0.1:PORT" once it listens
            if line.startswith(b"ACCEPT "):
                self.port = int(line.split(b":")[-1])
                break
        if not self.port:
            raise RuntimeError(f"openssl s_server did not start: {self.process.wait()}")
        # keep reading its output so that it never blocks on a full pipe
        self._drain = threading.Thread(target=self.process.stdout.read, daemon=True)
        self._drain.start()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self._drain.join(5)

    def __enter__(self) -> OpenSSLSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
