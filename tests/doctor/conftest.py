"""Fixtures for doctor's tests: a loopback world in which every endpoint doctor uses is ours.

``world`` (per module) starts an NTP responder, a DNS server answering for the secret's
host name, an IP echo service, the fronting website (trustme certificate), a "DC" that
accepts connections, and writes the trustme CA to a file. ``world.config(...)`` builds a
config that points everything there: the DCs 1-5 and 203 through ``[dc-overrides]``, so
nothing doctor dials can leave the loopback interface.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from mtgworkers import config as mconfig
from mtgworkers.doctor import checks
from tests.doctor.servers import (
    DNSServer,
    EchoServer,
    Listener,
    ServerLoop,
    SNTPResponder,
    TLSSite,
    site_context,
)
from tests.support.proxy import deep_merge, free_port, to_toml

HOST = "fronting.test"
KEY = bytes(range(1, 17))
SECRET_HEX = "ee" + KEY.hex() + HOST.encode().hex()
DCS = (1, 2, 3, 4, 5, 203)


@dataclass
class World:
    loop: ServerLoop
    ca: trustme.CA
    ca_file: Path
    workdir: Path
    ntp: SNTPResponder
    dns: DNSServer
    echo: EchoServer
    site: TLSSite
    dc: Listener
    extra: list[Any] = field(default_factory=list)

    def start(self, server: Any) -> Any:
        """Start another server on the loop; it is closed with the world."""
        self.loop.call(server.start())
        self.loop.keep(server.close)
        return server

    def data(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The config (TOML key spelling) of a healthy setup, with ``overrides`` merged in."""
        base: dict[str, Any] = {
            "secret": SECRET_HEX,
            "bind-to": f"127.0.0.1:{free_port()}",
            "concurrency": 100,
            "public-ipv4": "127.0.0.1",
            "public-ipv6": "::1",
            "tolerate-time-skewness": "10s",
            "domain-fronting": {"ip": "127.0.0.1", "port": self.site.port},
            "network": {"dns": f"udp://127.0.0.1:{self.dns.port}", "timeout": {"tcp": "1s"}},
            "dc-overrides": {str(dc): [f"127.0.0.1:{self.dc.port}"] for dc in DCS},
            "doctor": {
                "ntp-servers": [f"127.0.0.1:{self.ntp.port}"],
                "ip-echo-urls": [self.echo.url],
                "ca-file": str(self.ca_file),
                "timeout": "1s",
            },
        }
        return deep_merge(base, overrides or {})

    def config(self, overrides: dict[str, Any] | None = None) -> mconfig.Config:
        return mconfig.parse(self.data(overrides), base_dir=str(self.workdir))

    def write(self, overrides: dict[str, Any] | None = None, name: str = "doctor.toml") -> str:
        path = self.workdir / name
        path.write_text(to_toml(self.data(overrides)))
        return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    loop = ServerLoop()
    ca = trustme.CA()
    workdir = tmp_path_factory.mktemp("doctor")
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        world = World(
            loop=loop,
            ca=ca,
            ca_file=ca_file,
            workdir=workdir,
            ntp=SNTPResponder(),
            dns=DNSServer({HOST: [("A", "127.0.0.1"), ("AAAA", "::1")]}),
            echo=EchoServer(),
            # a site that looks like a big one: TLS 1.3, h2, X25519MLKEM768
            site=TLSSite(site_context(ca, HOST, alpn=("h2", "http/1.1")), post_quantum=True),
            dc=Listener(),
        )
        for server in (world.ntp, world.dns, world.echo, world.site, world.dc):
            world.start(server)
        yield world
    finally:
        loop.close()


@pytest.fixture(autouse=True)
def quiet_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /proc with generous settings, so host limits pass on any test machine."""
    proc = tmp_path / "proc"
    (proc / "sys/net/core").mkdir(parents=True)
    (proc / "sys/net/ipv4").mkdir(parents=True)
    (proc / "sys/net/core/somaxconn").write_text("4096\n")
    (proc / "sys/net/ipv4/tcp_migrate_req").write_text("1\n")
    monkeypatch.setattr(checks, "PROC", str(proc))
    return proc


def run(coro: Any, timeout: float = 20.0) -> Any:
    """Run a coroutine in this thread's own loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def env_without_echo() -> dict[str, str]:
    """The environment with the IP echo override pointing nowhere (never the internet)."""
    return {**os.environ, "MTGWORKERS_IP_ECHO_URLS": "http://127.0.0.1:1/"}
