"""Plain reasons for bodies the parser refuses: a byte position, never simdjson's alarming text or the body."""

from __future__ import annotations

import pytest
import simdjson

from cdc_service.core.events import json_problem

CASES = [
    (
        b'{"record": {"message_id": "m1",\n\t',
        "body is not valid JSON: expecting property name enclosed in double quotes at byte 33 (line 2, column 2)",
    ),
    (b"not json", "body is not valid JSON: expecting value at byte 0 (line 1, column 1)"),
    (b'{"a": 1} x', "body is not valid JSON: extra data at byte 9 (line 1, column 10)"),
    (b"", "body is not valid JSON: expecting value at byte 0 (line 1, column 1)"),
    ('{"é": x}'.encode(), "body is not valid JSON: expecting value at byte 7 (line 1, column 7)"),
    (b'{"a": "\xff"}', "body is not valid UTF-8 at byte 7"),
    (b'{"a": 123456789012345678901234567890}', "body cannot be parsed: an integer does not fit in 64 bits"),
    (b'{"a": 1e999}', "body cannot be parsed: a number is out of range"),
    (b"[" * 5000 + b"]" * 5000, "body cannot be parsed: it is nested too deeply"),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_plain_reason_with_position(data: bytes, expected: str) -> None:
    with pytest.raises((ValueError, RuntimeError)) as refused:
        simdjson.Parser().parse(data, True)
    problem = json_problem(data, refused.value)
    assert problem == expected
    assert "TAPE_ERROR" not in problem and "fatal" not in problem
