"""The container's health check: healthy when the proxy listens on its ``bind-to`` port
and, when ``[stats.prometheus]`` is enabled, its exporter reports a ready worker.

Light on purpose: it opens no connection to the proxy's port (that would be a client in
the metrics and the logs) and asks nothing of the Internet (``mtgworkers doctor`` does;
run it by hand). Exit 0 = healthy, 1 = not.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def listening(port: int) -> bool:
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def ready_workers(host: str, port: int, path: str, prefix: str) -> float:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with urllib.request.urlopen(f"http://{netloc}{path}", timeout=5) as response:
        text = response.read().decode()
    wanted = f'{prefix}_workers{{state="ready"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line[len(wanted) :])
    return 0.0


def main() -> int:
    from mtgworkers import config
    from supervisor.exporter import DEFAULT_BIND

    path = os.environ.get("MTGW_CONFIG", "/etc/mtgworkers/config.toml")
    try:
        cfg = config.load(path)
    except Exception as exc:  # an invalid config is unhealthy, with the reason
        print(f"unhealthy: {exc}")
        return 1
    if not listening(cfg.bind_to.port):
        print(f"unhealthy: nothing listens on port {cfg.bind_to.port}")
        return 1
    prometheus = cfg.stats.prometheus
    if prometheus.enabled:
        bind = prometheus.bind_to or DEFAULT_BIND
        try:
            ready = ready_workers(
                bind.host,
                bind.port,
                prometheus.http_path,
                prometheus.metric_prefix,
            )
        except OSError as exc:
            print(f"unhealthy: metrics unreachable: {exc}")
            return 1
        if ready < 1:
            print("unhealthy: no ready worker")
            return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
