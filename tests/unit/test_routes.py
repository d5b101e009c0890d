"""Routes: template compilation, subject rendering and the row fields a route needs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_service.core.routes import COMPANY, RouteError, compile_route

MESSAGES = "wa.{company}.{agent_id}.messages.{chat_id}"


@pytest.mark.parametrize(
    ("table", "pk", "template", "tokens", "placeholders"),
    [
        (
            "messages",
            "message_id",
            MESSAGES,
            ("wa", None, None, "messages", None),
            ("company", "agent_id", "chat_id"),
        ),
        ("chats", "chat_id", "wa.{company}.{agent_id}.chats", ("wa", None, None, "chats"), ("company", "agent_id")),
        ("agents", "agent_id", "wa.{company}.{agent_id}.agents", ("wa", None, None, "agents"), ("company", "agent_id")),
        ("contacts", "contact_id", "{company}", (None,), ("company",)),
        ("t", "id", "x.{Agent_ID2}.{company}", ("x", None, None), ("Agent_ID2", "company")),
        ("t", "id", "wa.t_{company}.{agent_id}-x", ("wa", None, None), ("company", "agent_id")),
    ],
)
def test_compile_valid(
    table: str, pk: str, template: str, tokens: tuple[str | None, ...], placeholders: tuple[str, ...]
) -> None:
    route = compile_route(table, pk, template)
    assert (route.table, route.pk, route.template, route.tokens, route.placeholders) == (
        table,
        pk,
        template,
        tokens,
        placeholders,
    )


@pytest.mark.parametrize(
    ("table", "pk", "template", "fragment"),
    [
        ("messages", "message_id", "wa.{agent_id}.messages.{chat_id}", "must contain {company}"),
        ("messages", "message_id", "wa.messages", "must contain {company}"),
        ("messages", "message_id", "wa.{Company}.x", "must contain {company}"),  # case-sensitive
        ("messages", "message_id", "wa.{company}.*", "token '*' is neither a literal nor a {field}"),
        ("messages", "message_id", "wa.{company}.>", "token '>'"),
        ("messages", "message_id", "wa..{company}", "token ''"),
        ("messages", "message_id", "wa.{company}.", "token ''"),
        ("messages", "message_id", "wa.{company", "token '{company'"),
        ("messages", "message_id", "wa.{company}{agent_id}", "token '{company}{agent_id}'"),
        ("messages", "message_id", "wa.x*{company}", "token 'x*{company}'"),
        ("messages", "message_id", "wa.{1abc}.{company}", "token '{1abc}'"),
        ("messages", "message_id", "wa.{agent-id}.{company}", "token '{agent-id}'"),
        ("messages", "message_id", "wa.a b.{company}", "token 'a b'"),
        ("messages", "message_id", "", "token ''"),
        ("messages", "", MESSAGES, "pk must be a non-empty column name"),
        ("", "message_id", MESSAGES, "table name '' is not a valid subject token"),
        ("a.b", "message_id", MESSAGES, "table name 'a.b'"),
        ("a*", "message_id", MESSAGES, "table name 'a*'"),
    ],
)
def test_compile_invalid(table: str, pk: str, template: str, fragment: str) -> None:
    with pytest.raises(RouteError) as info:
        compile_route(table, pk, template)
    assert fragment in str(info.value)


def test_route_error_is_a_value_error() -> None:
    assert issubclass(RouteError, ValueError)


@pytest.mark.parametrize(
    ("template", "values", "subject"),
    [
        (MESSAGES, {"company": "acme", "agent_id": "agent-1", "chat_id": "chat-1"}, "wa.acme.agent-1.messages.chat-1"),
        ("wa.{company}.{agent_id}.chats", {"company": "42", "agent_id": "7"}, "wa.42.7.chats"),
        ("{agent_id}.{company}", {"company": "c", "agent_id": "a"}, "a.c"),
        ("{company}", {"company": "only"}, "only"),
        ("{company}.{x}.{company}", {"company": "c", "x": "y"}, "c.y.c"),  # a placeholder may repeat
        ("wa.daisi_{company}.{agent_id}_a", {"company": "acme", "agent_id": "7"}, "wa.daisi_acme.7_a"),
        ("wa.{company}.{x}", {"company": "{x}", "x": "{0}"}, "wa.{x}.{0}"),  # values are never read as templates
        # A literal "%" is text, and values are never read as printf formats either.
        ("w%a.x_{company}%s.{x}%(y)s", {"company": "a%sb", "x": "%(y)s"}, "w%a.x_a%sb%s.%(y)s%(y)s"),
        ("%%.{company}", {"company": "%"}, "%%.%"),
    ],
)
def test_subject_rendering(template: str, values: dict[str, str], subject: str) -> None:
    assert compile_route("t", "pk", template).subject(values) == subject


@given(st.lists(st.text(alphabet="%sab()_{}", min_size=1, max_size=6), min_size=1, max_size=3), st.text(max_size=8))
def test_subject_renders_like_format_map(literals: list[str], value: str) -> None:
    template = ".".join(["{company}", *(t for t in literals if "{" not in t and "}" not in t)])
    route = compile_route("t", "pk", template)
    values = {"company": value}
    assert route.subject(values) == template.format_map(values)


def test_subject_ignores_values_not_in_template() -> None:
    route = compile_route("agents", "agent_id", "wa.{company}.{agent_id}.agents")
    assert route.subject({"company": "c", "agent_id": "a", "message_id": "m"}) == "wa.c.a.agents"


def test_subject_needs_every_placeholder() -> None:
    route = compile_route("messages", "message_id", MESSAGES)
    with pytest.raises(KeyError):
        route.subject({"company": "c", "agent_id": "a"})


@pytest.mark.parametrize(
    ("pk", "template", "row_fields"),
    [
        ("message_id", MESSAGES, ("agent_id", "chat_id", "message_id")),
        ("chat_id", "wa.{company}.{agent_id}.chats", ("agent_id", "chat_id")),
        ("agent_id", "wa.{company}.{agent_id}.agents", ("agent_id",)),  # pk already a placeholder: once
        ("chat_id", "wa.{company}.{chat_id}.{agent_id}", ("chat_id", "agent_id")),  # template order kept
        ("id", "{company}", ("id",)),
    ],
)
def test_row_fields_order(pk: str, template: str, row_fields: tuple[str, ...]) -> None:
    route = compile_route("t", pk, template)
    assert route.row_fields == row_fields
    assert COMPANY not in route.row_fields
