"""DNS-over-HTTPS over HTTP/2: the server's bytes through h2 and the resolver's stream
handling (``_h2_event``), the way ``HttpsResolver._exchange_h2`` moves them.

Input: one byte choosing how the server's bytes are cut into reads, then those bytes.
"""

from __future__ import annotations

import h2.connection
import h2.exceptions
import h2.settings

from fuzz.targets import chunks
from fuzz.targets.dns import QUERIES, RESOLVER
from mtgworkers.net import dns as dns_module

MAX_LEN = 4096


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    seed, server = data[0], data[1:]
    connection = h2.connection.H2Connection(dns_module._H2_CONFIG)
    connection.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: dns_module._MAX_HTTP_HEAD,
        },
    )
    connection.initiate_connection()
    streams = {}
    for query in QUERIES:
        stream_id = connection.get_next_available_stream_id()
        wire = query.to_wire()
        connection.send_headers(stream_id, RESOLVER._h2_request_headers(len(wire)))
        connection.send_data(stream_id, wire, end_stream=True)
        streams[stream_id] = dns_module._H2Stream(query)
    connection.data_to_send()
    for chunk in chunks(server, seed):
        if all(stream.outcome is not None for stream in streams.values()):
            break
        try:
            events = connection.receive_data(chunk)
        except h2.exceptions.ProtocolError as exc:
            dns_module._fail_open(streams, f"HTTP/2 protocol error: {exc}")
            break
        for event in events:
            dns_module._h2_event(connection, streams, event)
        connection.data_to_send()
    for stream in streams.values():
        if stream.outcome is not None and not isinstance(stream.outcome, BaseException):
            RESOLVER._read_answer(stream.outcome)
