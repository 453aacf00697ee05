"""JSON logging in mtg's shape: one JSON object per line on stdout.

Every line carries ``level`` (``debug`` | ``info`` | ``warn`` | ``error``, zerolog's
names), ``logger`` (the logger name without the ``mtgworkers.`` prefix; ``""`` for the
package logger itself), ``timestamp`` (Unix time in milliseconds, an integer) and
``message``, followed by the fields passed with ``extra=`` in the order given, and an
``error`` field with the exception text when one is attached (``exc_info=``). Records at
error level with an exception attached also get a ``traceback`` field: those are the
unexpected failures, where the stack is worth the noise::

    log = get_logger("proxy")
    log.info("ip was blacklisted", extra={"ip": "10.0.1.1"})
    # {"level":"info","logger":"proxy","timestamp":1700000000000,
    #  "message":"ip was blacklisted","ip":"10.0.1.1"}   (on one line)

Secrets never reach the output: any field named ``secret`` or ``password`` (at any
depth of a dict/list value) is replaced by ``REDACTED`` before formatting.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from functools import partial
from typing import IO, Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

__all__ = ["PACKAGE_LOGGER", "REDACTED", "get_logger", "setup"]

PACKAGE_LOGGER = "mtgworkers"
REDACTED = "REDACTED"  # the same marker as Config.to_json_dict()

# Field names whose values are replaced wherever they appear (compared lower-cased).
_SENSITIVE_FIELDS = frozenset({"secret", "password"})

# The fields every line starts with; an ``extra=`` key with one of these names cannot
# override them (``message`` is already refused by the logging module itself).
_FIXED_FIELDS = ("level", "logger", "timestamp", "message")

# mtg field names that are reserved LogRecord attributes: log them with a trailing "_"
# (``extra={"filename_": ...}``) and they print under mtg's name.
_FIELD_ALIASES = {"filename_": "filename"}

# LogRecord attributes that are not user fields. ``message`` is set by format().
_RECORD_ATTRS = frozenset(RESERVED_ATTRS) | {"message", "asctime"}

_LEVEL_NAMES = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# The handler installed by the last setup() call, so a second call replaces it instead of
# printing every line twice.
_installed: logging.Handler | None = None


def get_logger(name: str) -> logging.Logger:
    """Return the logger that prints as ``logger=name``.

    ``name`` is mtg's dotted logger name without our package prefix (``"proxy"``,
    ``"proxy.relay"``); ``""`` gives the package logger, which prints as ``""`` like
    mtg's root logger.
    """
    return logging.getLogger(f"{PACKAGE_LOGGER}.{name}" if name else PACKAGE_LOGGER)


def setup(debug: bool, stream: IO[str] | None = None, *, level: int | str | None = None) -> None:
    """Send all log records to ``stream`` (default: ``sys.stdout``) as JSON lines.

    The level filter is mtg's: ``debug=True`` shows everything, otherwise only warnings
    and errors. ``level`` (a ``logging`` level number or one of ``debug``, ``info``,
    ``warn``, ``error``) overrides that choice. The handler is attached to the root
    logger so that library records (asyncio, uvloop) come out in the same format.
    Calling setup() again replaces the previous handler. Raises ValueError for an
    unknown level name.
    """
    global _installed

    threshold = _resolve_level(debug, level)
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(MtgJsonFormatter())
    handler.addFilter(RedactSecrets())

    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    root.setLevel(threshold)
    _installed = handler


def _resolve_level(debug: bool, level: int | str | None) -> int:
    if level is None:
        return logging.DEBUG if debug else logging.WARNING
    if isinstance(level, int):
        return level
    try:
        return _LEVEL_NAMES[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def level_name(levelno: int) -> str:
    """Map a ``logging`` level number to zerolog's name (``warn``, not ``warning``)."""
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def short_logger_name(name: str) -> str:
    """``mtgworkers.proxy`` -> ``proxy``; ``mtgworkers`` and the root logger -> ``""``."""
    if name in (PACKAGE_LOGGER, "root"):
        return ""
    if name.startswith(PACKAGE_LOGGER + "."):
        return name[len(PACKAGE_LOGGER) + 1 :]
    return name


def error_text(exc: BaseException) -> str:
    """The text for the ``error`` field: the exception message, or its class name if empty."""
    return str(exc) or type(exc).__name__


def _to_json(value: Any) -> Any:
    # json.dumps calls this for anything it cannot encode. str() and never a field-by-field
    # dump: a dataclass such as Secret would otherwise print its key.
    if isinstance(value, BaseException):
        return error_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (set, frozenset)):
        return sorted(str(item) for item in value)
    return str(value)


class MtgJsonFormatter(JsonFormatter):
    """Formats a record as one compact JSON object with mtg's field names."""

    def __init__(self) -> None:
        super().__init__(
            json_default=_to_json,
            json_serializer=partial(json.dumps, separators=(",", ":")),
            json_ensure_ascii=False,
        )

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        """Fill ``log_data`` in mtg's order: fixed fields, extra fields, then ``error``."""
        log_data["level"] = level_name(record.levelno)
        log_data["logger"] = short_logger_name(record.name)
        log_data["timestamp"] = int(record.created * 1000)
        log_data["message"] = record.message
        for key, value in message_dict.items():
            # Our base class puts the formatted traceback under exc_info; mtg prints only the
            # error text, which is added below.
            if key not in ("exc_info", "stack_info") and key not in _FIXED_FIELDS:
                log_data[key] = value
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_") or key in _FIXED_FIELDS:
                continue
            log_data[_FIELD_ALIASES.get(key, key)] = value
        error = log_data.get("error")
        if isinstance(error, BaseException):
            log_data["error"] = error_text(error)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            if error is None:
                log_data["error"] = error_text(exc)
            if record.levelno >= logging.ERROR:
                log_data["traceback"] = message_dict.get("exc_info") or record.exc_text


class RedactSecrets(logging.Filter):
    """Replaces sensitive fields of a record (and of dict/list fields, recursively).

    Nested values are copied, never changed in place: the caller's dicts stay intact.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always lets the record through."""
        fields = record.__dict__
        for key in list(fields):
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            fields[key] = _redact(key, fields[key])
        if isinstance(record.msg, Mapping):
            record.msg = _redact_mapping(record.msg)
        return True


def _redact(key: Any, value: Any) -> Any:
    if isinstance(key, str) and key.lower() in _SENSITIVE_FIELDS and value is not None:
        return REDACTED
    if isinstance(value, Mapping):
        return _redact_mapping(value)
    if isinstance(value, (list, tuple)):
        return [_redact(None, item) for item in value]
    return value


def _redact_mapping(value: Mapping[Any, Any]) -> dict[Any, Any]:
    return {key: _redact(key, item) for key, item in value.items()}
