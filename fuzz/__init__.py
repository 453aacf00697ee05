"""Coverage-guided fuzzing of every parser of the proxy (docs/fuzzing.md).

``python -m fuzz run --seconds N [--target T] [--merge]`` runs the campaign with atheris
(libFuzzer); ``python -m fuzz replay`` runs every corpus file through its harness without
atheris; ``python -m fuzz seed`` rebuilds the seed inputs. One harness per target lives in
:mod:`fuzz.targets`; each corpus is ``fuzz/corpus/<target>/``.

The contract of every harness: the module's own error type (``ProtocolError`` and its
subclasses, ``ConfigError``, ...) is a rejected input; any other exception, or a broken
invariant (``AssertionError``), is a bug.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"

#: target name -> what it covers (the harness is fuzz.targets.<name>).
TARGETS: dict[str, str] = {
    "clienthello": "FakeTLS ClientHello reader and verifier (protocol/faketls.py)",
    "records": "TLS record stream: RecordReader, records_end, wrap_application_data",
    "obfs2": "obfuscated2 init frame (protocol/obfs2.py)",
    "proxyproto": "PROXY protocol v1/v2 headers (protocol/proxyproto.py)",
    "socks5": "SOCKS5 server replies through the client handshake (protocol/socks5.py)",
    "dns": "DNS answers: DoH bodies, dnspython wire parsing, answer reading (net/dns.py)",
    "doh_h2": "DNS-over-HTTPS over HTTP/2: the server's frames through h2 (net/dns.py)",
    "netset": "FireHOL netsets and IPList lookups (defense/iplist.py)",
    "config": "the TOML config file (config/loader.py)",
    "serverhello": "the fronting site's ServerHello and the learned shape (serverhello.py)",
    "http": "the HTTP/1.1 answer reader (net/http.py)",
    "handshake": "the sans-IO ServerHandshake, input split into chunks (handshake.py)",
}

#: target name -> the top-level packages whose coverage guides the fuzzer (instrumented).
INSTRUMENT: dict[str, tuple[str, ...]] = {name: ("mtgworkers",) for name in TARGETS} | {
    "dns": ("mtgworkers", "dns"),
    "doh_h2": ("mtgworkers", "h2", "hpack"),
    "config": ("mtgworkers", "tomllib"),
}
