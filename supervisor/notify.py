"""systemd's readiness protocol (``sd_notify``) without libsystemd.

When systemd starts a ``Type=notify`` service it sets ``NOTIFY_SOCKET`` to the path of a
unix datagram socket (``@name`` = abstract namespace). The service sends newline-separated
``KEY=VALUE`` lines there: ``READY=1`` once it serves, ``RELOADING=1`` with
``MONOTONIC_USEC=`` when a reload starts (``READY=1`` again when it is done),
``STOPPING=1`` when it shuts down and ``STATUS=`` free text for ``systemctl status``.
Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

_log = logging.getLogger("supervisor")


class Notifier:
    """Sends state changes to systemd; a no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read ``NOTIFY_SOCKET`` from ``environ`` (default ``os.environ``)."""
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if value.startswith("@"):
            self.address = "\0" + value[1:]
        elif value.startswith("/"):
            self.address = value
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram with ``lines``; True if it was sent. Never raises.

        A socket is opened per message, so no descriptor outlives the call (workers are
        forked from this process and must not inherit it).
        """
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:  # once: a vanished socket would otherwise log every second
                _log.warning(
                    "cannot notify systemd",
                    extra={"notify_socket": self.address, "error": str(exc)},
                )
            self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (after start and after each reload)."""
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` systemd needs to order the events."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=text`` (one line)."""
        return self.send(*_status(text))


def _status(text: str | None) -> list[str]:
    if not text:
        return []
    return ["STATUS=" + text.replace("\n", " ")]
