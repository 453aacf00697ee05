"""The parsed object (mtgworkers.config.model): frozen, JSON dump redacted and shaped like
the file, warnings."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import sys
from typing import Any

import pytest

from mtgworkers.config import (
    UNTRUSTED_PROXY_HEADERS,
    Config,
    DnsServer,
    PreferIP,
    load,
    parse,
    warnings,
)
from tests.unit.config.helpers import FIREHOL, MTG_EXAMPLE_TOML, minimal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --- the parsed object


def test_config_is_frozen() -> None:
    cfg = parse(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.concurrency = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.network.timeout.idle = 1.0  # type: ignore[misc]


def test_parse_does_not_modify_its_input() -> None:
    data = tomllib.loads(MTG_EXAMPLE_TOML)
    before = copy.deepcopy(data)
    parse(data)
    assert data == before


def test_to_json_dict_redacts_secrets(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mtg.toml"
    path.write_text(MTG_EXAMPLE_TOML.replace("user:password@", "alice:s3cr3t-pw@"))
    cfg = load(path)
    dumped = json.dumps(cfg.to_json_dict())
    for hidden in (
        cfg.secret.key.hex(),
        cfg.secret.hex(),
        cfg.secret.base64(),
        cfg.secret.key.hex().upper(),
        "s3cr3t-pw",
    ):
        assert hidden not in dumped
    data = json.loads(dumped)
    assert data["secret"] == {"key": "REDACTED", "host": "storage.googleapis.com"}
    assert data["network"]["proxies"] == [
        "socks5://alice:REDACTED@127.0.0.1:1080",
        "socks5h://proxy.example:1080",
    ]
    assert data["bind-to"] == "0.0.0.0:3128"
    assert data["tolerate-time-skewness"] == "5s"
    assert data["network"]["timeout"] == {
        "tcp": "5s",
        "http": "10s",
        "idle": "5m0s",
        "handshake": "10s",
    }
    assert data["domain-fronting"] == {"ip": "10.10.10.11", "port": 8443, "proxy-protocol": True}
    assert data["defense"]["blocklist"] == {
        "enabled": True,
        "download-concurrency": 2,
        "urls": [FIREHOL],
        "update-each": "24h0m0s",
    }
    assert data["defense"]["anti-replay"] == {
        "enabled": True,
        "max-size": "1mib",
        "error-rate": 0.001,
    }
    assert data["stats"]["statsd"]["address"] == "127.0.0.1:8888"
    assert data["stats"]["prometheus"]["bind-to"] == "127.0.0.1:3129"


def test_to_json_dict_redacts_passwords_in_urls() -> None:
    cfg = parse(
        minimal(
            defense={
                "blocklist": {"urls": ["https://u:hunter2@lists.example/block.netset"]},
                "doppelganger": {"urls": ["https://v:hunter3@www.example.com/"]},
            }
        )
    )
    data = cfg.to_json_dict()
    assert "hunter" not in json.dumps(data)
    assert data["defense"]["blocklist"]["urls"] == ["https://u:REDACTED@lists.example/block.netset"]
    assert data["defense"]["doppelganger"]["urls"] == ["https://v:REDACTED@www.example.com/"]
    # the parsed values keep the credentials: the downloader needs them
    assert cfg.defense.blocklist.urls == ("https://u:hunter2@lists.example/block.netset",)


def test_to_json_dict_mirrors_the_file_layout() -> None:
    """Apart from the secret, the JSON form is a valid config that parses to the same values."""
    cfg = parse(tomllib.loads(MTG_EXAMPLE_TOML))
    data = cfg.to_json_dict()
    data["secret"] = cfg.secret.hex()
    data["network"]["proxies"] = [
        "socks5://user:password@127.0.0.1:1080",
        "socks5h://proxy.example",
    ]
    data = _drop_nulls(data)
    again = parse(data)
    assert dataclasses.replace(again, deprecated=cfg.deprecated) == cfg


def _drop_nulls(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: _drop_nulls(value) if isinstance(value, dict) else value
        for key, value in data.items()
        if value is not None
    }


def test_typed_values_and_their_json_form() -> None:
    cfg = parse(minimal(**{"prefer-ip": "Only-IPv6", "network": {"dns": "TLS://[2001:DB8::53]"}}))
    assert cfg.prefer_ip is PreferIP.ONLY_IPV6
    assert cfg.network.dns == DnsServer("tls", "2001:db8::53", 853, "", "tls://[2001:DB8::53]")
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert data["prefer-ip"] == "only-ipv6"
    assert data["network"]["dns"] == "tls://[2001:DB8::53]"
    assert parse(minimal()).to_json_dict()["network"]["dns"] is None
    # the defaults are typed too
    default = Config(secret=cfg.secret, bind_to=cfg.bind_to)
    assert default.prefer_ip is PreferIP.PREFER_IPV6
    assert default.network.dns is None


def test_warnings() -> None:
    assert warnings(parse(minimal())) == []
    listener = parse(minimal(**{"proxy-protocol-listener": True}))
    assert warnings(listener) == [UNTRUSTED_PROXY_HEADERS]
    trusted = parse(
        minimal(**{"proxy-protocol-listener": True, "proxy-protocol-trusted": ["10.0.0.0/8"]})
    )
    assert warnings(trusted) == []
