"""Outputs of a run: table rows, the targets table, the README section and the PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Result = dict[str, Any]
DASH = "\u2013"  # en dash: an empty cell
TIMES = "\u00d7"  # multiplication sign: a ratio

RESULTS_START = "<!-- bench:results:start -->"
RESULTS_END = "<!-- bench:results:end -->"
TARGETS_START = "<!-- bench:targets:start -->"
TARGETS_END = "<!-- bench:targets:end -->"

# (scenario, what, how the number is read, limit, op)
TARGETS = [
    ("relay_64", "relay MB/s, 64 streams, per proxy core", "ratio", 0.60, ">="),
    ("handshakes", "full handshakes/s, per proxy core", "ratio", 0.40, ">="),
    ("idle_9k", "RSS per idle session at 9k per worker (KB)", "value", 12.0, "<="),
    ("rtt_128", "p99 round trip of 128 B", "ratio", 1.0, "<="),
    ("metrics", "metrics on vs off, loss (%)", "value", 5.0, "<="),
]


def _num(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, (int, float)):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def target_keys(results: list[Result]) -> list[str]:
    keys: list[str] = []
    for result in results:
        for key in result.get("results", {}):
            if key not in keys and key != "baseline":
                keys.append(key)
    if "proxy" in keys:
        keys.remove("proxy")
        keys.insert(0, "proxy")
    return keys


def labels(results: list[Result]) -> dict[str, str]:
    out = {"baseline": "baseline"}
    for result in results:
        for key, res in result.get("results", {}).items():
            out.setdefault(key, res.get("label", key))
    return out


def _note(result: Result, key: str) -> str:
    res = result.get("results", {}).get(key, {})
    name = result["scenario"]
    if name == "rtt_128" and "p50" in res:
        return f"p50 {_num(res['p50'])} ms"
    if name.startswith("idle") and "fds_per_session" in res:
        return f"{_num(res['fds_per_session'])} fds/session, {res.get('sessions')} sessions"
    if name == "handshakes" and "hs_p50_ms" in res:
        return f"p50 {_num(res['hs_p50_ms'])} ms per handshake"
    if name == "max_sessions" and res:
        return (
            f"{res.get('workers')} workers, {_num(res.get('kb_per_session'))} KB and "
            f"{_num(res.get('fds_per_session'))} fds/session, stopped by {res.get('stopped_by')}"
        )
    if name == "stalled" and res:
        parts = []
        if "paced" in res:
            parts.append(f"paced: {_num(res['paced'].get('value'))} KB")
        if "kernel_queued_kb_per_session" in res:
            parts.append(f"kernel queues {_num(res['kernel_queued_kb_per_session'])} KB")
        return ", ".join(parts) + f" per session, {res.get('sessions')} sessions"
    if name == "idle_flood" and res:
        return (
            f"{_num(res.get('quiet_hs_per_s'))} → {_num(res.get('flood_hs_per_s'))} "
            f"handshakes/s, flood closed {_num(res.get('flood_closed_per_s'))}/s"
        )
    if name in ("metrics", "workers", "reload") and res:
        parts = []
        for sub, data in res.items():
            if isinstance(data, dict):
                change = "loss" if "loss" in data else "ratio"
                parts.append(
                    f"{sub}: {_num(data['off_per_core'])} → {_num(data['on_per_core'])}"
                    f" per core ({change} {_num(data[change])})"
                )
        return "; ".join(parts)
    return ""


def row(result: Result, keys: list[str] | None = None) -> str:
    """One markdown table row for a scenario (``keys``: non-baseline targets to show)."""
    keys = keys or target_keys([result]) or ["proxy"]
    cells = [f"`{result['scenario']}` {result['title']}", result["unit"]]
    if result["status"] == "skipped":
        blanks = [DASH] * (2 + 3 * len(keys))
        return "| " + " | ".join([*cells, *blanks, f"skipped: {result['reason']}"]) + " |"
    res = result.get("results", {})
    ratio = result.get("ratio", {})
    notes = []
    for key in keys:
        data = res.get(key, {})
        cells += [_cell(data), _num(data.get("per_core")), _ratio(ratio.get(key))]
        note = _note(result, key)
        if note:
            notes.append(note if len(keys) == 1 else f"{data.get('label', key)}: {note}")
    base = res.get("baseline", {})
    cells += [_cell(base), _num(base.get("per_core"))] if base else [DASH, DASH]
    if result["status"] == "failed":
        notes.insert(0, f"FAILED: {result.get('reason', '')[:300]}")
    return "| " + " | ".join([*cells, "; ".join(notes).replace("|", "/")]) + " |"


def _cell(data: dict[str, Any]) -> str:
    if not data:
        return DASH
    value = _num(data.get("value"))
    if data.get("cpu_pct") is not None:
        return f"{value} ({data['cpu_pct']:.0f}% CPU)"
    return value


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}{TIMES}"


def header(results: list[Result]) -> str:
    keys = target_keys(results) or ["proxy"]
    names = labels(results)
    cols = ["scenario", "unit"]
    for key in keys:
        cols += [names.get(key, key), "per core", "vs baseline"]
    cols += ["baseline", "per core", "notes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    keys = target_keys(results) or ["proxy"]
    return "\n".join([header(results), *(row(r, keys) for r in results)])


def target_rows(results: list[Result]) -> list[dict[str, Any]]:
    """The issue's targets with the measured values (for the proxy target)."""
    by_name = {r["scenario"]: r for r in results}
    rows = []
    for name, what, how, limit, op in TARGETS:
        result = by_name.get(name)
        measured = None
        status = "not run"
        if result is not None and result["status"] == "skipped":
            status = f"skipped: {result['reason']}"
        elif result is not None and result["status"] == "failed":
            status = "failed"
        elif result is not None:
            if how == "ratio":
                measured = result.get("ratio", {}).get("proxy")
            else:
                measured = result.get("results", {}).get("proxy", {}).get("value")
            if measured is None or (isinstance(measured, float) and math.isnan(measured)):
                status = "no value"
            else:
                ok = measured >= limit if op == ">=" else measured <= limit
                status = "pass" if ok else "FAIL"
        rows.append(
            {
                "scenario": name,
                "target": what,
                "limit": f"{'≥' if op == '>=' else '≤'} {limit:g}{TIMES if how == 'ratio' else ''}",
                "measured": measured,
                "unit": TIMES if how == "ratio" else "",
                "status": status,
            }
        )
    return rows


def targets_table(results: list[Result]) -> str:
    lines = ["| target | limit | measured | status |", "|---|---|---|---|"]
    for t in target_rows(results):
        measured = DASH if t["measured"] is None else f"{_num(t['measured'])}{t['unit']}"
        lines.append(f"| {t['target']} | {t['limit']} | {measured} | {t['status']} |")
    return "\n".join(lines)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """Replace what is between two marker lines (append both when missing)."""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_readme(path: Path, results: list[Result], meta: dict[str, Any]) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    summary = (
        f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}` "
        f"(proxy on CPU {meta['proxy_cpus']}, load + fake DC on CPU {meta['load_cpus']}; "
        f"{meta['settings_summary']}). Chart: `bench/results/latest.png`, "
        "raw numbers: `bench/results/latest.json`."
    )
    text = replace_between(text, RESULTS_START, RESULTS_END, summary + "\n\n" + table(results))
    text = replace_between(text, TARGETS_START, TARGETS_END, targets_table(results))
    path.write_text(text)


def chart(results: list[Result], path: Path, meta: dict[str, Any]) -> str | None:
    """Bar chart of every figure relative to the baseline; returns an error text or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    keys = target_keys(results)
    names = labels(results)
    rows = [r for r in results if r.get("ratio") and r["status"] != "skipped"]
    if not rows:
        return "nothing to chart"
    limits = {name: (limit, how) for name, _, how, limit, _ in TARGETS if how == "ratio"}
    absolute = {
        name: f"; target {op} {limit:g}" for name, _, how, limit, op in TARGETS if how == "value"
    }
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) * max(len(keys), 1) + 2))
    height = 0.8 / max(len(keys), 1)
    ylabels = []
    for i, result in enumerate(rows):
        extra = absolute.get(result["scenario"], "")
        ylabels.append(
            f"{result['scenario']}\n({result['unit']}, {result['better']} is better{extra})"
        )
        for j, key in enumerate(keys):
            value = result["ratio"].get(key)
            if value is None:
                continue
            y = i + (j - (len(keys) - 1) / 2) * height
            ax.barh(
                y, value, height=height * 0.9, label=names[key] if i == 0 else None, color=f"C{j}"
            )
            ax.text(value, y, f" {value:.2f}{TIMES}", va="center", fontsize=8)
        if result["scenario"] in limits:
            limit = limits[result["scenario"]][0]
            ax.plot([limit, limit], [i - 0.45, i + 0.45], color="red", linewidth=2)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to the no-crypto uvloop baseline, same run (rates per proxy core)")
    ax.set_title(f"mtgworkers benchmark {meta['date']} (red: target)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
