"""The README's install command, minus starting the service: it installs the package into
a fresh virtual environment and writes a working config with a new secret."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mtgworkers import config as config_module
from tests.support.fakedc import closed_port
from tests.support.proxy import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_install_script_installs_and_configures(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    config_path = tmp_path / "etc" / "config.toml"
    env = dict(os.environ)
    env.update(
        MTGW_PREFIX=str(prefix),
        MTGW_CONFIG=str(config_path),
        MTGW_NO_START="1",
        PORT="8443",
        # public-IP detection must stay on this machine: a closed local port answers at once
        MTGWORKERS_IP_ECHO_URLS=f"http://127.0.0.1:{closed_port()}",
    )
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "install.sh"), "fronting.test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    config = config_module.load(config_path)
    assert config.secret.host == "fronting.test"
    assert config.bind_to.port == 8443
    assert config.defense.anti_replay.enabled

    # the installed console script works and sees the same config
    binary = prefix / "venv" / "bin" / "mtgworkers"
    access = subprocess.run(
        [str(binary), "access", "--ipv4", "192.0.2.10", str(config_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    links = json.loads(access.stdout)
    assert links["ipv4"]["port"] == 8443
    assert links["secret"]["hex"] == config.secret.hex()

    # running it again keeps the existing config (and its secret)
    again = subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "install.sh"), "other.test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert config_module.load(config_path).secret == config.secret
