"""The shipped monitoring files: the alert rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``), the scrape config ``promtool check config``, and
the Grafana dashboard is what ``deploy/grafana/generate.py`` writes. tests/e2e/
test_monitoring.py runs them against a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    return subprocess.run(
        [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )


def test_alert_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = _promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    tests = (PROMETHEUS_DIR / "alerts.test.yml").read_text()
    alerts = {line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line}
    assert len(alerts) >= 8
    firing = set()
    for block in tests.split("alertname: ")[1:]:
        name, _, rest = block.partition("\n")
        head = rest.split("- eval_time", 1)[0]
        if "exp_labels" in head:
            firing.add(name.strip())
    assert alerts - firing == set(), "alerts that no unit test sees firing"


def test_a_wrong_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    # The unit tests can fail: the same file, with one firing alert expected elsewhere.
    text = (PROMETHEUS_DIR / "alerts.test.yml").read_text()
    broken = text.replace(
        "exp_labels: {instance: a, severity: warning}",
        "exp_labels: {instance: b, severity: warning}",
        1,
    )
    assert broken != text
    (tmp_path / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
    (tmp_path / "alerts.test.yml").write_text(broken)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_scrape_config_passes_promtool_check() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_the_generators_output() -> None:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (GRAFANA_DIR / "mtgworkers.json").read_text() == module.render(), (
        "deploy/grafana/mtgworkers.json is stale: run python3 deploy/grafana/generate.py"
    )


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads((GRAFANA_DIR / "mtgworkers.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Fronting rate against Telegram connections",
        "Replay attacks",
        "Concurrency limited",
        "IPv6 share of clients",
    } <= titles
