"""Correlation headers: a stable, well-formed X-Request-ID per event_id; traceparent passed through only when valid."""

from __future__ import annotations

import re
from hashlib import blake2b

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_service.core.correlation import CORRELATION_HEADER_BYTES, request_id, traceparent
from cdc_service.ports import source_position

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_request_id_is_fixed_size_hex_and_stable() -> None:
    rid = request_id("1000:messages:m1")
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert rid == request_id("1000:messages:m1")  # every retry and replica derives the same one
    assert rid != request_id("1000:messages:m1 ")


@given(st.text(max_size=300), st.text(max_size=300))
def test_distinct_event_ids_get_distinct_request_ids(a: str, b: str) -> None:
    if a != b:
        assert request_id(a) != request_id(b)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id(a))


@given(st.text(max_size=3000))
def test_request_id_is_the_blake2b_128_digest_of_the_event_id(event_id: str) -> None:
    # The shared, copied hasher must give exactly what a fresh one gives (ids already published keep theirs).
    expected = blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    assert request_id(event_id) == expected


def test_request_id_value_is_pinned() -> None:
    assert request_id("1000:messages:m1") == "de3a6b2c3a7b687d65b30550521de38e"
    # A lone surrogate, encoded with surrogatepass.
    assert request_id("1:a:\ud800") == "bdc1190507f46ed5b004b4416821edd7"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, ""),
        ({}, ""),
        ({"traceparent": VALID}, VALID),
        ({"Traceparent": VALID.upper()}, VALID),
        ({"traceparent": VALID + "-extra"}, ""),
        ({"traceparent": "ff" + VALID[2:]}, ""),  # version ff is invalid
        ({"traceparent": "00-" + "0" * 32 + VALID[35:]}, ""),  # all-zero trace id
        ({"traceparent": VALID[:36] + "0" * 16 + "-01"}, ""),  # all-zero span id
        ({"traceparent": "00-xyz\r\nX-Evil: 1"}, ""),
        ({"traceparent": "a" * 10_000}, ""),
    ],
)
def test_traceparent(headers: dict[str, str] | None, expected: str) -> None:
    assert traceparent(headers) == expected


def test_correlation_headers_are_small_and_fixed() -> None:
    block = f"X-Request-ID: {request_id('x' * 1000)}\r\ntraceparent: {VALID}\r\n"
    assert len(block) == CORRELATION_HEADER_BYTES <= 128


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.cdc_events_stream.cdc_consumers.2.17.9.1700000000000000000.0", ("cdc_events_stream", 17)),
        (
            "$JS.ACK.hub.ACCHASH.cdc_events_stream.cdc_consumers.2.17.9.1700000000000000000.0.tok",
            ("cdc_events_stream", 17),
        ),
        ("_INBOX.abc", ("", None)),
        ("$JS.ACK.s.c.1.x.1.1.0", ("", None)),
    ],
)
def test_source_position(reply: str, expected: tuple[str, int | None]) -> None:
    assert source_position(reply) == expected
