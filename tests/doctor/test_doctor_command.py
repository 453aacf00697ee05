"""``mtgworkers doctor`` as a whole: sections, exit codes, --json, flags, the deadline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from mtgworkers import cli
from tests.doctor.conftest import World, env_without_echo
from tests.doctor.servers import SNTPResponder, Socks5Server, closed_port
from tests.support.proxy import REPO_ROOT

TITLES = [
    "Deprecated options",
    "Time skewness",
    "Validate native network connectivity",
    "Validate fronting domain connectivity",
    "Validate SNI-DNS match",
    "Validate host limits",
]


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["doctor", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("  ")]


def test_healthy_setup_passes(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = doctor(capsys, world.write())
    assert code == 0, out + err
    assert headings(out)[:-1] == TITLES
    assert headings(out)[-1].startswith("Probe the running proxy on 127.0.0.1:")
    assert out.startswith(
        "Deprecated options\n  \u2705 All good\nTime skewness\n  \u2705 Time drift is "
    )
    for line in out.splitlines():
        if line.startswith("  "):
            assert line.startswith(("  \u2705 ", "  \u2139\ufe0f ")), line
    assert "  \u2139\ufe0f Skipped: nothing answers on 127.0.0.1:" in out


def test_every_section_runs_and_any_failure_exits_1(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    socks = world.start(Socks5Server(("alice", "pa55word")))
    overrides: dict[str, Any] = {
        "domain-fronting-port": world.site.port,  # deprecated spelling
        "dc-overrides": {"3": [f"127.0.0.1:{closed_port()}"]},
        "network": {"proxies": [f"socks5://alice:pa55word@127.0.0.1:{socks.port}"]},
        "doctor": {"ntp-servers": [f"127.0.0.1:{closed_port()}"]},
    }
    code, out, _ = doctor(capsys, world.write(overrides))
    assert code == 1
    assert headings(out)[:4] == [
        "Deprecated options",
        "Time skewness",
        "Validate native network connectivity",
        f"Validate network connectivity with proxy socks5://alice:REDACTED@127.0.0.1:{socks.port}",
    ]
    assert "pa55word" not in out
    assert (
        '  \u26a0\ufe0f Option "domain-fronting-port" is deprecated and will be removed in '
        'v2.3.0. Please use "port" in [domain-fronting] section instead.\n'
    ) in out
    assert "  \u203c\ufe0f cannot access ntp pool: no NTP server answered: " in out
    assert out.count("  \u274c DC 3: ") == 2  # directly and through the proxy
    assert "Validate SNI-DNS match\n  \u2705 IP address 127.0.0.1 matches" in out


def test_json_report(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = {"public-ipv6": "::2"}
    code, out, _ = doctor(capsys, "--json", world.write(overrides))
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["exit_code"] == 1
    assert [s["title"] for s in report["sections"]][:-1] == TITLES
    assert [s["key"] for s in report["sections"]] == [
        "deprecated-options",
        "time-skewness",
        "native-network",
        "fronting-domain",
        "sni-dns",
        "host-limits",
        "probe",
    ]
    for section in report["sections"]:
        assert section["checks"], section
        for check in section["checks"]:
            assert set(check) == {"status", "message", "figures"}
            assert check["status"] in ("ok", "warning", "failure", "error", "info")
    by_key = {s["key"]: s for s in report["sections"]}
    assert by_key["sni-dns"]["status"] == "failure"
    time_check = by_key["time-skewness"]["checks"][0]
    assert time_check["figures"]["tolerance"] == 10.0
    assert isinstance(time_check["figures"]["offset"], float)
    dc = by_key["native-network"]["checks"][5]
    assert dc["figures"]["dc"] == 203 and dc["status"] == "ok"


def test_command_line_flags_override_the_config(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    responder = world.start(SNTPResponder(9.0))
    path = world.write({"doctor": {"ntp-servers": [f"127.0.0.1:{closed_port()}"]}})
    code, out, _ = doctor(
        capsys,
        "--ntp-server",
        f"127.0.0.1:{responder.port}",
        "--timeout",
        "2s",
        "--no-probe",
        path,
    )
    assert code == 1
    assert "You will get many rejected connections!" in out
    assert responder.requests >= 1
    assert "Probe the running proxy" not in out


def test_deadline_stops_slow_checks(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    silent = world.start(SNTPResponder(silent=True))
    path = world.write({"doctor": {"ntp-servers": [f"127.0.0.1:{silent.port}"], "timeout": "10s"}})
    started = time.monotonic()
    code, out, _ = doctor(capsys, "--deadline", "2s", path)
    assert time.monotonic() - started < 5
    assert code == 1
    assert "Time skewness\n  \u203c\ufe0f did not finish within doctor's deadline (2s)\n" in out
    assert "Validate SNI-DNS match\n  \u2705" in out  # the others finished


def test_required_probe_without_a_proxy_fails(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = doctor(capsys, "--probe", world.write())
    assert code == 1
    assert "\n  \u274c nothing answers on 127.0.0.1:" in out
    assert ": connection refused\n" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--timeout", "soon"), "incorrect doctor option: incorrect duration (soon)"),
        (("--ntp-server", "bad host"), "incorrect doctor option: host is neither"),
        (("--ip-echo-url", "ftp://x.example"), "incorrect doctor option: unsupported schema"),
        (("--ca-file", "/nonexistent.pem"), "incorrect doctor option: cannot use file"),
        (("--probe-address", "localhost"), "incorrect doctor option: missing port"),
        (("--probe", "--no-probe"), "--probe and --no-probe contradict each other"),
    ],
)
def test_bad_options(
    world: World, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = doctor(capsys, *args, world.write())
    assert code == 1 and out == ""
    assert err.startswith(f"mtgworkers: error: {message}")


def test_config_errors_exit_1(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    path = world.write({"doctor": {"timeout": "-1s"}})
    code, out, err = doctor(capsys, path)
    assert code == 1 and out == ""
    assert "doctor.timeout: duration has to be a positive" in err


def test_real_process(world: World) -> None:
    """The installed entry point: python -m mtgworkers doctor, exit code and stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "mtgworkers", "doctor", "--json", "--no-probe", world.write()],
        cwd=REPO_ROOT,
        env={**env_without_echo(), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    report = json.loads(result.stdout)
    # The real /proc of this machine decides the host limits; everything else is ours.
    others = [s for s in report["sections"] if s["key"] != "host-limits"]
    assert all(s["status"] in ("ok", "info") for s in others), result.stdout
    limits = next(s for s in report["sections"] if s["key"] == "host-limits")
    limits_ok = all(c["status"] in ("ok", "info") for c in limits["checks"])
    assert result.returncode == (0 if limits_ok else 1), result.stderr
