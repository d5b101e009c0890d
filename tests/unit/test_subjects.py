"""Subject layouts (positional parsing) and subject-token safety."""

from __future__ import annotations

import pytest

from cdc_service.core.subjects import (
    MAX_TOKEN_BYTES,
    LayoutError,
    SubjectInfo,
    SubjectLayout,
    captured_by,
    covers,
    token_problem,
)

CDC = "cdc.{company}.{table}"
SEQUIN = "sequin.changes.{database}.{schema}.{table}.{action}"


@pytest.mark.parametrize(
    ("layout", "subject", "expected"),
    [
        (CDC, "cdc.acme.messages", SubjectInfo(table="messages", company="acme")),
        (CDC, "cdc.42.chats", SubjectInfo(table="chats", company="42")),
        (
            SEQUIN,
            "sequin.changes.chatdb.public.messages.insert",
            SubjectInfo(table="messages", database="chatdb", schema="public", action="insert"),
        ),
        (
            "sequin.{database}.{schema}.{table}.{action}",
            "sequin.chatdb.public.agents.delete",
            SubjectInfo(table="agents", database="chatdb", schema="public", action="delete"),
        ),
        ("{table}", "contacts", SubjectInfo(table="contacts")),
        # literal text around a field inside its token
        ("cdc.daisi_{company}.{table}", "cdc.daisi_acme.messages", SubjectInfo(table="messages", company="acme")),
        ("cdc.daisi_{company}.{table}", "cdc.daisi_daisi_x.chats", SubjectInfo(table="chats", company="daisi_x")),
        ("cdc.{company}-eu.t_{table}", "cdc.acme-eu.t_agents", SubjectInfo(table="agents", company="acme")),
        ("cdc.x{table}", "cdc.xx", SubjectInfo(table="x")),
    ],
)
def test_parse_match(layout: str, subject: str, expected: SubjectInfo) -> None:
    assert SubjectLayout(layout).parse(subject) == expected


@pytest.mark.parametrize(
    ("layout", "subject", "fragment"),
    [
        (CDC, "cdc.acme", "subject has 2 tokens, layout 'cdc.{company}.{table}' has 3"),
        (CDC, "cdc.acme.messages.extra", "subject has 4 tokens, layout 'cdc.{company}.{table}' has 3"),
        (CDC, "", "subject has 1 tokens"),
        (CDC, "cdx.acme.messages", "token 1 is 'cdx', layout 'cdc.{company}.{table}' expects 'cdc'"),
        (CDC, "CDC.acme.messages", "token 1 is 'CDC'"),
        (SEQUIN, "sequin.changes.chatdb.public.messages", "subject has 5 tokens"),
        (SEQUIN, "sequin.changes.chatdb.public.messages.insert.x", "subject has 7 tokens"),
        (SEQUIN, "sequin.change.chatdb.public.messages.insert", "token 2 is 'change'"),
        (SEQUIN, "other.changes.chatdb.public.messages.insert", "token 1 is 'other'"),
        (
            "cdc.daisi_{company}.{table}",
            "cdc.acme.messages",
            "token 2 is 'acme', layout 'cdc.daisi_{company}.{table}' expects 'daisi_{company}'",
        ),
        ("cdc.daisi_{company}.{table}", "cdc.daisi_.messages", "token 2 is 'daisi_'"),  # the value may not be empty
        ("cdc.{company}-eu.{table}", "cdc.acme-us.messages", "token 2 is 'acme-us'"),
        ("cdc.{company}-eu.{table}", "cdc.-eu.messages", "token 2 is '-eu'"),
    ],
)
def test_parse_mismatch_returns_reason(layout: str, subject: str, fragment: str) -> None:
    result = SubjectLayout(layout).parse(subject)
    assert isinstance(result, str)
    assert fragment in result


@pytest.mark.parametrize(
    ("layout", "has_company"),
    [(CDC, True), (SEQUIN, False), ("{company}.{table}", True), ("x.{table}", False)],
)
def test_has_company(layout: str, has_company: bool) -> None:
    assert SubjectLayout(layout).has_company is has_company


def test_layout_keeps_text() -> None:
    assert SubjectLayout(SEQUIN).text == SEQUIN


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        ("cdc.{tenant}.{table}", "unknown token {tenant}"),
        ("cdc.{Company}.{table}", "unknown token {Company}"),
        ("cdc.{company}.{company}.{table}", "token {company} appears twice"),
        ("cdc.{table}.{table}", "token {table} appears twice"),
        ("cdc.{company}", "must contain {table}"),
        ("cdc.*.{table}", "neither a literal"),
        ("cdc.>", "neither a literal"),
        ("cdc..{table}", "neither a literal"),
        ("cdc.{table", "neither a literal"),
        ("cdc.{company}{table}", "neither a literal"),  # one field per token
        ("cdc.a*{company}.{table}", "the text around {company}"),
        ("cdc.{company}>.{table}", "the text around {company}"),
        ("cdc.x{tenant}.{table}", "unknown token {tenant}"),
        ("cdc.a b.{table}", "neither a literal"),
        ("", "neither a literal"),
    ],
)
def test_layout_errors(layout: str, fragment: str) -> None:
    with pytest.raises(LayoutError) as info:
        SubjectLayout(layout)
    assert fragment in str(info.value)


def test_layout_error_is_a_value_error() -> None:
    assert issubclass(LayoutError, ValueError)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "is empty"),
        (".", "contains"),
        ("a.b", "contains"),
        ("*", "contains"),
        ("a*", "contains"),
        (">", "contains"),
        ("a>", "contains"),
        ("a b", "contains"),
        ("a\tb", "contains"),
        ("a\nb", "contains"),
        ("a\rb", "contains"),
        ("a\x00b", "contains"),
        ("a\x01b", "contains"),
        ("a\x1fb", "contains"),
        ("a\x7fb", "contains"),
        ("a\x85b", "contains"),  # NEL, a C1 control that is also whitespace
        ("a\x9bb", "contains"),  # CSI, a C1 control
        ("a\u00a0b", "contains"),  # no-break space
        ("a\u2028b", "contains"),  # line separator
        ("a" * MAX_TOKEN_BYTES + "a", "is longer than 256 bytes"),
        ("é" * 129, "is longer than 256 bytes"),  # 258 bytes in UTF-8
        ("😀" * 65, "is longer than 256 bytes"),  # 260 bytes
    ],
)
def test_token_problem_rejects(value: str, problem: str) -> None:
    result = token_problem(value)
    assert result is not None
    assert result.startswith(problem)


@pytest.mark.parametrize(
    "value",
    [
        "acme",
        "agent-1",
        "chat_1",
        "42",
        "a" * MAX_TOKEN_BYTES,  # exactly 256 bytes
        "é" * 128,  # exactly 256 bytes
        "ünïcødé",
        "会社",
        "😀",
        "a+b=c@d,e;f",
        "$JS",
    ],
)
def test_token_problem_accepts(value: str) -> None:
    assert token_problem(value) is None


def test_max_token_bytes_is_256() -> None:
    assert MAX_TOKEN_BYTES == 256


@pytest.mark.parametrize(
    ("pattern", "tokens", "expected"),
    [
        ("wa.>", ["wa", None, None, "messages", None], True),
        ("wa.>", ["wa"], False),
        ("wa.*.*.chats", ["wa", None, None, "chats"], True),
        ("wa.*.*.chats", ["wa", None, None, "agents"], False),
        ("wa.acme.>", ["wa", None, "x"], False),  # a placeholder may be any company, not only acme
        ("wa.*", ["wa", None, "x"], False),
        (">", ["anything"], True),
        ("cdc.*.*", ["deliver", "cdc_consumers"], False),
        ("deliver.>", ["deliver", "cdc_consumers"], True),
        ("a.b", ["a", "b"], True),
        ("a.b", ["a", "b", "c"], False),
    ],
)
def test_covers(pattern: str, tokens: list[str | None], expected: bool) -> None:
    assert covers(pattern, tokens) is expected


@pytest.mark.parametrize(
    ("subject", "patterns", "expected"),
    [
        ("cdc.*.*", ["cdc.*.*"], True),
        ("cdc.*.*", ["cdc.>"], True),  # Sequin's stream made with cdc.>: adding cdc.*.* would overlap
        ("cdc.*.*", [">"], True),
        ("cdc.acme.*", ["cdc.*.*"], True),
        ("cdc.>", ["cdc.>"], True),
        ("cdc.>", ["cdc.*.*"], False),  # cdc.a.b.c is not captured
        ("cdc.>", ["cdc.*"], False),
        ("cdc.*.*", ["cdc.acme.*"], False),
        ("cdc.*.*", ["other.>"], False),
        ("cdc.*.*", [], False),
        ("cdc.*.*", ["cdc.*"], False),
    ],
)
def test_a_stream_subject_captured_by_existing_ones(subject: str, patterns: list[str], expected: bool) -> None:
    assert captured_by(subject, patterns) is expected
