"""DNS answers: the DoH body check, dnspython's wire reading as the UDP/TCP/DoT paths use
it, the resolver's reading of the answers and its verdict over both of them.

Input: one flag byte (bit 0: the AAAA question; bit 1: raise on truncation), then one DNS
message, optionally followed by ``\\xff\\xfe`` and a second one (the other question's).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence

import dns.exception
import dns.message
import dns.name
import dns.rdatatype

from fuzz.targets import run_now
from mtgworkers.net.dns import HttpsResolver, ResolveError, _doh_answer, _QueryError

MAX_LEN = 2048
NAME = dns.name.from_text("storage.googleapis.com")


class _Replay(HttpsResolver):
    """The DoH resolver with the server's answers given in advance."""

    answers: Sequence[dns.message.Message | BaseException] = ()

    async def _exchange(
        self, queries: list[dns.message.Message]
    ) -> Sequence[dns.message.Message | BaseException]:
        return self.answers


RESOLVER = _Replay("127.0.0.1", ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
QUERIES = [
    RESOLVER._make_query(NAME, dns.rdatatype.A),
    RESOLVER._make_query(NAME, dns.rdatatype.AAAA),
]


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    flags, rest = data[0], data[1:]
    first, _, second = rest.partition(b"\xff\xfe")
    outcomes: list[dns.message.Message | BaseException] = []
    for index, wire in enumerate((first, second)):
        query = QUERIES[(index + flags) & 1]
        try:
            response = _doh_answer(query, wire)
        except _QueryError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(response)
            found, ttl, _ = RESOLVER._read_answer(response)
            for address in found:
                ipaddress.ip_address(address)
            assert ttl >= 0
        try:
            udp = dns.message.from_wire(
                wire,
                keyring=query.keyring,
                request_mac=query.request_mac,
                ignore_trailing=False,
                raise_on_truncation=bool(flags & 2),
            )
            query.is_response(udp)
        except dns.exception.DNSException:
            pass
    RESOLVER.answers = outcomes
    try:
        addresses, ttl = run_now(RESOLVER._query("storage.googleapis.com"))
    except ResolveError:
        return
    assert addresses and ttl >= 0
