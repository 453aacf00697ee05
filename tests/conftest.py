"""Shared pytest fixtures: the e2e test kit (fake DC, fronting website, proxy runner).

Fixtures (all loopback-only):

- ``test_secret`` (session): :class:`KitSecret` with ``key``, ``host`` and ``hex``.
- ``trustme_ca`` (session): the CA that signs the website certificate.
- ``fake_dc`` / ``website``: a started :class:`FakeDC` (mode "echo") / :class:`Website`.
- ``proxy_factory``: ``proxy_factory(overrides=None, *, dc_port=..., fronting_port=...,
  secret=..., start=True) -> ProxyProcess``; defaults point DCs 1..5 at ``fake_dc`` and
  fronting at ``website``; every proxy is SIGTERMed at teardown and must exit 0.
- ``proxy``: ``proxy_factory()`` with defaults.
- ``client_factory``: ``client_factory(proxy, *, key=None, sni=HOSTNAME, **kw) ->
  FakeTLSClient`` (defaults: the right key and host), closed at teardown.
- ``shared_env`` (module): a :class:`SharedEnv` (fake DC, website, proxy) for modules with
  many cheap tests; tests must look only at deltas there. A module can set
  ``SHARED_PROXY_OVERRIDES = {...}`` to configure that proxy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.client import FakeTLSClient
from tests.support.env import ClientFactory, KitSecret, ProxyPool, SharedEnv
from tests.support.fakedc import FakeDC
from tests.support.proxy import ProxyProcess
from tests.support.website import HOSTNAME, Website


@pytest.fixture(scope="session")
def test_secret() -> KitSecret:
    return KitSecret(os.urandom(16), HOSTNAME)


@pytest.fixture(scope="session")
def trustme_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def fake_dc() -> Iterator[FakeDC]:
    dc = FakeDC("echo")
    dc.start()
    yield dc
    dc.stop()


@pytest.fixture
def website(trustme_ca: trustme.CA) -> Iterator[Website]:
    site = Website(trustme_ca)
    site.start()
    yield site
    site.stop()


@pytest.fixture
def proxy_factory(
    tmp_path: Path, test_secret: KitSecret, fake_dc: FakeDC, website: Website
) -> Iterator[ProxyPool]:
    pool = ProxyPool(tmp_path, test_secret, fake_dc.port, website.port)
    yield pool
    pool.close()


@pytest.fixture
def proxy(proxy_factory: ProxyPool) -> ProxyProcess:
    return proxy_factory()


@pytest.fixture
def client_factory(test_secret: KitSecret) -> Iterator[ClientFactory]:
    clients: list[FakeTLSClient] = []

    def make(
        proxy: ProxyProcess,
        *,
        key: bytes | None = None,
        sni: Any = HOSTNAME,
        **options: Any,
    ) -> FakeTLSClient:
        client = FakeTLSClient(
            proxy.host, proxy.port, test_secret.key if key is None else key, sni, **options
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def shared_env(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    test_secret: KitSecret,
    trustme_ca: trustme.CA,
) -> Iterator[SharedEnv]:
    # A module may set SHARED_PROXY_OVERRIDES (config overrides in TOML spelling).
    overrides = getattr(request.module, "SHARED_PROXY_OVERRIDES", None)
    dc = FakeDC("echo")
    dc.start()
    site = Website(trustme_ca)
    site.start()
    pool = ProxyPool(tmp_path_factory.mktemp("shared"), test_secret, dc.port, site.port)
    try:
        yield SharedEnv(dc, site, pool(overrides), test_secret)
    finally:
        try:
            pool.close()
        finally:
            site.stop()
            dc.stop()
