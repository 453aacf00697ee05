"""The deprecated keys (mtgworkers.config.deprecations): one table, the texts that run's
start-up warning and doctor print from it, and the loader reporting exactly its keys."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtgworkers import cli
from mtgworkers.config import DEPRECATED_KEYS, parse
from mtgworkers.config.deprecations import (
    DEPRECATED,
    REMOVED_IN,
    DeprecatedKey,
    deprecation_message,
    find_deprecated,
)
from mtgworkers.doctor.checks import deprecated_message
from tests.unit.config.helpers import minimal


def test_the_table_in_mtgs_order() -> None:
    assert DEPRECATED_KEYS == (
        "domain-fronting-ip",
        "domain-fronting-port",
        "domain-fronting-proxy-protocol",
        "network.doh-ip",
    )
    assert [entry.key for entry in DEPRECATED] == list(DEPRECATED_KEYS)
    doh = DEPRECATED[-1]
    assert (doh.name, doh.table, doh.replacement) == (
        "doh-ip",
        "network",
        '"dns" in [network] section',
    )
    assert (DEPRECATED[0].name, DEPRECATED[0].table) == ("domain-fronting-ip", None)
    assert REMOVED_IN == "v2.3.0"


@pytest.mark.parametrize("key", ["network.doh-ip", "doh-ip"])
def test_find_by_dotted_key_or_last_component(key: str) -> None:
    assert find_deprecated(key) == DeprecatedKey("network.doh-ip", '"dns" in [network] section')


@pytest.mark.parametrize("key", ["", "dns", "network.dns", "doh", "domain-fronting.ip"])
def test_find_unknown(key: str) -> None:
    assert find_deprecated(key) is None


# The texts each place prints (start-up warning, doctor), pinned for every key.
STARTUP = {
    "domain-fronting-ip": 'Option "domain-fronting-ip" is deprecated. '
    'Please use "ip" in [domain-fronting] section instead.',
    "domain-fronting-port": 'Option "domain-fronting-port" is deprecated. '
    'Please use "port" in [domain-fronting] section instead.',
    "domain-fronting-proxy-protocol": 'Option "domain-fronting-proxy-protocol" is deprecated. '
    'Please use "proxy-protocol" in [domain-fronting] section instead.',
    "network.doh-ip": 'Option "doh-ip" from section [network] is deprecated. '
    'Please use "dns" in [network] section instead.',
}
DOCTOR = {
    "domain-fronting-ip": 'Option "domain-fronting-ip" is deprecated and will be removed in '
    'v2.3.0. Please use "ip" in [domain-fronting] section instead.',
    "domain-fronting-port": 'Option "domain-fronting-port" is deprecated and will be removed in '
    'v2.3.0. Please use "port" in [domain-fronting] section instead.',
    "domain-fronting-proxy-protocol": 'Option "domain-fronting-proxy-protocol" is deprecated '
    'and will be removed in v2.3.0. Please use "proxy-protocol" in [domain-fronting] section '
    "instead.",
    "network.doh-ip": 'Option "doh-ip" from section [network] is deprecated and will be removed '
    'in v2.3.0. Please use "dns" in [network] section instead.',
}


@pytest.mark.parametrize("key", DEPRECATED_KEYS)
def test_messages(key: str) -> None:
    assert deprecation_message(key) == STARTUP[key]
    assert cli.deprecation_message(key) == STARTUP[key]
    assert deprecation_message(key, removed_in=REMOVED_IN) == DOCTOR[key]
    assert deprecated_message(key) == DOCTOR[key]


def test_messages_by_last_component() -> None:
    assert cli.deprecation_message("doh-ip") == STARTUP["network.doh-ip"]
    assert deprecated_message("doh-ip") == DOCTOR["network.doh-ip"]


def test_message_of_a_key_missing_from_the_table() -> None:
    assert deprecation_message("network.dns") == 'Option "network.dns" is deprecated.'
    assert deprecation_message("x", removed_in="v9") == (
        'Option "x" is deprecated and will be removed in v9.'
    )


DOCUMENTS: dict[str, dict[str, Any]] = {
    "domain-fronting-ip": {"domain-fronting-ip": "10.0.0.1"},
    "domain-fronting-port": {"domain-fronting-port": 8443},
    "domain-fronting-proxy-protocol": {"domain-fronting-proxy-protocol": True},
    "network.doh-ip": {"network": {"doh-ip": "1.1.1.1"}},
}


def test_every_key_of_the_table_is_read_and_reported() -> None:
    assert set(DOCUMENTS) == set(DEPRECATED_KEYS)
    for key, extra in DOCUMENTS.items():
        assert parse(minimal(**extra)).deprecated == (key,)


@given(st.sets(st.sampled_from(DEPRECATED_KEYS)))
def test_config_lists_the_set_keys_in_table_order(keys: set[str]) -> None:
    data = minimal()
    for key in keys:
        for name, value in DOCUMENTS[key].items():
            if isinstance(value, dict):
                data.setdefault(name, {}).update(value)
            else:
                data[name] = value
    assert parse(data).deprecated == tuple(key for key in DEPRECATED_KEYS if key in keys)
