"""EventBuilder.plan: routing, enrichment and every dead-letter reason, with a real pysimdjson parser."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import simdjson

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder, commit_time
from cdc_service.core.outcomes import DeadLetter, Publish, Reason, Skip
from cdc_service.core.routes import compile_route
from cdc_service.core.subjects import SubjectLayout
from tests.sequin import body, encode, record

CDC = "cdc.{company}.{table}"
SEQUIN = "sequin.changes.{database}.{schema}.{table}.{action}"
ROUTES = Settings().routes
TIMESTAMP = "2026-11-27T04:00:00.123456Z"


def builder(layout: str = CDC, max_payload_bytes: int = 1024 * 1024) -> EventBuilder:
    return EventBuilder(SubjectLayout(layout), ROUTES, max_payload_bytes)


@pytest.fixture
def parser() -> Any:
    return simdjson.Parser()


def plan(subject: str, data: bytes, parser: Any, **kwargs: Any) -> Any:
    return builder(**kwargs).plan(subject, data, parser)


def published(subject: str, doc: Any, parser: Any, **kwargs: Any) -> Publish:
    outcome = plan(subject, encode(doc), parser, **kwargs)
    assert isinstance(outcome, Publish), outcome
    return outcome


# ------------------------------------------------------------------------------------------------ routed events


@pytest.mark.parametrize(
    ("table", "subject", "event_id", "ids"),
    [
        (
            "messages",
            "wa.acme.agent-1.messages.chat-1",
            "1000:chatdb:acme:messages:msg-1",
            {"agent_id": "agent-1", "message_id": "msg-1", "chat_id": "chat-1"},
        ),
        (
            "chats",
            "wa.acme.agent-1.chats",
            "1000:chatdb:acme:chats:chat-1",
            {"agent_id": "agent-1", "chat_id": "chat-1"},
        ),
        ("agents", "wa.acme.agent-1.agents", "1000:chatdb:acme:agents:agent-1", {"agent_id": "agent-1"}),
    ],
)
def test_default_routes_publish(parser: Any, table: str, subject: str, event_id: str, ids: dict[str, str]) -> None:
    doc = body(table)
    outcome = published(f"cdc.acme.{table}", doc, parser)
    assert outcome.table == table
    assert outcome.subject == subject
    assert outcome.event_id == event_id
    assert outcome.commit_time == pytest.approx(1795752000.123456)
    payload = orjson.loads(outcome.payload)
    expected = {"event_id": event_id, "company_id": "acme", **ids, "action": "insert", "event_time": TIMESTAMP}
    assert {k: v for k, v in payload.items() if k != "row_data"} == expected
    assert list(payload) == ["event_id", "company_id", *ids, "action", "event_time", "row_data"]
    assert payload["row_data"] == doc["record"]


@pytest.mark.parametrize("action", ["insert", "update", "delete", "read"])
def test_action_is_copied(parser: Any, action: str) -> None:
    outcome = published("cdc.acme.chats", body("chats", action=action), parser)
    assert orjson.loads(outcome.payload)["action"] == action


@pytest.mark.parametrize(
    ("lsn", "idx", "action", "event_id"),
    [
        (1000, None, "insert", "1000:chatdb:acme:messages:msg-1"),
        (1000, 0, "insert", "1000.0:chatdb:acme:messages:msg-1"),
        (1000, 3, "update", "1000.3:chatdb:acme:messages:msg-1"),
        (0, None, "insert", "0:chatdb:acme:messages:msg-1"),
        (None, None, "read", "0:chatdb:acme:messages:msg-1"),
        (None, 2, "read", "0.2:chatdb:acme:messages:msg-1"),
        (555, None, "read", "555:chatdb:acme:messages:msg-1"),
        (2**63, None, "insert", f"{2**63}:chatdb:acme:messages:msg-1"),
    ],
)
def test_event_id(parser: Any, lsn: int | None, idx: int | None, action: str, event_id: str) -> None:
    outcome = published("cdc.acme.messages", body(lsn=lsn, idx=idx, action=action), parser)
    assert outcome.event_id == event_id
    assert orjson.loads(outcome.payload)["event_id"] == event_id


def test_integer_ids_become_decimal_strings(parser: Any) -> None:
    doc = body("messages", message_id=789, chat_id=12, agent_id=3, company_id=42)
    outcome = published("cdc.42.messages", doc, parser)
    assert outcome.subject == "wa.42.3.messages.12"
    assert outcome.event_id == "1000:chatdb:42:messages:789"
    payload = orjson.loads(outcome.payload)
    assert (payload["company_id"], payload["agent_id"], payload["message_id"], payload["chat_id"]) == (
        "42",
        "3",
        "789",
        "12",
    )
    assert payload["row_data"]["message_id"] == 789  # the record itself is unchanged


def test_row_data_is_the_record_unchanged(parser: Any) -> None:
    extra = {
        "f": 1.0,
        "neg_zero": -0.0,
        "tiny": 1e-7,
        "big": 2**63,
        "text": 'q"b\\n\n\t\u0000\u2028é😀',
        "empty": {},
        "list": [],
        "nested": [{"a": [1, None, True, False]}],
    }
    doc = body("messages", **extra)
    for ensure_ascii in (True, False):
        data = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
        outcome = plan("cdc.acme.messages", data, parser)
        assert isinstance(outcome, Publish)
        assert orjson.loads(outcome.payload)["row_data"] == doc["record"]


def test_no_event_time_without_commit_timestamp(parser: Any) -> None:
    doc = body("chats")
    del doc["metadata"]["commit_timestamp"]
    outcome = published("cdc.acme.chats", doc, parser)
    assert "event_time" not in orjson.loads(outcome.payload)
    assert outcome.commit_time is None


def test_unreadable_commit_timestamp_still_publishes(parser: Any) -> None:
    outcome = published("cdc.acme.chats", body("chats", commit_timestamp="yesterday"), parser)
    assert orjson.loads(outcome.payload)["event_time"] == "yesterday"
    assert outcome.commit_time is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-27T04:00:00.123456Z", 1795752000.123456),
        ("2026-11-27T06:00:00+02:00", 1795752000.0),
        ("nope", None),
        (None, None),
        (12, None),
    ],
)
def test_commit_time(value: Any, expected: float | None) -> None:
    assert commit_time(value) == (None if expected is None else pytest.approx(expected))


def test_table_name_may_be_absent(parser: Any) -> None:
    doc = body("agents")
    del doc["metadata"]["table_name"]
    assert published("cdc.acme.agents", doc, parser).event_id == "1000:chatdb:acme:agents:agent-1"


def test_record_without_company_uses_subject_company(parser: Any) -> None:
    doc = body("agents")
    del doc["record"]["company_id"]
    outcome = published("cdc.acme.agents", doc, parser)
    assert orjson.loads(outcome.payload)["company_id"] == "acme"


@pytest.mark.parametrize("table", ["contacts", "users", "messages_archive"])
def test_unrouted_table_is_skipped_without_parsing(parser: Any, table: str) -> None:
    assert plan(f"cdc.acme.{table}", b"not even json", parser) == Skip(table)


def test_extra_route_is_published(parser: Any) -> None:
    routes = {**ROUTES, "contacts": compile_route("contacts", "contact_id", "wa.{company}.contacts.{contact_id}")}
    doc = {"record": {"contact_id": 5, "company_id": "acme"}, "action": "insert", "metadata": {"commit_lsn": 9}}
    outcome = EventBuilder(SubjectLayout(CDC), routes, 1 << 20).plan("cdc.acme.contacts", encode(doc), parser)
    assert isinstance(outcome, Publish)
    assert (outcome.subject, outcome.event_id) == ("wa.acme.contacts.5", "9::acme:contacts:5")
    payload = orjson.loads(outcome.payload)
    assert payload["contact_id"] == "5"
    assert "agent_id" not in payload


@pytest.mark.parametrize(
    ("company", "shown"),
    [("acme", "acme"), (42, "42"), ("ünï", "ünï")],
)
def test_sequin_layout_takes_company_from_record(parser: Any, company: Any, shown: str) -> None:
    doc = body("messages", company_id=company)
    outcome = published("sequin.changes.chatdb.public.messages.insert", doc, parser, layout=SEQUIN)
    assert outcome.subject == f"wa.{shown}.agent-1.messages.chat-1"
    assert orjson.loads(outcome.payload)["company_id"] == shown


def test_sequin_subject_action_is_informational(parser: Any) -> None:
    doc = body("chats", action="update")
    outcome = published("sequin.changes.chatdb.public.chats.insert", doc, parser, layout=SEQUIN)
    assert orjson.loads(outcome.payload)["action"] == "update"


def test_sequin_unrouted_table_is_skipped(parser: Any) -> None:
    assert plan("sequin.changes.chatdb.public.contacts.insert", b"", parser, layout=SEQUIN) == Skip("contacts")


def test_int_company_matches_subject_by_decimal_text(parser: Any) -> None:
    outcome = published("cdc.42.messages", body("messages", company_id=42), parser)
    assert outcome.subject == "wa.42.agent-1.messages.chat-1"
    assert orjson.loads(outcome.payload)["company_id"] == "42"


def test_one_parser_serves_many_messages(parser: Any) -> None:
    b = builder()
    first = b.plan("cdc.acme.messages", encode(body(message_id="m1")), parser)
    bad = b.plan("cdc.acme.messages", b"{", parser)
    second = b.plan("cdc.acme.messages", encode(body(message_id="m2")), parser)
    assert isinstance(bad, DeadLetter)
    assert isinstance(first, Publish) and isinstance(second, Publish)
    assert orjson.loads(first.payload)["row_data"]["message_id"] == "m1"
    assert orjson.loads(second.payload)["row_data"]["message_id"] == "m2"


def test_table_of() -> None:
    b = builder()
    assert b.table_of("cdc.acme.messages") == "messages"
    assert b.table_of("cdc.acme") == ""


# ------------------------------------------------------------------------------------------------ dead letters


MSG, CHATS, AGENTS = "cdc.acme.messages", "cdc.acme.chats", "cdc.acme.agents"
R = Reason

BAD_BODIES: list[tuple[str, str, bytes, Reason]] = [
    # invalid_json
    ("garbage", MSG, b"garbage", R.INVALID_JSON),
    ("empty body", MSG, b"", R.INVALID_JSON),
    ("truncated", MSG, encode(body())[:-7], R.INVALID_JSON),
    ("invalid utf-8", MSG, encode(body()).replace(b"hello there", b"hello \xff\xfe"), R.INVALID_JSON),
    ("10,000-deep nesting", MSG, b"[" * 10_000 + b"]" * 10_000, R.INVALID_JSON),
    (
        "10,000-deep nesting inside record",
        MSG,
        encode(body()).replace(b'"hello there"', b"[" * 10_000 + b"]" * 10_000),
        R.INVALID_JSON,
    ),
    ("trailing comma", MSG, b'{"record": {},}', R.INVALID_JSON),
    # invalid_shape
    ("body is an array", MSG, encode([body()]), R.INVALID_SHAPE),
    ("body is a string", MSG, b'"record"', R.INVALID_SHAPE),
    ("body is a number", MSG, b"42", R.INVALID_SHAPE),
    ("body is null", MSG, b"null", R.INVALID_SHAPE),
]


def bad(table: str, **overrides: Any) -> bytes:
    """A good body of ``table`` with changes: ``record__x=v`` sets ``doc["record"]["x"]``; ``...`` deletes the key."""
    doc = body(table)
    for key, value in overrides.items():
        *path, last = key.split("__")
        target = doc
        for part in path:
            target = target[part]
        if value is ...:
            del target[last]
        else:
            target[last] = value
    return encode(doc)


BAD_BODIES += [
    ("record is an array", MSG, bad("messages", record=[1, 2]), R.INVALID_SHAPE),
    ("record is a string", MSG, bad("messages", record="x"), R.INVALID_SHAPE),
    ("metadata is an array", MSG, bad("messages", metadata=[]), R.INVALID_SHAPE),
    ("commit_lsn string", MSG, bad("messages", metadata__commit_lsn="1000"), R.INVALID_SHAPE),
    ("commit_lsn negative", MSG, bad("messages", metadata__commit_lsn=-1), R.INVALID_SHAPE),
    ("commit_lsn bool", MSG, bad("messages", metadata__commit_lsn=True), R.INVALID_SHAPE),
    ("commit_lsn float", MSG, bad("messages", metadata__commit_lsn=1.5), R.INVALID_SHAPE),
    ("commit_idx negative", MSG, bad("messages", metadata__commit_idx=-2), R.INVALID_SHAPE),
    ("commit_idx string", MSG, bad("messages", metadata__commit_idx="1"), R.INVALID_SHAPE),
    ("unknown action", MSG, bad("messages", action="upsert"), R.INVALID_SHAPE),
    ("action case", MSG, bad("messages", action="INSERT"), R.INVALID_SHAPE),
    ("action number", MSG, bad("messages", action=1), R.INVALID_SHAPE),
    ("float id", MSG, bad("messages", record__message_id=1.5), R.INVALID_SHAPE),
    ("float placeholder id", MSG, bad("messages", record__chat_id=2.0), R.INVALID_SHAPE),
    ("bool id", MSG, bad("messages", record__message_id=True), R.INVALID_SHAPE),
    ("object id", MSG, bad("messages", record__agent_id={"a": 1}), R.INVALID_SHAPE),
    ("array id", MSG, bad("messages", record__agent_id=["a"]), R.INVALID_SHAPE),
    ("float company", MSG, bad("messages", record__company_id=1.5), R.INVALID_SHAPE),
    ("empty pk", MSG, bad("messages", record__message_id=""), R.INVALID_SHAPE),
    ("pk 300 bytes", MSG, bad("messages", record__message_id="m" * 300), R.INVALID_SHAPE),
    ("pk control char", MSG, bad("messages", record__message_id="m\x01"), R.INVALID_SHAPE),
    ("pk newline", MSG, bad("messages", record__message_id="m\n1"), R.INVALID_SHAPE),
    # missing_field
    ("no record", MSG, bad("messages", record=...), R.MISSING_FIELD),
    ("null record", MSG, bad("messages", record=None), R.MISSING_FIELD),
    ("no metadata", MSG, bad("messages", metadata=...), R.MISSING_FIELD),
    ("null metadata", MSG, bad("messages", metadata=None), R.MISSING_FIELD),
    ("no action", MSG, bad("messages", action=...), R.MISSING_FIELD),
    ("no pk", MSG, bad("messages", record__message_id=...), R.MISSING_FIELD),
    ("null pk", MSG, bad("messages", record__message_id=None), R.MISSING_FIELD),
    ("no agent_id", MSG, bad("messages", record__agent_id=...), R.MISSING_FIELD),
    ("chats no agent_id", CHATS, bad("chats", record__agent_id=...), R.MISSING_FIELD),
    ("agents no agent_id", AGENTS, bad("agents", record__agent_id=None), R.MISSING_FIELD),
    ("messages no chat_id", MSG, bad("messages", record__chat_id=...), R.MISSING_FIELD),
    ("chats no chat_id", CHATS, bad("chats", record__chat_id=...), R.MISSING_FIELD),
    ("insert no lsn", MSG, bad("messages", metadata__commit_lsn=...), R.MISSING_FIELD),
    ("update null lsn", CHATS, bad("chats", action="update", metadata__commit_lsn=None), R.MISSING_FIELD),
    ("delete no lsn", AGENTS, bad("agents", action="delete", metadata__commit_lsn=...), R.MISSING_FIELD),
    # invalid_subject
    ("too many tokens", "cdc.acme.x.messages", encode(body()), R.INVALID_SUBJECT),
    ("too few tokens", "cdc.messages", encode(body()), R.INVALID_SUBJECT),
    ("wrong literal", "cdx.acme.messages", encode(body()), R.INVALID_SUBJECT),
    # invalid_subject_token
    ("agent_id with '.'", MSG, bad("messages", record__agent_id="a.b"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id with '*'", MSG, bad("messages", record__agent_id="*"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id with '>'", MSG, bad("messages", record__agent_id=">"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id with space", MSG, bad("messages", record__agent_id="a b"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id with tab", CHATS, bad("chats", record__agent_id="a\tb"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id control", AGENTS, bad("agents", record__agent_id="a\x00"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id empty", MSG, bad("messages", record__agent_id=""), R.INVALID_SUBJECT_TOKEN),
    ("agent_id 300 bytes", MSG, bad("messages", record__agent_id="a" * 300), R.INVALID_SUBJECT_TOKEN),
    ("chat_id with '.'", MSG, bad("messages", record__chat_id="c.1"), R.INVALID_SUBJECT_TOKEN),
    ("subject company 'ac*me'", "cdc.ac*me.messages", bad("messages", record__company_id=...), R.INVALID_SUBJECT_TOKEN),
    (
        "both company 'ac*me'",
        "cdc.ac*me.messages",
        bad("messages", record__company_id="ac*me"),
        R.INVALID_SUBJECT_TOKEN,
    ),
    ("agent_id newline", MSG, bad("messages", record__agent_id="a\nb"), R.INVALID_SUBJECT_TOKEN),
    ("agent_id DEL", MSG, bad("messages", record__agent_id="a\x7f"), R.INVALID_SUBJECT_TOKEN),
    ("subject company 'ac>'", "cdc.ac>.messages", bad("messages", record__company_id="ac>"), R.INVALID_SUBJECT_TOKEN),
    ("subject company empty", "cdc..messages", bad("messages", record__company_id=None), R.INVALID_SUBJECT_TOKEN),
    # tenant_mismatch
    ("company differs", MSG, bad("messages", record__company_id="evil"), R.TENANT_MISMATCH),
    ("company case differs", MSG, bad("messages", record__company_id="ACME"), R.TENANT_MISMATCH),
    ("int company differs", "cdc.42.messages", bad("messages", record__company_id=43), R.TENANT_MISMATCH),
    ("int vs padded text", "cdc.042.messages", bad("messages", record__company_id=42), R.TENANT_MISMATCH),
    ("record company 'ac*me'", MSG, bad("messages", record__company_id="ac*me"), R.TENANT_MISMATCH),
    # table_mismatch
    ("table_name differs", MSG, bad("messages", metadata__table_name="chats"), R.TABLE_MISMATCH),
    ("table_name number", MSG, bad("messages", metadata__table_name=1), R.TABLE_MISMATCH),
]


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [pytest.param(s, d, r, id=name) for name, s, d, r in BAD_BODIES],
)
def test_dead_letter_reasons(parser: Any, subject: str, data: bytes, reason: Reason) -> None:
    outcome = plan(subject, data, parser)
    assert isinstance(outcome, DeadLetter), outcome
    assert outcome.reason is reason
    assert outcome.detail
    assert "\n" not in outcome.detail
    expected_table = "" if reason is Reason.INVALID_SUBJECT else subject.split(".")[2]
    assert outcome.table == expected_table


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        pytest.param(body("messages", company_id=None), Reason.MISSING_FIELD, id="null company_id"),
        pytest.param(
            {**body("messages"), "record": {k: v for k, v in record("messages").items() if k != "company_id"}},
            Reason.MISSING_FIELD,
            id="no company_id",
        ),
        pytest.param(body("messages", company_id="ac me"), Reason.INVALID_SUBJECT_TOKEN, id="company with space"),
        pytest.param(body("messages", company_id="a.b"), Reason.INVALID_SUBJECT_TOKEN, id="company with dot"),
        pytest.param(body("messages", company_id=""), Reason.INVALID_SUBJECT_TOKEN, id="empty company"),
        pytest.param(body("messages", company_id=1.5), Reason.INVALID_SHAPE, id="float company"),
    ],
)
def test_sequin_layout_dead_letters(parser: Any, doc: Any, reason: Reason) -> None:
    outcome = plan("sequin.changes.chatdb.public.messages.insert", encode(doc), parser, layout=SEQUIN)
    assert isinstance(outcome, DeadLetter), outcome
    assert outcome.reason is reason
    assert outcome.table == "messages"


def test_sequin_layout_wrong_subject(parser: Any) -> None:
    outcome = plan("cdc.acme.messages", encode(body()), parser, layout=SEQUIN)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is Reason.INVALID_SUBJECT


def test_payload_too_large(parser: Any) -> None:
    data = encode(body())
    outcome = plan("cdc.acme.messages", data, parser, max_payload_bytes=100)
    assert outcome == DeadLetter("messages", Reason.PAYLOAD_TOO_LARGE, f"body is {len(data)} bytes, limit is 100")


def test_payload_at_the_limit_is_fine(parser: Any) -> None:
    data = encode(body())
    assert isinstance(plan("cdc.acme.messages", data, parser, max_payload_bytes=len(data)), Publish)
    outcome = plan("cdc.acme.messages", data, parser, max_payload_bytes=len(data) - 1)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is Reason.PAYLOAD_TOO_LARGE


def test_oversize_is_checked_before_parsing(parser: Any) -> None:
    outcome = plan("cdc.acme.messages", b"x" * 101, parser, max_payload_bytes=100)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is Reason.PAYLOAD_TOO_LARGE


def test_invalid_json_detail_is_bounded(parser: Any) -> None:
    outcome = plan("cdc.acme.messages", b"{" * 5000, parser)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is Reason.INVALID_JSON
    assert outcome.detail.startswith("body is not valid JSON")
    assert len(outcome.detail) <= 300


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"\xff" * 10, b"{" * 3, b'{"record": 1e999}', b'{"a": 99999999999999999999999}', b"[]", b"{}"],
)
def test_plan_never_raises(parser: Any, data: bytes) -> None:
    outcome = plan("cdc.acme.messages", data, parser)
    assert isinstance(outcome, DeadLetter)


# ------------------------------------------------------------------------------------------ literal text in a token

DAISI = "cdc.daisi_{company}.{table}"


def test_tenant_schema_prefix_is_not_part_of_the_company(parser: Any) -> None:
    # Sequin set-ups name tenant schemas daisi_<company> while record.company_id holds <company>.
    outcome = published("cdc.daisi_acme.messages", body("messages", company_id="acme"), parser, layout=DAISI)
    assert outcome.subject == "wa.acme.agent-1.messages.chat-1"
    assert orjson.loads(outcome.payload)["company_id"] == "acme"


def test_a_subject_without_the_literal_text_is_dead_lettered(parser: Any) -> None:
    outcome = plan("cdc.acme.messages", encode(body("messages", company_id="acme")), parser, layout=DAISI)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is Reason.INVALID_SUBJECT


def test_with_the_prefix_in_the_company_the_tenant_check_still_applies(parser: Any) -> None:
    outcome = plan("cdc.daisi_acme.messages", encode(body("messages", company_id="daisi_acme")), parser, layout=DAISI)
    assert isinstance(outcome, DeadLetter)
    assert outcome.reason is Reason.TENANT_MISMATCH
