"""row_data carries every number exactly as the source wrote it (Postgres numeric columns must not pass through a
double), and every other value unchanged."""

from __future__ import annotations

import json

import orjson
import pytest
import simdjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import Publish
from cdc_service.core.subjects import SubjectLayout
from tests.corpus.hostile import GOOD, _sub

BUILDER = EventBuilder(SubjectLayout("cdc.{company}.{table}"), Settings().routes, 1 << 20)


def _row_data_text(numbers: str) -> bytes:
    data = _sub(b'"id": 1', b'"id": 1, "n": ' + numbers.encode())
    outcome = BUILDER.plan("cdc.acme.messages", data, simdjson.Parser())
    assert isinstance(outcome, Publish), outcome
    return outcome.payload


@pytest.mark.parametrize(
    "number",
    [
        "123456789012345678901234567890.5",
        "1E2",
        "1e-7",
        "-0",
        "-0.0",
        "0.10",
        "2.50E+10",
        "1.7976931348623157e308",
        "0.1000000000000000055511151231257827",
        "[1.0, -0, 3E0, 4]",
    ],
)
def test_numbers_are_published_byte_for_byte(number: str) -> None:
    payload = _row_data_text(number)
    assert b'"n":' + number.replace(", ", ",").encode() in payload
    json.loads(payload)  # still valid JSON


def test_rows_without_such_numbers_are_unchanged_in_value() -> None:
    outcome = BUILDER.plan("cdc.acme.messages", GOOD, simdjson.Parser())
    assert isinstance(outcome, Publish)
    assert orjson.loads(outcome.payload)["row_data"] == json.loads(GOOD)["record"]


json_number = st.from_regex(r"\A-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,3})?\Z", fullmatch=True)


@settings(derandomize=True, deadline=None, database=None, max_examples=300)
@given(json_number)
def test_any_json_number_round_trips_exactly(number: str) -> None:
    try:
        simdjson.Parser().parse(b'{"n": ' + number.encode() + b"}")
    except (ValueError, RuntimeError):
        return  # out of simdjson's range (1e999, integers past 64 bits): dead-lettered as invalid_json instead
    assert b'"n":' + number.encode() + b',"message_id"' in _row_data_text(number)
