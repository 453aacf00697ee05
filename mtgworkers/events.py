"""Typed events the proxy emits, and the stream that hands them to observers.

The proxy core never touches a metrics library: it sends one of the events below to an
:class:`EventStream`, and observers (Prometheus, statsd, tests) turn them into whatever
they need. Events are emitted per connection or per batch of traffic, never per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventStart:
    """A client connection passed the IP lists and the concurrency gate."""

    stream_id: str
    client_ip: str


@dataclass(frozen=True, slots=True)
class EventConnectedToDC:
    """The Telegram connection is up and the obfuscated2 frame was sent."""

    stream_id: str
    remote_ip: str
    dc: int


@dataclass(frozen=True, slots=True)
class EventDomainFronting:
    """The client was routed to the fronting host (sent even if the dial then fails)."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class EventTraffic:
    """A batch of relayed bytes on the upstream socket (Telegram or fronting host).

    ``is_read`` is True for bytes read from upstream (``to_client``), False for bytes
    written to upstream (``from_client``).
    """

    stream_id: str
    traffic: int
    is_read: bool


@dataclass(frozen=True, slots=True)
class EventFinish:
    """The stream ended; every event of this stream_id came before it."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class EventConcurrencyLimited:
    """A connection was closed at once because ``concurrency`` sessions were running and
    none of this worker's could be evicted."""


@dataclass(frozen=True, slots=True)
class EventConcurrencyEvicted:
    """``concurrency`` sessions were running: the worker's oldest session without a valid
    ClientHello was closed to admit a new connection (ours, not mtg's)."""


@dataclass(frozen=True, slots=True)
class EventIPBlocklisted:
    """A connection was closed at once by the allowlist or the blocklist."""

    remote_ip: str
    is_blocklist: bool


@dataclass(frozen=True, slots=True)
class EventReplayAttack:
    """A ClientHello whose session id was seen before: routed to the fronting host."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class EventIPListSize:
    """An IP list was (re)loaded with ``size`` entries."""

    size: int
    is_blocklist: bool


# Reasons of EventAcceptRefused: the process's open files limit, the system's.
ACCEPT_REFUSED_REASONS = ("emfile", "enfile")


@dataclass(frozen=True, slots=True)
class EventAcceptRefused:
    """A client connection was closed right after the accept: the worker was out of file
    descriptors. ``reason`` is ``emfile`` (this process's open files limit) or ``enfile``
    (the system's), see :data:`ACCEPT_REFUSED_REASONS`."""

    reason: str


@dataclass(frozen=True, slots=True)
class EventHelloWithoutSNI:
    """A valid ClientHello without a server_name extension was served (Telegram iOS)."""

    stream_id: str


Event = (
    EventStart
    | EventConnectedToDC
    | EventDomainFronting
    | EventTraffic
    | EventFinish
    | EventConcurrencyLimited
    | EventConcurrencyEvicted
    | EventIPBlocklisted
    | EventReplayAttack
    | EventIPListSize
    | EventAcceptRefused
    | EventHelloWithoutSNI
)

Observer = Callable[[Event], None]


class EventStream:
    """Fan-out of events to observers, called synchronously in the worker's loop.

    Observers must be fast and must not raise; an observer that raises is a bug, but it
    must never take a client connection down, so the exception is reported and dropped.
    """

    __slots__ = ("_observers", "_on_error")

    def __init__(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._observers: list[Observer] = []
        self._on_error = on_error

    def subscribe(self, observer: Observer) -> None:
        """Add an observer; it receives every event sent after this call."""
        self._observers.append(observer)

    def unsubscribe(self, observer: Observer) -> None:
        """Remove an observer added with :meth:`subscribe`."""
        self._observers.remove(observer)

    def send(self, event: Event) -> None:
        """Deliver ``event`` to every observer in subscription order."""
        for observer in self._observers:
            try:
                observer(event)
            except Exception as exc:
                if self._on_error is not None:
                    self._on_error(exc)
