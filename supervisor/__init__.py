"""Process management: a supervisor (the arbiter) starting uvloop worker processes.

``supervisor.run(config, config_path)`` is what ``mtgworkers run`` and ``simple-run``
call. Layout of the package:

- ``arbiter.py``   the supervisor's single loop: signals, spawning, reaping, reloads;
- ``launch.py``    starting a worker: fork, exec a fresh interpreter, the launch spec;
- ``worker.py``    what runs in a worker process;
- ``shm.py``       shared memory: scoreboard (sessions per worker, samples) and the
                   replay cache, with their byte layouts;
- ``listeners.py`` the per-slot SO_REUSEPORT listening sockets;
- ``notify.py``    systemd readiness notifications;
- ``procstats.py`` psutil samples of the workers;
- ``pidfile.py``   the optional pid file;
- ``states.py``    the worker states (arbiter, scoreboard and metrics share them);
- ``signals.py``   which signals the supervisor handles and its children ignore;
- ``exporter/``    the metrics exporter process ([stats.prometheus]): pool counters,
                   the multiprocess-file reader, exposition, HTTP server, and the
                   handle that starts and restarts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.arbiter import Arbiter, ConfigSource, SupervisorError

if TYPE_CHECKING:
    from mtgworkers.config import Config

__all__ = ["Arbiter", "ConfigSource", "SupervisorError", "run"]


def run(config: Config, config_path: str | None = None, source: ConfigSource | None = None) -> int:
    """Run the proxy with a supervisor and ``[supervisor] workers`` worker processes.

    ``config_path`` is re-read on SIGHUP (None for simple-run: SIGHUP then replaces the
    workers with the same configuration). Blocks until shutdown and returns the exit
    status (0). Raises :class:`SupervisorError` when the proxy cannot start or a worker
    cannot boot; every worker is stopped by then. ``source`` is what ``config`` was parsed
    from (decoded TOML data and the directory of the file); the workers, fresh
    interpreters, parse it again with the code installed when they start.
    """
    return Arbiter(config, config_path, source).run()
