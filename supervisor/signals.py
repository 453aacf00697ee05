"""Which signals the processes of the pool handle and which they ignore (one definition).

The supervisor handles :data:`SUPERVISOR_SIGNALS` (its loop calls ``handle_<name>`` for
each) and SIGCHLD. It stops a child (a worker, the metrics exporter) with one of
:data:`STOP_SIGNALS`. A child ignores every other signal the supervisor handles
(:data:`IGNORED_SIGNALS`): a terminal sends SIGINT, SIGHUP and the job-control signals to
the whole process group, but they are the supervisor's to act on, and it tells its
children what to do.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Final

__all__ = ["CAUGHT_SIGNALS", "IGNORED_SIGNALS", "STOP_SIGNALS", "SUPERVISOR_SIGNALS"]

# Signal -> the name of the arbiter's handler (``Arbiter.handle_<name>``).
SUPERVISOR_SIGNALS: Final[Mapping[signal.Signals, str]] = {
    signal.SIGHUP: "hup",
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGTTIN: "ttin",
    signal.SIGTTOU: "ttou",
    signal.SIGUSR1: "usr1",
    signal.SIGUSR2: "usr2",
}

# What the supervisor sends a child to stop it: SIGTERM drains, SIGQUIT stops at once.
STOP_SIGNALS: Final[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGQUIT)

# Signals a child must survive although they are not for it (a worker installs its own
# SIGUSR1 handler once its event loop runs).
IGNORED_SIGNALS: Final[tuple[signal.Signals, ...]] = tuple(
    s for s in SUPERVISOR_SIGNALS if s not in STOP_SIGNALS
)

# Every signal the supervisor installs its handler for (a forked child resets them).
CAUGHT_SIGNALS: Final[tuple[signal.Signals, ...]] = (*SUPERVISOR_SIGNALS, signal.SIGCHLD)
