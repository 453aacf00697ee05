"""mtgworkers.logs: mtg's JSON line shape, level names and filter, logger names, redaction."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mtgworkers import logs
from mtgworkers.protocol.secret import Secret

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes.fromhex("d11c6cbbd9efe7fed5bc0db220b09665")
SECRET = Secret(KEY, "google.com")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo setup(): other tests (and pytest's own capture) must not see our handler."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()]


def setup(debug: bool = True, **kwargs: Any) -> io.StringIO:
    stream = io.StringIO()
    logs.setup(debug, stream, **kwargs)
    return stream


def test_line_shape_and_field_order() -> None:
    stream = setup()
    logs.get_logger("proxy").info("ip was blacklisted", extra={"ip": "10.0.1.1", "b": 1, "a": 2})
    raw = stream.getvalue()
    assert raw.count("\n") == 1
    # Compact like zerolog: no spaces after separators.
    assert raw.startswith('{"level":"info","logger":"proxy","timestamp":')
    (line,) = lines(stream)
    assert list(line) == ["level", "logger", "timestamp", "message", "ip", "b", "a"]
    assert line["message"] == "ip was blacklisted"
    assert line["ip"] == "10.0.1.1"


def test_timestamp_is_unix_milliseconds() -> None:
    stream = setup()
    before = int(time.time() * 1000)
    logs.get_logger("proxy").warning("x")
    after = int(time.time() * 1000)
    (line,) = lines(stream)
    assert isinstance(line["timestamp"], int)
    assert before <= line["timestamp"] <= after


@pytest.mark.parametrize(
    ("levelno", "name"),
    [
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warn"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "error"),
    ],
)
def test_level_names_are_zerologs(levelno: int, name: str) -> None:
    stream = setup()
    logs.get_logger("proxy").log(levelno, "m")
    assert [line["level"] for line in lines(stream)] == [name]


def emit_all(logger: logging.Logger) -> None:
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")


def test_default_filter_is_warn_and_above() -> None:
    stream = setup(debug=False)
    emit_all(logs.get_logger("proxy"))
    assert [line["message"] for line in lines(stream)] == ["w", "e"]


def test_debug_shows_everything() -> None:
    stream = setup(debug=True)
    emit_all(logs.get_logger("proxy"))
    assert [line["level"] for line in lines(stream)] == ["debug", "info", "warn", "error"]


@pytest.mark.parametrize(
    ("level", "expected"),
    [("info", ["i", "w", "e"]), ("WARN", ["w", "e"]), ("error", ["e"]), (logging.DEBUG, None)],
)
def test_level_override(level: str | int, expected: list[str] | None) -> None:
    stream = setup(debug=False, level=level)
    emit_all(logs.get_logger("proxy"))
    assert [line["message"] for line in lines(stream)] == (expected or ["d", "i", "w", "e"])


def test_unknown_level_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="verbose"):
        logs.setup(False, io.StringIO(), level="verbose")


def test_logger_names_drop_the_package_prefix() -> None:
    stream = setup()
    logs.get_logger("").warning("root")
    logs.get_logger("proxy.relay").warning("relay")
    logging.getLogger("mtgworkers.proxy.domain-fronting").warning("fronting")
    logging.getLogger("asyncio").warning("foreign")
    logging.getLogger("mtgworkersx").warning("lookalike")
    assert [(line["logger"], line["message"]) for line in lines(stream)] == [
        ("", "root"),
        ("proxy.relay", "relay"),
        ("proxy.domain-fronting", "fronting"),
        ("asyncio", "foreign"),
        ("mtgworkersx", "lookalike"),
    ]


def test_get_logger_names() -> None:
    assert logs.get_logger("").name == "mtgworkers"
    assert logs.get_logger("proxy") is logging.getLogger("mtgworkers.proxy")


def test_error_field_from_text_and_exceptions() -> None:
    stream = setup()
    log = logs.get_logger("proxy")
    log.warning("cannot dial to telegram", extra={"dc": 2, "error": "no addresses to call"})
    log.warning("as object", extra={"error": ConnectionResetError("reset by peer")})
    try:
        raise TimeoutError
    except TimeoutError as exc:
        log.info("empty text", exc_info=exc)
    first, second, third = lines(stream)
    assert list(first) == ["level", "logger", "timestamp", "message", "dc", "error"]
    assert first["error"] == "no addresses to call"
    assert second["error"] == "reset by peer"
    assert third["error"] == "TimeoutError"
    # mtg prints only the error text; a traceback is kept for error-level records only.
    assert "traceback" not in third and "exc_info" not in third


def test_error_level_exception_gets_a_traceback() -> None:
    stream = setup(debug=False)
    try:
        raise KeyError("missing")
    except KeyError:
        logs.get_logger("proxy").exception("session failed")
    (line,) = lines(stream)
    assert line["level"] == "error"
    assert line["error"] == "'missing'"
    assert "Traceback (most recent call last)" in line["traceback"]
    assert "KeyError" in line["traceback"]


def test_fixed_fields_cannot_be_overridden_by_extra() -> None:
    stream = setup()
    logs.get_logger("proxy").warning("m", extra={"level": "info", "logger": "x", "timestamp": 1})
    (line,) = lines(stream)
    assert (line["level"], line["logger"]) == ("warn", "proxy")
    assert line["timestamp"] > 1


def test_secret_fields_are_redacted_at_any_depth() -> None:
    stream = setup()
    configuration = {
        "secret": SECRET.base64(),
        "network": {"proxies": [{"host": "127.0.0.1", "password": "hunter2"}]},
    }
    logs.get_logger("").debug(
        "configuration", extra={"configuration": configuration, "secret": SECRET.hex()}
    )
    raw = stream.getvalue()
    (line,) = lines(stream)
    assert line["secret"] == logs.REDACTED
    assert line["configuration"]["secret"] == logs.REDACTED
    assert line["configuration"]["network"]["proxies"][0] == {
        "host": "127.0.0.1",
        "password": logs.REDACTED,
    }
    for leaked in (SECRET.base64(), SECRET.hex(), KEY.hex(), "hunter2"):
        assert leaked not in raw
    # The caller's dict is not modified.
    assert configuration["secret"] == SECRET.base64()


def test_secret_objects_never_print_their_key() -> None:
    stream = setup()
    logs.get_logger("proxy").warning("odd value", extra={"value": SECRET, "blob": b"\x01\x02"})
    raw = stream.getvalue()
    (line,) = lines(stream)
    assert KEY.hex() not in raw and SECRET.base64() not in raw
    assert "google.com" in line["value"]
    assert line["blob"] == "0102"


def test_non_ascii_and_unserialisable_values() -> None:
    stream = setup()
    logs.get_logger("proxy").warning("привет", extra={"where": {1, 2}, "obj": object()})
    (line,) = lines(stream)
    assert line["message"] == "привет"
    assert "привет" in stream.getvalue()
    assert line["where"] == ["1", "2"]
    assert line["obj"].startswith("<object object")


def test_setup_twice_replaces_the_handler() -> None:
    first = setup()
    second = setup()
    logs.get_logger("proxy").warning("once")
    assert first.getvalue() == ""
    assert [line["message"] for line in lines(second)] == ["once"]


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(False)
    logs.get_logger("proxy").warning("to stdout")
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["message"] == "to stdout"


def test_lines_reach_a_pipe_immediately() -> None:
    # A process whose stdout is a pipe (systemd, docker) must not sit on buffered lines.
    code = (
        "import sys, time\n"
        "from mtgworkers import logs\n"
        "logs.setup(False)\n"
        "logs.get_logger('proxy').warning('started', extra={'secret': 'abc'})\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = json.loads(proc.stdout.readline())
        assert (line["level"], line["logger"], line["message"]) == ("warn", "proxy", "started")
        assert line["secret"] == logs.REDACTED
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reserved_record_names_print_under_mtgs_name() -> None:
    import io
    import json
    import logging

    from mtgworkers import logs

    out = io.StringIO()
    logs.setup(True, out)
    logs.get_logger("blocklist.ipblockist.firehol").warning(
        "update has failed", extra={"filename_": "/etc/list.netset"}
    )
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["filename"] == "/etc/list.netset"
    assert "filename_" not in line
    logging.getLogger().handlers.clear()
