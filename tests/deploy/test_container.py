"""deploy/container/: the entry point, the health check, the paths the image shares with
deploy/install.sh and the unit, and (with Podman) the image itself, built from a local
debootstrapped base and run on the host's loopback: it starts, turns healthy, relays a
session and stops cleanly on its STOPSIGNAL.

MTGW_SKIP_CONTAINER_BUILD=1 skips the image build and run (a first build costs about 3
minutes: debootstrap, then pip in the image).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stats.helpers import scrape_series, value, wait_until
from tests.support.client import FakeTLSClient
from tests.support.env import ProxyPool
from tests.support.proxy import REPO_ROOT, free_port, to_toml

CONTAINER = REPO_ROOT / "deploy" / "container"
ENTRYPOINT = CONTAINER / "entrypoint.sh"
DOCKERFILE = CONTAINER / "Dockerfile"
BASE_IMAGE = "localhost/mtgworkers-base:bookworm"


def _entrypoint(
    tmp_path: Path, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    stub = tmp_path / "fake-mtgworkers"
    stub.write_text('#!/bin/sh\necho "called: $*"\n')
    stub.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "MTGW_PROGRAM": str(stub),
        "MTGW_CONFIG": str(config if config is not None else tmp_path / "absent.toml"),
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_entrypoint_refuses_to_start_without_a_config(tmp_path: Path) -> None:
    result = _entrypoint(tmp_path)
    assert result.returncode == 78
    assert f"no config file at {tmp_path / 'absent.toml'}; mount one" in result.stderr
    assert "called" not in result.stdout
    directory = tmp_path / "config.toml"
    directory.mkdir()  # what `-v missing-file:/etc/...` gives
    result = _entrypoint(tmp_path, config=directory)
    assert result.returncode == 78
    assert "is a directory; mount the config file itself" in result.stderr


def test_entrypoint_runs_the_proxy_with_the_mounted_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('secret = "x"\n')
    assert _entrypoint(tmp_path, config=config).stdout == f"called: run {config}\n"
    assert _entrypoint(tmp_path, "run", config=config).stdout == f"called: run {config}\n"
    assert (
        _entrypoint(tmp_path, "doctor", "--no-probe", config=config).stdout
        == f"called: doctor --no-probe {config}\n"
    )
    assert (
        _entrypoint(tmp_path, "access", "/other.toml", config=config).stdout
        == "called: access /other.toml\n"
    )
    assert (
        _entrypoint(tmp_path, "generate-secret", "example.com").stdout
        == "called: generate-secret example.com\n"
    )


def test_image_paths_are_the_installers_and_the_units() -> None:
    dockerfile = DOCKERFILE.read_text()
    install = (REPO_ROOT / "deploy" / "install.sh").read_text()
    unit = (REPO_ROOT / "deploy" / "mtgworkers.service").read_text()
    config = re.search(r'CONFIG="\$\{MTGW_CONFIG:-([^}]+)\}"', install)
    prefix = re.search(r'PREFIX="\$\{MTGW_PREFIX:-([^}]+)\}"', install)
    assert config and prefix
    assert f"MTGW_CONFIG={config.group(1)}" in dockerfile
    assert f"COPY --from=build {prefix.group(1)}/venv {prefix.group(1)}/venv" in dockerfile
    assert f"ExecStart={prefix.group(1)}/venv/bin/mtgworkers run {config.group(1)}" in unit
    entrypoint = ENTRYPOINT.read_text()
    assert f'CONFIG="${{MTGW_CONFIG:-{config.group(1)}}}"' in entrypoint
    assert "\nSTOPSIGNAL SIGTERM\n" in dockerfile
    assert "\nUSER mtgworkers\n" in dockerfile
    compose = (CONTAINER / "compose.yml").read_text()
    assert f"./rendered/mtgworkers.toml:{config.group(1)}:ro" in compose
    for template in ("haproxy.cfg", "nginx-site.conf", "mtgworkers.toml"):
        assert (REPO_ROOT / "deploy" / "sni-router" / f"{template}.in").exists()
        assert f"./rendered/{template}:" in compose


def _healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MTGW_CONFIG=str(config), PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, str(CONTAINER / "healthcheck.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_follows_the_proxy(proxy_factory: ProxyPool, tmp_path: Path) -> None:
    metrics = free_port()
    proxy = proxy_factory(
        {"stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{metrics}"}}}
    )
    wait_until(
        lambda: value(scrape_series(metrics), "mtg_workers", state="ready") >= 1, 10, "a worker"
    )
    result = _healthcheck(proxy.config_path)
    assert result.returncode == 0 and result.stdout == "healthy\n", result.stdout
    proxy.stop()
    result = _healthcheck(proxy.config_path)
    assert result.returncode == 1 and "nothing listens on port" in result.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text('bind-to = "127.0.0.1:1"\n')
    result = _healthcheck(broken)
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: ")


# -- the image ---------------------------------------------------------------------------


def _podman() -> str:
    if os.environ.get("MTGW_SKIP_CONTAINER_BUILD") == "1":
        pytest.skip("MTGW_SKIP_CONTAINER_BUILD=1")
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman not installed (Debian packages: podman, runc, debootstrap)")
    return podman


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _ca_secret() -> list[str]:
    """This machine's CA bundle for pip in the build (package registries may be reached
    through a TLS-inspecting proxy whose CA only the host trusts)."""
    for name in ("PIP_CERT", "SSL_CERT_FILE"):
        path = os.environ.get(name)
        if path and os.path.isfile(path):
            return [f"--secret=id=pip-ca,src={path}"]
    if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        return ["--secret=id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt"]
    return []


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    podman = _podman()
    base = _run("bash", str(CONTAINER / "local-base.sh"), BASE_IMAGE, timeout=900)
    assert base.returncode == 0, base.stdout + base.stderr
    tag = f"localhost/mtgworkers-test:{uuid.uuid4().hex[:8]}"
    build = _run(
        podman,
        "build",
        "--pull=never",
        "--format=docker",  # OCI images have no HEALTHCHECK
        "--network=host",  # pip reaches the package registry
        f"--build-arg=BASE={BASE_IMAGE}",
        *_ca_secret(),
        "-f",
        str(DOCKERFILE),
        "-t",
        tag,
        str(REPO_ROOT),
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    yield tag
    _run(podman, "rmi", "-f", tag)


def _limits() -> list[str]:
    # The engine's defaults (1048576 open files) can be above what this machine lets a
    # process set: pass the current limits.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [f"--ulimit=nofile={soft}:{hard}", "--ulimit=nproc=4096:4096"]


def test_image_runs_turns_healthy_relays_and_stops_cleanly(
    image: str, proxy_factory: ProxyPool, tmp_path: Path
) -> None:
    podman = _podman()
    inspect = _run(podman, "image", "inspect", "--format", "{{.Config.StopSignal}}", image)
    assert inspect.stdout.strip() == "SIGTERM"
    metrics = free_port()
    config = proxy_factory(
        {
            "debug": False,
            "supervisor": {"workers": 2},
            "stats": {"prometheus": {"enabled": True, "bind-to": f"127.0.0.1:{metrics}"}},
        },
        start=False,
    )
    config_file = tmp_path / "config.toml"
    config_file.write_text(to_toml(config.config))
    config_file.chmod(0o644)
    name = f"mtgworkers-test-{uuid.uuid4().hex[:8]}"
    started = _run(
        podman,
        "run",
        "-d",
        "--name",
        name,
        "--network=host",
        *_limits(),
        "-v",
        f"{config_file}:/etc/mtgworkers/config.toml:ro",
        image,
    )
    assert started.returncode == 0, started.stderr
    try:
        wait_until(
            lambda: (
                value(scrape_series(metrics), "mtg_workers", state="ready") == 2
                if _listening_metrics(metrics)
                else None
            ),
            60,
            "the container's 2 workers",
        )
        health = _run(podman, "healthcheck", "run", name)
        assert health.returncode == 0, health.stdout + health.stderr
        user = _run(podman, "exec", name, "id", "-un")
        assert user.stdout.strip() == "mtgworkers"
        secret = proxy_factory.secret
        with FakeTLSClient(config.host, config.port, secret.key, secret.host) as client:
            client.handshake(dc=2)
            data = os.urandom(10000)
            client.send(data)
            assert client.recv_exactly(len(data)) == data
        stopped = _run(podman, "stop", "-t", "20", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        code = _run(podman, "inspect", "--format", "{{.State.ExitCode}}", name)
        logs = _run(podman, "logs", name)
        assert code.stdout.strip() == "0", logs.stdout[-3000:] + logs.stderr[-3000:]
    finally:
        _run(podman, "rm", "-f", name)


def _listening_metrics(port: int) -> bool:
    from tests.stats.helpers import listening

    return listening(port)


def test_image_without_a_config_says_why(image: str) -> None:
    podman = _podman()
    result = _run(podman, "run", "--rm", "--network=host", *_limits(), image)
    assert result.returncode == 78
    assert "no config file at /etc/mtgworkers/config.toml; mount one" in result.stderr
