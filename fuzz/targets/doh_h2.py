"""DNS-over-HTTPS over HTTP/2: the server's bytes through ``_H2Exchange``, the sans-IO
exchange ``HttpsResolver._exchange_h2`` drives (h2 and the resolver's stream handling).

Input: one byte choosing how the server's bytes are cut into reads, then those bytes.
"""

from __future__ import annotations

from fuzz.targets import chunks
from fuzz.targets.dns import QUERIES, RESOLVER
from mtgworkers.net import dns as dns_module

MAX_LEN = 4096


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    seed, server = data[0], data[1:]
    exchange = dns_module._H2Exchange(QUERIES, RESOLVER._h2_request_headers)
    exchange.data_to_send()
    for chunk in chunks(server, seed):
        if exchange.done or not exchange.receive(chunk):
            break
        exchange.data_to_send()
    outcomes = exchange.outcomes()
    assert len(outcomes) == len(QUERIES)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, dns_module._QueryError), repr(outcome)
        else:
            RESOLVER._read_answer(outcome)
