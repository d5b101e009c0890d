"""row_data carries every number exactly as the source wrote it (Postgres numeric columns must not pass through a
double), and every other value unchanged."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import simdjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder, _has_negative_zero, _needs_exact_numbers
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


def _needs_exact_reference(record: Any, data: bytes) -> bool:
    """The walk as first written (one uniform loop): the faster one must answer exactly like it."""
    stack = [record]
    zero = False
    while stack:
        container = stack.pop()
        for value in container.values() if type(container) is dict else container:
            kind = type(value)
            if kind is float:
                return True
            if kind is dict or kind is list:
                stack.append(value)
            elif kind is int and value == 0:
                zero = True
    return zero and _has_negative_zero(data)


@pytest.mark.parametrize(
    ("record_text", "expected"),
    [
        ('{"a": "x", "b": 1, "c": null, "d": true}', False),
        ('{"a": 1.5}', True),
        ('{"a": "x", "b": {"c": [1, {"d": 2.0}]}}', True),  # nested float
        ('{"a": [1, 2, 1E2]}', True),
        ('{"a": 0}', False),  # a zero written "0"
        ('{"a": -0}', True),
        ('{"a": {"b": [-0]}}', True),  # nested -0
        ('{"a": {"b": [0]}, "s": "x,-0"}', True),  # a 0, and "-0" after "," inside a string: conservative
        ('{"a": false, "s": "x,-0"}', False),  # False is not a zero, whatever the body holds
        ('{"a": [false, true], "s": "x,-0"}', False),
        ('{"a": {}, "b": [], "c": [[], {}]}', False),
        ('{"a": [[[[0]]]], "b": "[-0"}', True),
        ('{"a": -0, "b": 1.0}', True),
    ],
)
def test_which_records_take_the_exact_path(record_text: str, expected: bool) -> None:
    data = b'{"record": ' + record_text.encode() + b"}"
    record = simdjson.Parser().parse(data, True)["record"]
    assert _needs_exact_numbers(record, data) is expected
    assert _needs_exact_reference(record, data) is expected


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "x", "-0", "a,-0"]),
)
_tree = st.recursive(
    _leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=4)
)


@settings(derandomize=True, deadline=None, database=None, max_examples=300)
@given(st.dictionaries(st.text(max_size=3), _tree, max_size=6), st.sampled_from([b"", b'{"x": -0}', b"[-0]"]))
def test_exact_path_choice_matches_the_reference_walk(record: dict[str, Any], extra: bytes) -> None:
    data = json.dumps(record).encode() + extra
    assert _needs_exact_numbers(record, data) == _needs_exact_reference(record, data)


def _has_negative_zero_reference(data: bytes) -> bool:
    """The scan as first written, with ``bytes.find``."""
    at = data.find(b"-0")
    while at >= 0:
        after = data[at + 2 : at + 3]
        if after not in (b".", b"e", b"E") and not after.isdigit():
            before = at - 1
            while before >= 0 and data[before] in b" \t\r\n":
                before -= 1
            if before >= 0 and data[before] in b":[,":
                return True
        at = data.find(b"-0", at + 2)
    return False


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"a": -0}', True),
        (b'{"a":-0,"b":1}', True),
        (b'{"a": [1,\t\n -0]}', True),
        (b"[-0]", True),
        (b"-0", False),  # nothing before it: not a value inside a document
        (b'{"a": -0.0}', False),  # a float: the walk finds it
        (b'{"a": -0e1, "b": -0E1, "c": -01}', False),
        (b'{"d": "2026-01-05", "e": "x-0y"}', False),
        (b'{"d": "a,-0"}', True),  # inside a string: only conservative
        (b'{"a": 1}', False),
        (b"", False),
    ],
)
def test_negative_zero_scan(data: bytes, expected: bool) -> None:
    assert _has_negative_zero(data) is expected
    assert _has_negative_zero_reference(data) is expected


@settings(derandomize=True, deadline=None, database=None, max_examples=500)
@given(
    st.lists(st.sampled_from([b"-0", b"-", b"0", b"1", b".", b"e", b"E", b":", b",", b"[", b" ", b"\n", b'"', b"x"]))
)
def test_negative_zero_scan_matches_the_find_loop(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert _has_negative_zero(data) == _has_negative_zero_reference(data)
