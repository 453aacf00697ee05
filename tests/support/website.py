"""A local TLS "fronting website" with a trustme certificate, plus an HTTPS test client.

The website records the raw bytes every connection receives (so a test can compare them
byte for byte with what a client sent to the proxy) and terminates TLS itself with
``ssl.MemoryBIO``/``SSLObject``. Once TLS is up it answers every HTTP/1.1 request with
:data:`BODY`. If the bytes are not TLS (garbage, or a FakeTLS hello it cannot accept) it
stops speaking TLS but keeps reading and recording until the peer closes.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import trustme

from tests.support.tlsface import asks_post_quantum, client_hello_info, retry_request

HOSTNAME = "fronting.test"
BODY = b"hello from the fronting website\n"


@dataclass
class SiteConnection:
    """One connection accepted by the website."""

    index: int
    peer: tuple[str, int]
    received: bytearray = field(default_factory=bytearray)
    sni: str | None = None
    tls_established: bool = False
    tls_error: str | None = None
    requests: list[bytes] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


def _response(body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class Website:
    """TLS website on 127.0.0.1 serving ``hostname`` with a certificate from ``ca``."""

    def __init__(
        self,
        ca: trustme.CA,
        hostname: str = HOSTNAME,
        *,
        body: bytes = BODY,
        host: str = "127.0.0.1",
        cert: trustme.LeafCert | None = None,
        alpn: list[str] | None = None,
        server_preference: bool = True,
        post_quantum: bool = False,
    ) -> None:
        """``alpn``: protocols to choose from (default: no ALPN); ``server_preference``:
        pick the cipher suite in OpenSSL's order (Python's default) rather than the
        client's; ``post_quantum``: answer a ClientHello that offers X25519MLKEM768 without
        its key share with a HelloRetryRequest for it, as a server preferring it does
        (Python's ssl cannot negotiate it; such a connection then only records)."""
        self.ca = ca
        self.post_quantum = post_quantum
        self.hostname = hostname
        self.body = body
        self.host = host
        self.port = 0
        # ``cert``: a certificate (and its chain) made by the caller, e.g. under intermediates
        self._cert = cert or ca.issue_cert(hostname)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._cert.configure_cert(self._ctx)
        if alpn:
            self._ctx.set_alpn_protocols(alpn)
        if not server_preference:
            self._ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        self._local = threading.local()
        self._ctx.sni_callback = self._on_sni
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connections: list[SiteConnection] = []
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()

    def _on_sni(self, _obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.sni = name

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> int:
        """Listen on host:0, start the accept thread, return the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(128)
        listener.settimeout(0.1)  # lets the accept loop notice stop()
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        thread = threading.Thread(target=self._accept_loop, name="website", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self.port

    def stop(self) -> None:
        """Stop accepting, cut every connection, join the threads."""
        self._stopping.set()
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> Website:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection ---------------------------------------------------------------------
    @property
    def connections(self) -> list[SiteConnection]:
        """Snapshot of all connections accepted so far."""
        with self._lock:
            return list(self._connections)

    def wait_for_bytes(self, index: int, count: int, timeout: float = 5.0) -> SiteConnection:
        """Wait until connection ``index`` exists and received >= ``count`` bytes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if len(self._connections) > index:
                    conn = self._connections[index]
                    if len(conn.received) >= count:
                        return conn
                left = deadline - time.monotonic()
                if left <= 0:
                    got = (
                        len(self._connections[index].received)
                        if len(self._connections) > index
                        else None
                    )
                    raise TimeoutError(
                        f"website: connection #{index} did not get {count} bytes in {timeout} s "
                        f"(connections={len(self._connections)}, received={got})"
                    )
                self._changed.wait(left)

    def wait_closed(self, index: int, timeout: float = 5.0) -> SiteConnection:
        """Wait until connection ``index`` exists and has ended."""
        conn = self.wait_for_bytes(index, 0, timeout)
        if not conn.closed.wait(timeout):
            raise TimeoutError(f"website: connection #{index} still open after {timeout} s")
        return conn

    # -- serving ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._changed:
                conn = SiteConnection(len(self._connections), peer[:2])
                self._connections.append(conn)
                self._sockets.add(sock)
                self._changed.notify_all()
            thread = threading.Thread(
                target=self._serve, args=(sock, conn), name=f"website-{conn.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: SiteConnection) -> None:
        self._local.conn = conn
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls: ssl.SSLObject | None = self._ctx.wrap_bio(incoming, outgoing, server_side=True)
        request = bytearray()
        peek = self.post_quantum
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                with self._changed:
                    conn.received += data
                    self._changed.notify_all()
                if peek:
                    first = bytes(conn.received)
                    short = len(first) < 5 or len(first) < 5 + int.from_bytes(first[3:5], "big")
                    if short and first[:1] == b"\x16":
                        continue  # the rest of the first record is yet to come
                    peek = False
                    if first[:1] == b"\x16" and asks_post_quantum(client_hello_info(first)):
                        sock.sendall(retry_request(first))
                        tls = None
                    else:
                        data = first
                if tls is None:
                    continue
                incoming.write(data)
                try:
                    self._advance(tls, conn, request)
                except ssl.SSLError as exc:
                    conn.tls_error = f"{type(exc).__name__}: {exc}"
                    tls = None  # not TLS (or not acceptable): just keep recording
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)
        except OSError:
            pass
        finally:
            with self._changed:
                self._sockets.discard(sock)
                conn.closed.set()
                self._changed.notify_all()
            sock.close()

    def _advance(self, tls: ssl.SSLObject, conn: SiteConnection, request: bytearray) -> None:
        if not conn.tls_established:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                return
            conn.tls_established = True
        while True:
            try:
                data = tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return
            if not data:
                return
            request += data
            while b"\r\n\r\n" in request:
                head, _, rest = bytes(request).partition(b"\r\n\r\n")
                request[:] = rest
                conn.requests.append(head)
                tls.write(_response(self.body))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client SSLContext that trusts only ``ca`` and checks host names."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class HttpsResult:
    """Outcome of :func:`https_get`."""

    status_line: bytes
    body: bytes
    sent: bytes  # every raw byte the client wrote to the socket
    peer_cert: dict[str, Any] | None


def _read_http_response(read: Any) -> tuple[bytes, bytes]:
    """Read one HTTP/1.1 response with Content-Length using ``read()`` -> bytes."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = read()
        if not chunk:
            raise ConnectionError(f"connection closed inside the HTTP head: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = read()
        if not chunk:
            raise ConnectionError(f"connection closed inside the HTTP body: {body!r}")
        body += chunk
    return lines[0], body


class HttpsClient:
    """An HTTPS/1.1 client over ssl.MemoryBIO that records every raw byte it sends.

    Connects to host:port, verifies the certificate with ``ca`` for ``server_hostname``
    (ssl.SSLCertVerificationError otherwise) and keeps the connection for several GETs.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ca: trustme.CA,
        server_hostname: str = HOSTNAME,
        *,
        timeout: float = 5.0,
    ) -> None:
        self.server_hostname = server_hostname
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(ca).wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self.sent = bytearray()
        self.sock = socket.create_connection((host, port), timeout=timeout)
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self._pump()
            self._flush()
        except BaseException:
            self.sock.close()
            raise

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sent += data
            self.sock.sendall(data)

    def _pump(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the server")
        self._in.write(data)

    def _read(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._pump()

    def get(self, path: str = "/") -> tuple[bytes, bytes]:
        """Send one GET and return (status line, body)."""
        self.tls.write(f"GET {path} HTTP/1.1\r\nHost: {self.server_hostname}\r\n\r\n".encode())
        self._flush()
        result = _read_http_response(self._read)
        self._flush()
        return result

    def close(self) -> None:
        """Close the socket without a TLS close_notify (so ``sent`` stays final)."""
        self.sock.close()

    def __enter__(self) -> HttpsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def https_get(
    host: str,
    port: int,
    ca: trustme.CA,
    server_hostname: str = HOSTNAME,
    *,
    path: str = "/",
    timeout: float = 5.0,
) -> HttpsResult:
    """GET https://server_hostname/path via host:port, verifying the certificate with ``ca``.

    Every byte sent is recorded in the result. Raises ssl.SSLError (e.g. certificate
    verification failure) or ConnectionError.
    """
    with HttpsClient(host, port, ca, server_hostname, timeout=timeout) as client:
        status, body = client.get(path)
        return HttpsResult(status, body, bytes(client.sent), client.tls.getpeercert())


def https_get_wrapped(
    host: str,
    port: int,
    ca: trustme.CA,
    server_hostname: str = HOSTNAME,
    *,
    path: str = "/",
    timeout: float = 5.0,
) -> tuple[bytes, bytes]:
    """Same GET with a plain ``SSLContext.wrap_socket``; returns (status line, body)."""
    ctx = client_context(ca)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as sock,
    ):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\n\r\n".encode())
        return _read_http_response(lambda: sock.recv(65536))
