"""JSON logs on stdout (python-json-logger), with per-event context from a ``contextvars`` filter."""

from __future__ import annotations

import contextvars
import logging
import sys
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


def configure(level: str, stream: Any = None) -> None:
    """Route every logger to one JSON-lines handler. Call once, from the main thread, before anything logs."""
    handler = logging.StreamHandler(stream or sys.stdout)
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
