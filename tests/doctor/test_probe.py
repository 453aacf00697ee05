"""doctor's self-probe against a running ``mtgworkers run`` (tests/support/proxy.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
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


@pytest.fixture
def big_site(trustme_ca: trustme.CA) -> Iterator[Website]:
    """A fronting website that looks like a big one (TLS 1.3, h2, X25519MLKEM768) and picks
    the client's first suite, as the proxy does before it has learned anything."""
    site = Website(trustme_ca, alpn=["h2", "http/1.1"], server_preference=False, post_quantum=True)
    site.start()
    yield site
    site.stop()


def test_probe_of_a_healthy_proxy(
    world: World,
    proxy_factory: ProxyPool,
    fake_dc: FakeDC,
    big_site: Website,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = proxy_factory(doctor_overrides(world, ca_file, fake_dc), fronting_port=big_site.port)
    code, report = run_doctor(proxy, capsys)  # not required: probed because it answers
    lines = probe_lines(report)
    assert all(status == "ok" for status, _ in lines[:-1]), lines
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
    # side by side with the website's answer to the same hello
    assert re.fullmatch(
        r"records: proxy Handshake 122, ChangeCipherSpec 1, ApplicationData \d+ \| website "
        r"Handshake 122, ChangeCipherSpec 1, ApplicationData \d+(\+\d+)+",
        messages[7],
    ), messages[7]
    assert (
        messages[8] == "cipher suite: proxy TLS_AES_128_GCM_SHA256 | website TLS_AES_128_GCM_SHA256"
    )
    assert messages[9] == (
        "ServerHello extensions: proxy supported_versions, key_share(x25519) | website "
        "supported_versions, key_share(x25519)"
    )
    assert lines[10][0] == "info" and messages[10].startswith("encrypted handshake: proxy 1 record")
    assert "expected to differ" in messages[10] and len(lines) == 11
    assert code == 0, json.dumps(report, indent=1)
    assert report["ok"] is True
    # the running proxy's learned state (nothing learned yet: mtg's defaults)
    learned = report["doppelganger"][str(proxy.pid)]
    assert learned["learned"] is False and learned["k"] == pytest.approx(0.37846373895785335)
    fronting = next(s for s in report["sections"] if s["key"] == "fronting-domain")
    assert [c["figures"].get("signal") for c in fronting["checks"]] == [
        None,
        "alpn",
        "post-quantum",
    ]
    # the censor's connections reached the website through the proxy, and directly
    assert len(big_site.connections) >= 10
    proxy.wait_for_log("cannot read client hello", level="info")


def test_probe_reports_how_the_proxy_differs_from_the_website(
    world: World,
    proxy_factory: ProxyPool,
    fake_dc: FakeDC,
    website: Website,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The kit's website prefers AES-256 (OpenSSL's order); a proxy that has learned nothing
    answers the client's first suite: doctor shows both, and warns."""
    proxy = proxy_factory(doctor_overrides(world, ca_file, fake_dc))
    code, report = run_doctor(proxy, capsys, "--probe")
    assert code == 1
    section = next(s for s in report["sections"] if s["key"] == "probe")
    by_aspect = {c["figures"].get("aspect"): c for c in section["checks"]}
    suite = by_aspect["cipher_suite"]
    assert suite["status"] == "warning"
    assert suite["message"].startswith(
        "cipher suite: proxy TLS_AES_128_GCM_SHA256 | website TLS_AES_256_GCM_SHA384: a censor "
        "that compares them tells the proxy from the site"
    )
    assert suite["figures"]["expected"] is False
    assert by_aspect["serverhello_extensions"]["status"] == "ok"
    assert by_aspect["encrypted_handshake"]["status"] == "info"
    assert by_aspect["encrypted_handshake"]["figures"]["website"] > 0
    # the kit's website has no h2 and no post-quantum key exchange
    fronting = next(s for s in report["sections"] if s["key"] == "fronting-domain")
    assert [c["status"] for c in fronting["checks"]] == ["ok", "warning", "warning"]
    print("\n".join(f"{c['status']:8} {c['message']}" for c in section["checks"]))


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
    censor = lines[2:7]
    assert len(lines) == 8
    assert lines[7] == (
        "error",
        "side by side with the fronting website (same ClientHello): cannot compare: the "
        f"fronting website is unreachable: cannot dial to 127.0.0.1:{down}: connection refused",
    )
    for status, message in censor:
        assert status == "failure", message
        assert "the fronting website is unreachable from here" in message
    assert any("connection closed without" in m or "connection reset" in m for _, m in censor)
    fronting = next(s for s in report["sections"] if s["key"] == "fronting-domain")
    assert fronting["checks"][0]["message"].startswith(f"127.0.0.1:{down}: unreachable: ")
