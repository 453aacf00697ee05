"""doctor's self-probe against a running ``mtgworkers run`` (tests/support/proxy.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trustme

from mtgworkers import cli
from tests.doctor.conftest import World
from tests.doctor.servers import closed_port
from tests.support.env import ProxyPool
from tests.support.fakedc import FakeDC
from tests.support.proxy import ProxyProcess
from tests.support.website import Website

pytestmark = pytest.mark.e2e


def doctor_overrides(world: World, ca_file: Path, fake_dc: FakeDC) -> dict[str, Any]:
    """What the kit's proxy config needs so that doctor, too, stays on loopback."""
    return {
        "concurrency": 100,
        "tolerate-time-skewness": "10s",
        "network": {"dns": f"udp://127.0.0.1:{world.dns.port}"},
        "dc-overrides": {"203": [f"127.0.0.1:{fake_dc.port}"]},
        "doctor": {
            "ntp-servers": [f"127.0.0.1:{world.ntp.port}"],
            "ca-file": str(ca_file),
            "timeout": "1s",
        },
    }


@pytest.fixture
def ca_file(tmp_path: Path, trustme_ca: trustme.CA) -> Path:
    path = tmp_path / "kit-ca.pem"
    trustme_ca.cert_pem.write_to_path(str(path))
    return path


def run_doctor(
    proxy: ProxyProcess, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, Any]]:
    code = cli.main(["doctor", "--json", *args, str(proxy.config_path)])
    out = capsys.readouterr().out
    return code, json.loads(out)


def probe_lines(report: dict[str, Any]) -> list[tuple[str, str]]:
    section = next(s for s in report["sections"] if s["key"] == "probe")
    return [(check["status"], check["message"]) for check in section["checks"]]


def test_probe_of_a_healthy_proxy(
    world: World,
    proxy_factory: ProxyPool,
    fake_dc: FakeDC,
    website: Website,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = proxy_factory(doctor_overrides(world, ca_file, fake_dc))
    code, report = run_doctor(proxy, capsys)  # not required: probed because it answers
    lines = probe_lines(report)
    assert all(status == "ok" for status, _ in lines), lines
    messages = [message for _, message in lines]
    assert messages[0].startswith(
        "FakeTLS handshake with the secret accepted: ServerHello signed with the secret, "
    )
    # the fake DC echoes: the answer is our own req_pq_multi packet
    assert messages[1].startswith("DC 2 answered through the proxy: ")
    # (the other connections are section 3's plain connects)
    assert [c.dc for c in fake_dc.connections if c.dc is not None] == [2]
    assert messages[2].startswith(
        "wrong secret (TLS client, SNI fronting.test): sees the fronting website's certificate"
    )
    assert "random SNI (" in messages[3] and "fronting website's certificate" in messages[3]
    assert messages[4].startswith("no SNI: sees the fronting website's certificate")
    assert messages[5] == "plain HTTP: same as the fronting website: no answer within 1s"
    assert (
        messages[6] == "FakeTLS hello with a wrong key: sees the fronting website's TLS ServerHello"
    )
    assert code == 0, json.dumps(report, indent=1)
    assert report["ok"] is True
    # the censor's connections reached the website through the proxy, and directly
    assert len(website.connections) >= 10
    proxy.wait_for_log("cannot read client hello", level="info")


def test_probe_of_a_proxy_whose_fronting_host_is_down(
    world: World,
    proxy_factory: ProxyPool,
    fake_dc: FakeDC,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    down = closed_port()
    proxy = proxy_factory(doctor_overrides(world, ca_file, fake_dc), fronting_port=down)
    code, report = run_doctor(proxy, capsys, "--probe")
    assert code == 1
    assert len(report["sections"]) == 7  # every section ran
    lines = probe_lines(report)
    assert [status for status, _ in lines[:2]] == ["ok", "ok"]  # clients still work
    censor = lines[2:]
    assert len(censor) == 5
    for status, message in censor:
        assert status == "failure", message
        assert "the fronting website is unreachable from here" in message
    assert any("connection closed without" in m or "connection reset" in m for _, m in censor)
    fronting = next(s for s in report["sections"] if s["key"] == "fronting-domain")
    assert fronting["checks"][0]["message"].startswith(f"127.0.0.1:{down}: unreachable: ")
