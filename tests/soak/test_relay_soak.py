"""CI-sized relay soak; run `python -m tests.soak.relay_soak --connections 300000` for the
full one (see the module docstring of relay_soak)."""

from __future__ import annotations

import os

import pytest

from tests.soak.relay_soak import ENDINGS, soak

pytestmark = pytest.mark.soak


def test_relay_survives_every_way_a_session_ends() -> None:
    connections = int(os.environ.get("MTGW_SOAK_CONNECTIONS", "10000"))
    result = soak(connections, concurrency=100, processes=2)
    assert result["ok"] == connections, result
    assert result["failed"] == 0, result["first_error"]
    assert connections >= ENDINGS * 100
    assert result["proxy_alive"], result
    assert not result["crash_output"], result
    assert result["error_lines"] == 0, result["first_error_line"]
    assert result["exit_code"] == 0, result
    # every session's two descriptors were released
    assert result["fds_after"] <= result["fds_before"], result
