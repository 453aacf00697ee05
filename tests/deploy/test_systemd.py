"""The shipped systemd units pass ``systemd-analyze verify``, and the proxy's unit keeps
its sandbox (``systemd-analyze security`` exposure).

The units name /opt/mtgworkers/venv/bin/mtgworkers, which exists only once
deploy/install.sh ran, so verify sees copies whose ExecStart= binary is a stub
(everything else unchanged).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.proxy import REPO_ROOT

UNITS = sorted((REPO_ROOT / "deploy").rglob("*.service"))
INSTALLED_BINARY = "/opt/mtgworkers/venv/bin/mtgworkers"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 1.7 for deploy/mtgworkers.service


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    return analyze


def _stubbed(unit: Path, directory: Path) -> Path:
    stub = directory / "mtgworkers"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    if INSTALLED_BINARY in text and not Path(INSTALLED_BINARY).exists():
        text = text.replace(INSTALLED_BINARY, str(stub))
    copy = directory / unit.name
    copy.write_text(text)
    return copy


def test_there_is_a_unit() -> None:
    assert REPO_ROOT / "deploy" / "mtgworkers.service" in UNITS


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    copy = _stubbed(unit, tmp_path)
    result = subprocess.run(
        [_analyze(), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Other units of the host may be reported too; this one must not be.
    about_this = [
        line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
    ]
    assert result.returncode == 0 and not about_this, result.stdout + result.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nType=notify\nExecStart=/nonexistent/binary\n")
    result = subprocess.run(
        [_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


def _exposure(unit: Path) -> float:
    result = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_the_proxys_sandbox(tmp_path: Path) -> None:
    unit = REPO_ROOT / "deploy" / "mtgworkers.service"
    text = unit.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "ProtectKernelTunables=yes",
    ):
        assert f"\n{line}\n" in text, line
    assert _exposure(_stubbed(unit, tmp_path)) <= MAX_EXPOSURE
