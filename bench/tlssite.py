"""A local TLS website for the ``probes`` scenario: the host that fronted probes reach.

It answers every ClientHello with a real TLS 1.3 server flight (Python's ssl module,
OpenSSL, a fresh self-signed ECDSA P-256 certificate for ``localhost``) and serves
nothing else: the probes reset after its ServerHello. It runs on the load CPUs, so
its handshakes cost the proxy nothing; the proxy only relays its bytes.

    python bench/tlssite.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for ``localhost`` in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "site.pem"
    key_path = directory / "site.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Page(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    # probes reset mid-handshake by design: nothing to report
    loop.set_exception_handler(lambda _loop, _context: None)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = self_signed(Path(tmp))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    server = await loop.create_server(Page, sock=sock, ssl=context, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local TLS site for fronted probes")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    import uvloop

    uvloop.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
