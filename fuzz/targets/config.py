"""The TOML config file: ``config.loads`` (decode, TOML, every key's parser).

Input: the bytes of a config file. Paths in it are resolved against the working directory
and only looked at (stat), never written.
"""

from __future__ import annotations

import json

from mtgworkers.config import ConfigError, loads, warnings

MAX_LEN = 8192


def fuzz_one(data: bytes) -> None:
    try:
        config = loads(data, source="fuzz")
    except ConfigError:
        return
    json.dumps(config.to_json_dict())
    warnings(config)
