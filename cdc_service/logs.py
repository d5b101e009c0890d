"""Logs on stdout, with per-event context from a ``contextvars`` filter: JSON lines (python-json-logger) for
containers, or ``log.format = "console"``: one readable line per record for a terminal (``make run``)."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

SERVICE = "cdc_service"
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("cdc_log_context", default=_EMPTY)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (event_id, table, company, subject, stream_seq, ...) to every record logged inside."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.service = SERVICE
        name = record.name
        record.component = name.rsplit(".", 1)[-1] if name.startswith(SERVICE + ".") else name
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


# Attributes every LogRecord has; whatever else a record carries came from ``extra`` or ``bound``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_CONSOLE_SKIP = frozenset({"service", "component"})


class ConsoleFormatter(logging.Formatter):
    """``12:00:01.234 WARNING  engine   dead-lettering message  reason=invalid_json stream_seq=7``: local time, the
    level, the component, the message, then the extra fields as ``key=value`` (values with spaces quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = [
            f"{key}={_console_value(value)}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and key not in _CONSOLE_SKIP and not key.startswith("_")
        ]
        component = getattr(record, "component", record.name)
        line = f"{stamp} {record.levelname:<8} {component:<8} {record.getMessage()}"
        if fields:
            line += "  " + " ".join(fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _console_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text) if not text or any(c.isspace() or c in "'\"=" for c in text) else text


def configure(level: str, stream: Any = None, fmt: str = "json") -> None:
    """Route every logger to one handler (``fmt``: ``json`` or ``console``). Call once, from the main thread, before
    anything logs."""
    handler = logging.StreamHandler(stream or sys.stdout)
    if fmt == "console":
        handler.setFormatter(ConsoleFormatter())
    else:
        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",  # ISO 8601, UTC
            )
        )
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The service passes its own error_cb, so nats-py's logger only speaks when something is wrong inside the
    # client (e.g. its read loop ended on an exception): those must be seen.
    logging.getLogger("nats").setLevel(logging.WARNING)
