"""The pure half of the dead-letter tools: a stored message becomes a row; ages, previews, the table, JSON lines."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from cdc_service.core.dead_letters import source_subject_of
from cdc_service.dlq import (
    HEADER,
    DeadLetterEntry,
    entry_from_message,
    entry_json,
    format_age,
    format_row,
    format_table,
    matches,
    parse_duration,
    parse_seqs,
    preview,
    replay_msg_id,
    replay_problem,
    show_lines,
)

HEADERS = {
    "Nats-Msg-Id": "dlq:cdc_events_stream:7",
    "Cdc-Error-Reason": "tenant_mismatch",
    "Cdc-Error-Detail": "record.company_id 'globex' differs from the subject's company 'acme'",
    "Cdc-Source-Subject": "cdc.acme.messages",
    "Cdc-Source-Stream": "cdc_events_stream",
    "Cdc-Source-Seq": "7",
    "Cdc-Delivered": "1",
}
STORED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _entry(**overrides: Any) -> DeadLetterEntry:
    entry = entry_from_message(3, "dlq.cdc.acme.messages", HEADERS, b'{"record": {}}', STORED, "dlq")
    return replace(entry, **overrides)


# ------------------------------------------------------------------------------------------------ rows


def test_entry_reads_every_header() -> None:
    entry = entry_from_message(3, "dlq.cdc.acme.messages", HEADERS, b"{}", STORED, "dlq")
    assert entry.seq == 3
    assert entry.reason == "tenant_mismatch"
    assert entry.detail.startswith("record.company_id")
    assert entry.source_subject == "cdc.acme.messages"
    assert entry.source_stream == "cdc_events_stream"
    assert entry.source_seq == 7
    assert entry.delivered == 1
    assert entry.stored_at == STORED.timestamp()
    assert entry.data == b"{}"


def test_entry_without_headers_or_body() -> None:
    entry = entry_from_message(9, "dlq.cdc.acme.chats", None, None, None, "dlq")
    assert entry.reason == "unknown"
    assert entry.source_subject == "cdc.acme.chats"  # from the subject, prefix removed
    assert entry.source_stream == ""
    assert entry.source_seq is None
    assert entry.delivered is None
    assert entry.stored_at is None
    assert entry.data == b""


def test_bad_numbers_in_headers_are_none() -> None:
    entry = entry_from_message(1, "dlq.x", {"Cdc-Source-Seq": "seven", "Cdc-Delivered": ""}, b"", 0.0, "dlq")
    assert entry.source_seq is None
    assert entry.delivered is None


@pytest.mark.parametrize(
    ("subject", "headers", "prefix", "expected"),
    [
        ("dlq.cdc.acme.messages", {"Cdc-Source-Subject": "cdc.other.chats"}, "dlq", "cdc.other.chats"),
        ("dlq.cdc.acme.messages", {}, "dlq", "cdc.acme.messages"),
        ("dead.letters.cdc.acme.messages", {}, "dead.letters", "cdc.acme.messages"),
        ("dlq.cdc.acme.messages", {"Cdc-Source-Subject": "  "}, "dlq", "cdc.acme.messages"),
        ("other.cdc.acme.messages", {}, "dlq", ""),
        ("dlq.", {}, "dlq", ""),
        ("dlq", {}, "dlq", ""),
    ],
)
def test_source_subject(subject: str, headers: dict[str, str], prefix: str, expected: str) -> None:
    assert source_subject_of(subject, headers, prefix) == expected


# ------------------------------------------------------------------------------------------------ age


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (-5, "0s"),
        (59, "59s"),
        (60, "1m00s"),
        (307, "5m07s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3 * 3600 + 5 * 60 + 59, "3h05m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (2 * 86400 + 4 * 3600, "2d04h"),
        (15 * 86400, "15d00h"),
    ],
)
def test_format_age(seconds: float, expected: str) -> None:
    assert format_age(seconds) == expected


def test_age_from_the_stored_timestamp() -> None:
    now = STORED.timestamp() + 125
    assert format_row(_entry(), now)[1] == "2m05s"
    assert format_row(_entry(stored_at=None), now)[1] == "?"


# ------------------------------------------------------------------------------------------------ preview


def test_preview_short_body_unchanged() -> None:
    assert preview(b'{"record": {"message_id": "m1"}}') == '{"record": {"message_id": "m1"}}'
    assert preview(b"") == ""


def test_preview_exactly_the_limit_is_not_cut() -> None:
    assert preview(b"a" * 80) == "a" * 80


def test_preview_cut_at_80_characters_with_a_marker() -> None:
    text = preview(b"a" * 81)
    assert text == "a" * 79 + "…"
    assert len(text) == 80
    assert len(preview(b"x" * 1_000_000)) == 80


def test_preview_escapes_control_characters() -> None:
    assert preview(b'{"a":\n\t"b\x00\x1b"}\r') == '{"a":\\n\\t"b\\x00\\x1b"}\\r'
    assert "\n" not in preview(b"line1\nline2")


def test_preview_keeps_printable_unicode_and_escapes_invisible_ones() -> None:
    assert preview("héllo 日本".encode()) == "héllo 日本"
    assert preview("a\u200bb\u0085c".encode()) == "a\\u200bb\\u0085c"
    assert preview("x\U000e0001y".encode()) == "x\\U000e0001y"


def test_preview_shows_invalid_utf8_bytes() -> None:
    assert preview(b"ab\xff\xfecd") == "ab\\xff\\xfecd"
    assert preview(b'{"x": "\xc3"}') == '{"x": "\\xc3"}'  # a multi-byte character cut short


def test_preview_never_cuts_an_escape_in_half() -> None:
    for head in range(70, 81):
        text = preview(b"a" * head + b"\x00" * 20)
        assert len(text) <= 80
        assert text.endswith("…")
        body = text[:-1]
        assert body == "a" * min(head, 79) + "\\x00" * ((79 - min(head, 79)) // 4)


def test_preview_of_a_big_multibyte_body() -> None:
    text = preview("é".encode() * 1000)
    assert text == "é" * 79 + "…"


def test_preview_limit_is_a_parameter() -> None:
    assert preview(b"abcdef", limit=4) == "abc…"
    assert preview(b"abcd", limit=4) == "abcd"


# ------------------------------------------------------------------------------------------------ table, JSON


def test_format_row() -> None:
    row = format_row(_entry(), STORED.timestamp() + 3)
    detail = "record.company_id 'globex' differs from the subject's compa…"
    assert row == ("3", "3s", "tenant_mismatch", "cdc.acme.messages", detail, '{"record": {}}')
    assert len(detail) == 60
    unknown = format_row(_entry(source_subject=""), STORED.timestamp())
    assert unknown[3] == "? (dlq.cdc.acme.messages)"
    assert format_row(_entry(detail=""), STORED.timestamp())[4] == "-"
    assert format_row(_entry(detail="a\nb"), STORED.timestamp())[4] == "a\\nb"  # one line


def test_format_table_aligns_columns_and_keeps_preview_last() -> None:
    now = STORED.timestamp() + 10
    entries = [
        _entry(),
        _entry(seq=12345, reason="invalid_json", source_subject="cdc.acme.chats", data=b"{not json"),
    ]
    lines = format_table(entries, now)
    assert len(lines) == 3
    assert lines[0].split() == list(HEADER)
    # every column starts at the same offset on every line
    starts = [lines[0].index(name) for name in HEADER]
    for line, entry in zip(lines[1:], entries, strict=True):
        assert line[starts[2] :].startswith(entry.reason)
        assert line[starts[3] :].startswith(entry.source_subject)
        assert line[starts[4] :].startswith(entry.detail[:20])
        assert line[starts[5] :] == preview(entry.data)
    assert format_table([], now) == ["  ".join(["SEQ", "AGE", "REASON", "SUBJECT", "DETAIL", "PREVIEW"])]


def test_entry_json() -> None:
    line = entry_json(_entry(data=b"x" * 200), STORED.timestamp() + 1.5)
    assert line["seq"] == 3
    assert line["reason"] == "tenant_mismatch"
    assert line["source_subject"] == "cdc.acme.messages"
    assert line["source_seq"] == 7
    assert line["age_seconds"] == 1.5
    assert line["size"] == 200
    assert line["preview"] == "x" * 79 + "…"
    assert "data" not in line
    assert entry_json(_entry(stored_at=None), 0.0)["age_seconds"] is None


def test_matches() -> None:
    entry = _entry()
    assert matches(entry, frozenset())
    assert matches(entry, {"tenant_mismatch"})
    assert matches(entry, {"invalid_json", "tenant_mismatch"})
    assert not matches(entry, {"invalid_json"})


def test_matches_by_age() -> None:
    entry, stored = _entry(), STORED.timestamp()
    assert matches(entry, frozenset(), older_than=3600, now=stored + 3600)
    assert not matches(entry, frozenset(), older_than=3600, now=stored + 3599)
    assert not matches(entry, {"invalid_json"}, older_than=1, now=stored + 10)  # both must hold
    assert not matches(_entry(stored_at=None), frozenset(), older_than=0, now=stored)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1.5h", 5400), ("45", 45)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7w", "-1d", "d", "1 d d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_parse_seqs() -> None:
    assert parse_seqs("5") == [5]
    assert parse_seqs("7, 5,7 ,12") == [7, 5, 12]
    for bad in ("", "0", "5,,6", "a", "5-7", "²"):
        with pytest.raises(ValueError, match="sequences"):
            parse_seqs(bad)


def test_show_json_body_is_indented_and_headers_listed() -> None:
    lines = show_lines(_entry(), HEADERS, STORED.timestamp() + 65)
    assert lines[:3] == [
        "seq:      3",
        "subject:  dlq.cdc.acme.messages",
        "stored:   2026-01-02T03:04:05.000Z (1m05s ago)",
    ]
    assert "  Cdc-Error-Reason: tenant_mismatch" in lines
    assert lines[-4:] == ["body (14 bytes, JSON, indented):", "{", '  "record": {}', "}"]


def test_show_raw_body_is_escaped_never_raw_control_bytes() -> None:
    data = b'{"a": 1,\n\x1b[31mred\xff\xfe\t'
    lines = show_lines(_entry(data=data), {"Cdc-Error-Detail": "x\x1by"}, STORED.timestamp())
    assert "  Cdc-Error-Detail: x\\x1by" in lines
    assert lines[-3:] == [f"body ({len(data)} bytes, not JSON; escaped):", '{"a": 1,', "\\x1b[31mred\\xff\\xfe\\t"]
    assert not any("\x1b" in line for line in lines)


def test_show_says_when_the_body_was_cut() -> None:
    lines = show_lines(_entry(truncated_from=5000), HEADERS, STORED.timestamp())
    assert "cut from 5000; the original is message 7 of the source stream" in lines[-4]


# ------------------------------------------------------------------------------------------------ replay rules


def test_replay_problem() -> None:
    assert replay_problem(_entry(), "cdc_events_stream") == ""
    assert replay_problem(_entry(source_stream=""), "cdc_events_stream") == ""  # unknown: the PubAck decides
    assert "other_stream" in replay_problem(_entry(source_stream="other_stream"), "cdc_events_stream")
    assert "Cdc-Source-Subject" in replay_problem(_entry(source_subject=""), "cdc_events_stream")


def test_replay_msg_id_is_stable_and_unique_per_stored_message() -> None:
    entry = _entry()
    assert replay_msg_id("cdc_dlq_stream", entry) == replay_msg_id("cdc_dlq_stream", entry)
    assert replay_msg_id("cdc_dlq_stream", entry).startswith("replay:cdc_dlq_stream:3:")
    assert replay_msg_id("cdc_dlq_stream", entry) != replay_msg_id("cdc_dlq_stream", _entry(seq=4))
    # the same sequence in a recreated stream was stored at another time
    later = _entry(stored_at=STORED.timestamp() + 60)
    assert replay_msg_id("cdc_dlq_stream", entry) != replay_msg_id("cdc_dlq_stream", later)
    assert replay_msg_id("cdc_dlq_stream", _entry(stored_at=None)) == "replay:cdc_dlq_stream:3"


def test_a_truncated_dead_letter_is_not_replayed() -> None:
    entry = DeadLetterEntry(
        seq=4,
        subject="dlq.cdc.acme.messages",
        reason="payload_too_large",
        detail="",
        source_subject="cdc.acme.messages",
        source_stream="cdc_events_stream",
        source_seq=77,
        delivered=1,
        stored_at=None,
        data=b"{",
        truncated_from=5000,
    )
    problem = replay_problem(entry, "cdc_events_stream")
    assert "5000 bytes" in problem
    assert "77" in problem
