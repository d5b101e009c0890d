"""The dead-letter wire format: what ``build_dead_letter`` writes, ``parse_dead_letter`` reads back."""

from __future__ import annotations

from typing import Any

import pytest

from cdc_service.core.dead_letters import (
    DETAIL_LIMIT,
    H_DETAIL,
    H_EXPECTED_STREAM,
    H_MSG_ID,
    H_SOURCE_SUBJECT_ESCAPED,
    H_TRUNCATED,
    DeadLetterHeaders,
    build_dead_letter,
    header_bytes,
    parse_dead_letter,
)
from cdc_service.core.outcomes import Reason

BIG = 1024 * 1024


def build(**overrides: Any) -> Any:
    args: dict[str, Any] = {
        "subject_prefix": "dlq",
        "dlq_stream": "cdc_dlq_stream",
        "max_payload": BIG,
        "source_subject": "cdc.acme.messages",
        "data": b'{"record": {}}',
        "stream": "cdc_events_stream",
        "seq": 41,
        "delivered": 2,
        "reason": Reason.INVALID_JSON.value,
        "detail": "JSONDecodeError: at 1",
    }
    args.update(overrides)
    return build_dead_letter(**args)


def test_round_trip_gives_back_what_went_in() -> None:
    dead = build()
    assert dead.subject == "dlq.cdc.acme.messages"
    assert dead.data == b'{"record": {}}'
    assert dead.headers[H_MSG_ID] == "dlq:cdc_events_stream:41"
    assert dead.headers[H_EXPECTED_STREAM] == "cdc_dlq_stream"
    assert parse_dead_letter(dead.subject, dead.headers, "dlq") == DeadLetterHeaders(
        reason="invalid_json",
        detail="JSONDecodeError: at 1",
        source_subject="cdc.acme.messages",
        source_stream="cdc_events_stream",
        source_seq=41,
        delivered=2,
        truncated_from=None,
        subject_escaped=False,
    )


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_round_trips(reason: Reason) -> None:
    dead = build(reason=reason.value)
    assert parse_dead_letter(dead.subject, dead.headers, "dlq").reason == reason.value


@pytest.mark.parametrize("max_payload", [700, 1500, 4096])
def test_a_body_too_large_is_cut_to_fit_and_says_so(max_payload: int) -> None:
    data = b"x" * 10_000
    dead = build(data=data, max_payload=max_payload)
    assert len(dead.data) + header_bytes(dead.headers) <= max_payload
    assert dead.data == data[: len(dead.data)]
    parsed = parse_dead_letter(dead.subject, dead.headers, "dlq")
    assert parsed.truncated_from == 10_000
    assert parsed.source_seq == 41  # where the whole original stays


def test_a_body_that_fits_is_not_cut() -> None:
    data = b"y" * 500
    dead = build(data=data, max_payload=2000)
    assert dead.data == data and H_TRUNCATED not in dead.headers


def test_headers_larger_than_max_payload_leave_an_empty_body() -> None:
    dead = build(data=b"z" * 100, max_payload=100)
    assert dead.data == b""
    assert parse_dead_letter(dead.subject, dead.headers, "dlq").truncated_from == 100


def test_a_hostile_detail_is_one_printable_line_of_bounded_length() -> None:
    detail = "line one\r\nX-Evil: 1\x00\x1b[31m" + "é" * 1000
    dead = build(detail=detail)
    written = dead.headers[H_DETAIL]
    assert written.isprintable() and len(written) == DETAIL_LIMIT
    assert "\n" not in written and "\r" not in written
    assert parse_dead_letter(dead.subject, dead.headers, "dlq").detail == written
    assert written.startswith("line one  X-Evil: 1")


def test_a_subject_that_is_not_utf8_is_escaped_and_flagged() -> None:
    source = b"cdc.acme.\xff\xfe".decode("utf-8", "surrogateescape")
    dead = build(source_subject=source)
    assert dead.headers[H_SOURCE_SUBJECT_ESCAPED] == "true"
    parsed = parse_dead_letter(dead.subject, dead.headers, "dlq")
    assert parsed.subject_escaped is True
    assert parsed.source_subject == "cdc.acme.\\xff\\xfe"
    assert dead.subject.startswith("dlq._subject.")  # not publishable as is: a hashed stand-in


def test_a_subject_with_a_wildcard_token_gets_a_stable_stand_in() -> None:
    first, again = build(source_subject="cdc.acme.>"), build(source_subject="cdc.acme.>")
    assert first.subject == again.subject and first.subject.startswith("dlq._subject.")
    assert parse_dead_letter(first.subject, first.headers, "dlq").source_subject == "cdc.acme.>"


def test_parse_is_lenient_with_missing_and_malformed_headers() -> None:
    parsed = parse_dead_letter("dlq.cdc.acme.chats", {"Cdc-Source-Seq": "seven", "Cdc-Delivered": ""}, "dlq")
    assert parsed == DeadLetterHeaders(
        reason="unknown",
        detail="",
        source_subject="cdc.acme.chats",  # from the subject when the header is absent
        source_stream="",
        source_seq=None,
        delivered=None,
        truncated_from=None,
        subject_escaped=False,
    )
    assert parse_dead_letter("other.subject", None, "dlq").source_subject == ""
