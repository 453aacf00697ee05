"""One proxy worker with its metrics observers, for the stats tests (no supervisor).

    python -m tests.stats.runner CONFIG WORKER_SLOT     # build_worker(), no exporter

It boots like a supervisor worker (``mtgworkers.server.build_worker``): it writes into
the metrics directory named by ``PROMETHEUS_MULTIPROC_DIR`` (the test owns the exporter),
so several of them with different slots make a pool without a supervisor. SIGTERM stops
it (exit 0).
"""

from __future__ import annotations

import asyncio
import signal
import sys


def run_worker(config_path: str, slot: str) -> int:
    import uvloop

    from mtgworkers import config as config_module
    from mtgworkers import logs
    from mtgworkers.server import build_worker

    config = config_module.load(config_path)
    logs.setup(config.debug)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker, detach = build_worker(config, loop, metrics_id=slot)
    loop.run_until_complete(worker.start())
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    logs.get_logger("").warning("proxy is listening", extra={"slot": slot})
    try:
        loop.run_until_complete(stopping.wait())
        loop.run_until_complete(worker.stop())
    finally:
        detach()
        loop.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    return run_worker(*argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
