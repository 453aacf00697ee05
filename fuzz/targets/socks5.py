"""SOCKS5 server answers through ``ClientHandshake`` (read as ``Dialer`` reads them) and
the message parsers on their own.

Input: one flag byte (bit 0: with credentials; bits 1-2: the target), then what the
server sends.
"""

from __future__ import annotations

from mtgworkers.protocol import socks5

MAX_LEN = 1024
TARGETS = (
    ("149.154.167.51", 443),
    ("[2001:b28:f23d:f001::a]", 443),
    ("storage.googleapis.com", 8443),
    ("пример.рф", 80),
)


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    flags, answer = data[0], data[1:]
    host, port = TARGETS[(flags >> 1) & 3]
    user, password = ("user", "pass") if flags & 1 else (None, None)
    exchange = socks5.ClientHandshake(host, port, user, password)
    exchange.start()
    pos = 0
    try:
        while not exchange.done:
            need = exchange.bytes_needed
            assert need > 0, "a handshake that is not done must want bytes"
            chunk = answer[pos : pos + need]
            if not chunk:
                break
            pos += len(chunk)
            exchange.feed(chunk)
    except socks5.Socks5Error:
        pass
    else:
        if exchange.done:
            assert exchange.reply is not None and exchange.bytes_needed == 0
    for parse in (
        lambda: socks5.parse_reply(answer),
        lambda: socks5.parse_method_choice(answer, (0, 2)),
        lambda: socks5.parse_auth_reply(answer),
    ):
        try:
            parse()
        except socks5.Socks5Error:
            pass
    whole = socks5.ClientHandshake(host, port, user, password)
    whole.start()
    try:
        whole.feed(answer)
    except socks5.Socks5Error:
        pass
