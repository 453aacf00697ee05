"""Bundles used by the pytest fixtures in tests/conftest.py (importable by test modules)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import FakeTLSClient
from tests.support.fakedc import FakeDC
from tests.support.proxy import ProxyProcess, free_port, make_config
from tests.support.website import Website

ClientFactory = Callable[..., FakeTLSClient]  # the ``client_factory`` fixture


@dataclass(frozen=True)
class KitSecret:
    """The proxy secret used by the kit: 16-byte key and host name."""

    key: bytes
    host: str

    @property
    def hex(self) -> str:
        """The secret as mtg's hex text: ee || key || host."""
        return "ee" + self.key.hex() + self.host.encode().hex()


class ProxyPool:
    """Creates proxies (``pool(overrides, ...)``) and stops them all in ``close()``."""

    def __init__(self, workdir: Path, secret: KitSecret, dc_port: int, fronting_port: int):
        self.workdir = workdir
        self.secret = secret
        self.dc_port = dc_port
        self.fronting_port = fronting_port
        self.started: list[ProxyProcess] = []

    def __call__(
        self,
        overrides: Mapping[str, Any] | None = None,
        *,
        dc_port: int | None = -1,
        fronting_port: int | None = -1,
        secret: str | None = None,
        start: bool = True,
    ) -> ProxyProcess:
        """Make (and by default start) a proxy.

        ``overrides`` are merged into the config (TOML key spelling, None deletes a key);
        ``dc_port``/``fronting_port`` default to the pool's fake DC / website, None leaves
        the section out; ``secret`` replaces the hex secret.
        """
        config = make_config(
            secret or self.secret.hex,
            bind_port=free_port(),
            dc_port=self.dc_port if dc_port == -1 else dc_port,
            fronting_port=self.fronting_port if fronting_port == -1 else fronting_port,
            overrides=overrides,
        )
        proc = ProxyProcess(config, self.workdir / f"proxy{len(self.started)}")
        self.started.append(proc)
        if start:
            proc.start()
        return proc

    def close(self) -> None:
        """SIGTERM every proxy; pytest.fail if one did not exit 0 in time."""
        errors = []
        for proc in self.started:
            try:
                proc.stop(check=True)
            except AssertionError as exc:
                errors.append(str(exc))
            finally:
                proc.kill()
        if errors:
            pytest.fail("proxy shutdown failed:\n" + "\n".join(errors), pytrace=False)


@dataclass
class SharedEnv:
    """A fake DC, a website and a proxy shared by the tests of one module."""

    fake_dc: FakeDC
    website: Website
    proxy: ProxyProcess
    secret: KitSecret

    def client(self, **options: Any) -> FakeTLSClient:
        """A FakeTLSClient for this proxy (``key``/``sni`` default to the right ones)."""
        key = options.pop("key", self.secret.key)
        sni = options.pop("sni", self.secret.host)
        return FakeTLSClient(self.proxy.host, self.proxy.port, key, sni, **options)
