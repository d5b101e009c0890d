"""The two log formats and the settings that choose them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from cdc_service import logs
from cdc_service.config import ConfigError, settings_from_mapping


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(fmt: str) -> str:
    out = io.StringIO()
    logs.configure("DEBUG", out, fmt=fmt)
    with logs.bound(stream_seq=7, event_id="0/16B3748:messages:m 1"):
        logging.getLogger("cdc_service.engine").warning("dead-lettering message", extra={"reason": "invalid_json"})
    return out.getvalue()


def test_json_is_the_default_and_carries_bound_fields(restore_logging: None) -> None:
    line = json.loads(_emit("json"))
    assert line["message"] == "dead-lettering message"
    assert (line["level"], line["component"], line["stream_seq"], line["reason"]) == (
        "WARNING",
        "engine",
        7,
        "invalid_json",
    )


def test_console_is_one_readable_line_with_the_fields(restore_logging: None) -> None:
    text = _emit("console")
    assert text.count("\n") == 1
    assert " WARNING  engine   dead-lettering message  " in text
    assert "stream_seq=7" in text and "reason=invalid_json" in text
    assert "event_id='0/16B3748:messages:m 1'" in text  # quoted: it has a space
    assert "service=" not in text


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"log": {"format": "text"}}, "log.format"),
        ({"http": {"read_timeout": 0}}, "http.read_timeout"),
        ({"http": {"max_connections": 0}}, "http.max_connections"),
    ],
)
def test_bad_operator_settings_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(raw)
    assert str(info.value).startswith(key + ":")


def test_operator_setting_defaults() -> None:
    s = settings_from_mapping({})
    assert (s.log.format, s.http.read_timeout, s.http.max_connections) == ("json", 5.0, 512)


def test_interval_figures() -> None:
    from collections import Counter

    from cdc_service.summary import interval_figures

    before = Counter({"published": 10, "skipped": 5})
    after = Counter({"published": 40, "skipped": 5, "dead_lettered": 2})
    figures = interval_figures(after, before, 10.0, 1.23456, 7)
    assert figures == {
        "interval_seconds": 10.0,
        "interval_handled": 32,
        "interval_published": 30,
        "interval_dead_lettered": 2,
        "handled_per_second": 3.2,
        "published_per_second": 3.0,
        "lag_seconds": 1.235,
        "backlog": 7,
    }
    assert interval_figures(after, after, 10.0, None, None)["lag_seconds"] is None
