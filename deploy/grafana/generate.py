"""Writes mtgworkers.json, the Grafana dashboard, beside this script.

    python3 deploy/grafana/generate.py

The dashboard is generated so that its queries stay readable here and consistent (one
instance selector, one rate window); tests/unit/test_monitoring_files.py checks that the
committed JSON is this script's output. Import the JSON in Grafana (Dashboards > New >
Import) and pick the Prometheus data source. Metric names assume the default
metric-prefix "mtg".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

INST = '{instance=~"$instance"}'  # the selector every query carries
R = "$__rate_interval"


def sel(extra: str = "") -> str:
    """The instance selector with more matchers: sel('state="ready"')."""
    return '{instance=~"$instance"' + (", " + extra if extra else "") + "}"


IPV6 = sel('ip_family="ipv6"')

# (row title, [panel, ...]); a panel is (title, kind, unit, description, [(expr, legend)])
# kind: "timeseries" or "stat".
ROWS: list[tuple[str, list[tuple[str, str, str, str, list[tuple[str, str]]]]]] = [
    (
        "What to watch",
        [
            (
                "Fronting rate against Telegram connections",
                "timeseries",
                "short",
                "Frontings per second (left) and open Telegram connections (right). "
                "Fronting that rises while Telegram connections stay flat is somebody "
                "probing the proxy (alert MTGWorkersProbeCampaign); both rising together "
                "is a crowd of users, some with a stale link.",
                [
                    (f"sum(rate(mtg_domain_fronting_total{INST}[{R}]))", "frontings/s"),
                    (f"sum(mtg_telegram_connections{INST})", "Telegram connections"),
                ],
            ),
            (
                "Replay attacks",
                "timeseries",
                "short",
                "Replayed client hellos (recorded Telegram handshakes sent again, a "
                "censor's probe), per interval. Each one was fronted to the site.",
                [(f"sum(increase(mtg_replay_attacks_total{INST}[{R}]))", "replays")],
            ),
            (
                "Concurrency limited",
                "timeseries",
                "short",
                "Connections per second refused by the concurrency gate, idle connections "
                "evicted to make room (they had not sent a valid ClientHello), and the "
                "client connections now (the gate counts these against `concurrency`).",
                [
                    (f"sum(rate(mtg_concurrency_limited_total{INST}[{R}]))", "refused/s"),
                    (f"sum(rate(mtg_concurrency_evicted_total{INST}[{R}]))", "evicted/s"),
                    (f"sum(mtg_client_connections{INST})", "client connections"),
                ],
            ),
            (
                "IPv6 share of clients",
                "timeseries",
                "percentunit",
                "Share of the open client connections that came over IPv6.",
                [
                    (
                        f"(sum(mtg_client_connections{IPV6}) or vector(0))"
                        f" / sum(mtg_client_connections{INST})",
                        "IPv6",
                    )
                ],
            ),
        ],
    ),
    (
        "Connections",
        [
            (
                "Client connections by IP family",
                "timeseries",
                "short",
                "Open client connections (fronted ones included).",
                [(f"sum by (ip_family) (mtg_client_connections{INST})", "{{ip_family}}")],
            ),
            (
                "Telegram connections by DC",
                "timeseries",
                "short",
                "Open connections to Telegram, by the DC dialled.",
                [(f"sum by (dc) (mtg_telegram_connections{INST})", "DC {{dc}}")],
            ),
            (
                "Telegram connections by address",
                "timeseries",
                "short",
                "Open connections to Telegram, by DC address.",
                [
                    (
                        f"sum by (telegram_ip, dc) (mtg_telegram_connections{INST})",
                        "{{telegram_ip}} (DC {{dc}})",
                    )
                ],
            ),
            (
                "Domain fronting connections",
                "timeseries",
                "short",
                "Open connections handed to the fronting site.",
                [
                    (
                        f"sum by (ip_family) (mtg_domain_fronting_connections{INST})",
                        "{{ip_family}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Traffic",
        [
            (
                "Telegram traffic",
                "timeseries",
                "Bps",
                "Bytes per second read from (to_client) and written to (from_client) "
                "Telegram. Counted per session and written every 5 s.",
                [
                    (
                        f"sum by (direction) (rate(mtg_telegram_traffic_total{INST}[{R}]))",
                        "{{direction}}",
                    )
                ],
            ),
            (
                "Telegram traffic by DC",
                "timeseries",
                "Bps",
                "Both directions together, by DC.",
                [(f"sum by (dc) (rate(mtg_telegram_traffic_total{INST}[{R}]))", "DC {{dc}}")],
            ),
            (
                "Domain fronting traffic",
                "timeseries",
                "Bps",
                "Bytes per second exchanged with the fronting site.",
                [
                    (
                        f"sum by (direction) (rate(mtg_domain_fronting_traffic_total{INST}[{R}]))",
                        "{{direction}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Defense",
        [
            (
                "Domain fronting",
                "timeseries",
                "short",
                "Connections routed to the fronting site per second: wrong secrets, "
                "replays, probes, browsers.",
                [(f"sum(rate(mtg_domain_fronting_total{INST}[{R}]))", "frontings/s")],
            ),
            (
                "Refused by IP lists",
                "timeseries",
                "short",
                "Connections per second refused by the blocklist or the allowlist.",
                [
                    (
                        f"sum by (ip_list) (rate(mtg_ip_blocklisted_total{INST}[{R}]))",
                        "{{ip_list}}",
                    )
                ],
            ),
            (
                "IP list sizes",
                "timeseries",
                "short",
                "Entries of the blocklist and the allowlist after their last refresh.",
                [(f"max by (ip_list) (mtg_iplist_size{INST})", "{{ip_list}}")],
            ),
            (
                "Hellos without SNI",
                "timeseries",
                "short",
                "Valid client hellos without a server_name (Telegram iOS), served, per second.",
                [(f"sum(rate(mtg_client_hellos_without_sni_total{INST}[{R}]))", "hellos/s")],
            ),
            (
                "Refused for want of file descriptors",
                "timeseries",
                "short",
                "Client connections closed right after the accept (emfile: the process's "
                "open files limit; enfile: the system's), per second.",
                [
                    (
                        f"sum by (reason) (rate(mtg_accept_refused_total{INST}[{R}]))",
                        "{{reason}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Worker pool",
        [
            (
                "Workers by state",
                "timeseries",
                "short",
                "Worker processes booting, ready (serving) and retiring (draining after a reload).",
                [(f"sum by (state) (mtg_workers{INST})", "{{state}}")],
            ),
            (
                "Sessions per worker",
                "timeseries",
                "short",
                "Client sessions of each worker (slot / pid): an even spread is what "
                "SO_REUSEPORT gives.",
                [(f"sum by (slot, pid) (mtg_worker_sessions{INST})", "slot {{slot}} ({{pid}})")],
            ),
            (
                "Worker resident memory",
                "timeseries",
                "bytes",
                "Resident memory of each worker.",
                [
                    (
                        f"sum by (slot, pid) (mtg_worker_resident_memory_bytes{INST})",
                        "slot {{slot}} ({{pid}})",
                    )
                ],
            ),
            (
                "Worker CPU",
                "timeseries",
                "percentunit",
                "CPU used by each worker (1 = one core).",
                [
                    (
                        f"sum by (slot, pid) (rate(mtg_worker_cpu_seconds_total{INST}[{R}]))",
                        "slot {{slot}} ({{pid}})",
                    )
                ],
            ),
            (
                "Worker open file descriptors",
                "timeseries",
                "short",
                "Open descriptors of each worker (two per session).",
                [(f"sum by (slot, pid) (mtg_worker_open_fds{INST})", "slot {{slot}} ({{pid}})")],
            ),
            (
                "Worker restarts",
                "timeseries",
                "short",
                "Workers replaced by the supervisor, by reason, per interval (alert "
                "MTGWorkersRestartStorm).",
                [
                    (
                        f"sum by (reason) (increase(mtg_worker_restarts_total{INST}[{R}]))",
                        "{{reason}}",
                    )
                ],
            ),
            (
                "Reloads",
                "timeseries",
                "short",
                "Configuration reloads (SIGHUP) by result, per interval.",
                [
                    (
                        f"sum by (result) (increase(mtg_reloads_total{INST}[{R}]))",
                        "{{result}}",
                    )
                ],
            ),
            (
                "Supervisor uptime",
                "stat",
                "s",
                "Time since the supervisor started.",
                [(f"time() - max(mtg_supervisor_start_time_seconds{INST})", "uptime")],
            ),
        ],
    ),
    (
        "Kernel (network namespace)",
        [
            (
                "Accept queue by slot",
                "timeseries",
                "short",
                "Connections waiting in each slot's accept queue, and the queue's size "
                "(alerts MTGWorkersAcceptQueueFilling, MTGWorkersAcceptQueueDrops).",
                [
                    (f"max by (slot) (mtg_listen_queue_length{INST})", "slot {{slot}} queued"),
                    (f"max by (slot) (mtg_listen_queue_backlog{INST})", "slot {{slot}} backlog"),
                ],
            ),
            (
                "Listen overflows and drops",
                "timeseries",
                "short",
                "Connections per second the kernel dropped at a full accept queue "
                "(overflows) and for any reason (drops).",
                [
                    (
                        f"sum(rate(mtg_kernel_tcp_listen_overflows_total{INST}[{R}]))",
                        "overflows/s",
                    ),
                    (f"sum(rate(mtg_kernel_tcp_listen_drops_total{INST}[{R}]))", "drops/s"),
                ],
            ),
            (
                "Resets on close, SYN retransmits",
                "timeseries",
                "short",
                "Connections reset because closed with unread data (a rise that follows "
                "fronting: probes see resets), and SYN retransmissions (loss, blocked "
                "upstreams), per second.",
                [
                    (
                        f"sum(rate(mtg_kernel_tcp_abort_on_data_total{INST}[{R}]))",
                        "aborts on data/s",
                    ),
                    (
                        f"sum(rate(mtg_kernel_tcp_syn_retransmits_total{INST}[{R}]))",
                        "SYN retransmits/s",
                    ),
                ],
            ),
            (
                "TCP connections",
                "timeseries",
                "short",
                "Connections accepted by the kernel per second (every listener) and "
                "established now (each session holds two).",
                [
                    (
                        f"sum(rate(mtg_kernel_tcp_passive_opens_total{INST}[{R}]))",
                        "accepted/s",
                    ),
                    (f"sum(mtg_kernel_tcp_current_established{INST})", "established"),
                ],
            ),
        ],
    ),
]


def panel(
    panel_id: int, x: int, y: int, spec: tuple[str, str, str, str, list[tuple[str, str]]]
) -> dict[str, Any]:
    title, kind, unit, description, queries = spec
    result: dict[str, Any] = {
        "id": panel_id,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12 if kind == "timeseries" else 6, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + index),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
            }
            for index, (expr, legend) in enumerate(queries)
        ],
    }
    if len(queries) == 2 and kind == "timeseries" and queries[0][1].endswith("/s"):
        # A rate and a level side by side: the level on the right-hand axis.
        result["fieldConfig"]["overrides"].append(
            {
                "matcher": {"id": "byName", "options": queries[1][1]},
                "properties": [{"id": "custom.axisPlacement", "value": "right"}],
            }
        )
    return result


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for title, specs in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        for spec in specs:
            width = 12 if spec[1] == "timeseries" else 6
            if x + width > 24:
                x = 0
                y += 8
            panels.append(panel(panel_id, x, y, spec))
            panel_id += 1
            x += width
        y += 8
    return {
        "title": "mtgworkers",
        "uid": "mtgworkers",
        "description": "mtgworkers (Telegram MTProto proxy): mtg's metrics, the worker "
        "pool and the kernel's TCP signals. Generated by deploy/grafana/generate.py.",
        "tags": ["mtgworkers", "mtproto", "telegram"],
        "editable": True,
        "schemaVersion": 38,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "timezone": "",
        "graphTooltip": 1,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(mtg_workers, instance)", "refId": "instance"},
                    "definition": "label_values(mtg_workers, instance)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    target = Path(__file__).with_name("mtgworkers.json")
    target.write_text(render())
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
