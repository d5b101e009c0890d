"""Hostile inbound messages and the outcome each must get (docs/system_architecture.md §5).

Each case is a subject and body bytes with the expected outcome: a ``Reason`` code value (dead-lettered with that
``Cdc-Error-Reason``), ``"skipped"`` or ``"published"``. All cases assume the routes of settings.toml and
``ingest.max_payload_bytes = MAX_PAYLOAD_BYTES``; ``layout`` is the inbound subject layout.

``wire`` says whether the case can be sent through NATS in the integration run (input stream capturing ``cdc.>``,
server max_payload 1 MiB): subjects with wildcard tokens, whitespace or lone surrogates, other layouts and bodies
over 1 MiB are checked by the unit test only. ``xfail`` holds the reason when the service is known to get the case
wrong: the expectation is what it should do, and the case is run as ``xfail(strict=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tests.sequin import body

CDC = "cdc.{company}.{table}"
SEQUIN = "sequin.changes.{database}.{schema}.{table}.{action}"
MAX_PAYLOAD_BYTES = 200_000
MSG = "cdc.acme.messages"
SKIPPED = "skipped"
PUBLISHED = "published"


@dataclass(frozen=True)
class Case:
    name: str
    subject: str
    data: bytes
    expected: str  # a Reason value, "skipped" or "published"
    event_id: str | None = None  # for "published": the event_id the event must carry
    layout: str = CDC
    wire: bool = True
    xfail: str | None = None


def doc(table: str = "messages", **changes: Any) -> dict[str, Any]:
    """A good body of ``table`` with changes: ``record__x=v`` sets ``doc["record"]["x"]``; ``...`` deletes the key."""
    out = body(table)
    for key, value in changes.items():
        *path, last = key.split("__")
        target = out
        for part in path:
            target = target[part]
        if value is ...:
            del target[last]
        else:
            target[last] = value
    return out


def enc(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def raw(**changes: Any) -> bytes:
    return enc(doc(**changes))


GOOD = raw()


def _sub(old: bytes, new: bytes, data: bytes = GOOD) -> bytes:
    """``data`` with the first ``old`` replaced by ``new`` (raw bytes: for what json.dumps cannot produce)."""
    assert old in data, old
    return data.replace(old, new, 1)


def _padded_to(size: int, message_id: str) -> bytes:
    """A good messages body of exactly ``size`` bytes (padding in an extra record column)."""
    base = raw(record__message_id=message_id, record__padding="")
    data = _sub(b'"padding": ""', b'"padding": "' + b"x" * (size - len(base)) + b'"', base)
    assert len(data) == size
    return data


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


A256 = "a" * 256
M256 = "m" * 256

CASES: list[Case] = [
    # ---------------------------------------------------------------------------------------------- invalid_json
    Case("truncated_json", MSG, GOOD[: len(GOOD) // 2], "invalid_json"),
    Case("unterminated_string", MSG, b'{"record": {"message_id": "m', "invalid_json"),
    Case("invalid_utf8_in_string", MSG, _sub(b"hello there", b"hello \xc3\x28 there"), "invalid_json"),
    Case("overlong_utf8", MSG, _sub(b"hello there", b"hello \xc0\xaf there"), "invalid_json"),
    Case("utf16_body", MSG, GOOD.decode().encode("utf-16"), "invalid_json"),
    Case("nan_literal", MSG, _sub(b'"commit_lsn": 1000', b'"commit_lsn": NaN'), "invalid_json"),
    Case("infinity_in_record", MSG, _sub(b'"hello there"', b"Infinity"), "invalid_json"),
    Case("float_1e999_in_record", MSG, _sub(b'"hello there"', b"1e999"), "invalid_json"),
    Case("lsn_beyond_uint64", MSG, _sub(b'"commit_lsn": 1000', b'"commit_lsn": 18446744073709551616'), "invalid_json"),
    Case("int_below_int64_in_record", MSG, _sub(b'"id": 1', b'"id": -9223372036854775809'), "invalid_json"),
    Case(
        "nesting_10000_in_metadata",
        MSG,
        _sub(b'"transaction_annotations": null', b'"transaction_annotations": ' + _nested(10_000)),
        "invalid_json",
    ),
    Case("nesting_10000_objects", MSG, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "invalid_json"),
    Case("lone_surrogate_escape", MSG, _sub(b'"msg-1"', b'"m\\ud800"'), "invalid_json"),
    Case("unescaped_control_in_string", MSG, _sub(b"hello there", b"hello\x01there"), "invalid_json"),
    Case("two_documents", MSG, GOOD + GOOD, "invalid_json"),
    Case("nul_after_document", MSG, GOOD + b"\x00", "invalid_json"),
    Case("single_quotes", MSG, GOOD.replace(b'"', b"'"), "invalid_json"),
    Case("comment_prefix", MSG, b"/* sequin */" + GOOD, "invalid_json"),
    Case("whitespace_body", MSG, b" \r\n\t ", "invalid_json"),
    Case("empty_body", MSG, b"", "invalid_json"),
    Case("random_binary", MSG, bytes(range(256)), "invalid_json"),
    # Too deep for the output encoder (orjson stops at 254 levels) but not for the parser (1024): must still be a
    # dead letter, not an exception that is retried until max_deliveries.
    Case(
        "nesting_300_in_record",
        MSG,
        _sub(b'"hello there"', _nested(300)),
        "invalid_json",  # simdjson parses 1024 levels, orjson encodes 254: the re-encode is refused
    ),
    # --------------------------------------------------------------------------------------------- invalid_shape
    Case("body_json_string", MSG, b'"record"', "invalid_shape"),
    Case("body_json_true", MSG, b"true", "invalid_shape"),
    Case("body_json_empty_object", MSG, b"{}", "missing_field"),
    Case("record_array", MSG, raw(record=[doc()["record"]]), "invalid_shape"),
    Case("metadata_string", MSG, raw(metadata="chatdb"), "invalid_shape"),
    Case("commit_lsn_string", MSG, raw(metadata__commit_lsn="1000"), "invalid_shape"),
    Case("commit_lsn_float_exponent", MSG, _sub(b'"commit_lsn": 1000', b'"commit_lsn": 1e5'), "invalid_shape"),
    Case("commit_lsn_huge_float", MSG, raw(metadata__commit_lsn=1e300), "invalid_shape"),
    Case("commit_idx_negative", MSG, raw(metadata__commit_idx=-1), "invalid_shape"),
    Case("commit_idx_string", MSG, raw(metadata__commit_idx="0"), "invalid_shape"),
    Case("unknown_action", MSG, raw(action="upsert"), "invalid_shape"),
    # Issue 9: the detail (a header and a log field) must not quote this text.
    Case("action_long_body_text", MSG, raw(action="s3cr3t-canary" * 10), "invalid_shape"),
    Case("action_empty", MSG, raw(action=""), "invalid_shape"),
    Case("action_object", MSG, raw(action={"insert": True}), "invalid_shape"),
    Case("pk_float", MSG, raw(record__message_id=1.0), "invalid_shape"),
    Case("pk_bool", MSG, raw(record__message_id=False), "invalid_shape"),
    Case("pk_object", MSG, raw(record__message_id={"id": "msg-1"}), "invalid_shape"),
    Case("agent_id_bool", MSG, raw(record__agent_id=True), "invalid_shape"),
    Case("pk_257_bytes", MSG, raw(record__message_id="m" * 257), "invalid_shape"),
    Case("pk_300_bytes", MSG, raw(record__message_id="m" * 300), "invalid_shape"),
    Case("pk_escape_sequence", MSG, raw(record__message_id="m\x1b[31m"), "invalid_shape"),
    Case("pk_line_separator", MSG, raw(record__message_id="m\u2028x"), "invalid_shape"),
    # --------------------------------------------------------------------------------------------- missing_field
    Case("record_null", MSG, raw(record=None), "missing_field"),
    Case("action_null", MSG, raw(action=None), "missing_field"),
    Case("metadata_empty", MSG, raw(metadata={}), "missing_field"),
    Case("record_empty", MSG, raw(record={}), "missing_field"),
    Case("pk_null", MSG, raw(record__message_id=None), "missing_field"),
    # Issue 9: a delete of a table without REPLICA IDENTITY FULL (only the pk). Dead-lettered with the default routes;
    # with routes.messages.routing_cache it is routed from the cache (tests/integration/test_edges.py).
    Case(
        "delete_with_pk_only",
        MSG,
        enc({**doc(action="delete"), "record": {"message_id": "del-1", "agent_id": None, "chat_id": None}}),
        "missing_field",
    ),
    # ------------------------------------------------------------------------------------------- invalid_subject
    Case("subject_too_few_tokens", "cdc.messages", GOOD, "invalid_subject"),
    Case("subject_too_many_tokens", "cdc.acme.public.messages", GOOD, "invalid_subject"),
    Case(
        "sequin_subject_too_few_tokens",
        "sequin.changes.chatdb.public.messages",
        GOOD,
        "invalid_subject",
        layout=SEQUIN,
        wire=False,
    ),
    Case(
        "sequin_subject_wrong_literal",
        "sequin.change.chatdb.public.messages.insert",
        GOOD,
        "invalid_subject",
        layout=SEQUIN,
        wire=False,
    ),
    # ------------------------------------------------------------------------------------- invalid_subject_token
    Case("subject_company_star", "cdc.*.messages", raw(record__company_id=...), "invalid_subject_token", wire=False),
    Case("subject_company_gt", "cdc.>.messages", raw(record__company_id=...), "invalid_subject_token", wire=False),
    Case(
        "subject_company_space", "cdc.ac me.messages", raw(record__company_id=...), "invalid_subject_token", wire=False
    ),
    Case("subject_company_partial_star", "cdc.ac*me.messages", raw(record__company_id=...), "invalid_subject_token"),
    Case(
        "subject_company_257_bytes", f"cdc.{'c' * 257}.messages", raw(record__company_id=...), "invalid_subject_token"
    ),
    Case(
        "subject_company_lone_surrogate",
        "cdc.ac\ud800me.messages",
        raw(record__company_id=...),
        "invalid_subject_token",
        wire=False,  # nats-py decodes subjects as strict UTF-8, so this reaches plan() only from Python
    ),
    # Issue 9: a company token that makes dlq.<subject> longer than a protocol line may be (crashed the service), and
    # one that is not UTF-8 (killed nats-py's read loop; it arrives with its bytes as lone surrogates). Fed raw by
    # tests/integration/test_edges.py, which nats-py's publish cannot do.
    Case("subject_4kb_company", "cdc." + "C" * 4040 + ".messages", b'{"record": null}', "missing_field", wire=False),
    Case(
        "subject_not_utf8",
        "cdc.\udcff\udcfe.messages",
        raw(record__company_id=...),
        "invalid_subject_token",
        wire=False,
    ),
    Case("agent_id_dot", MSG, raw(record__agent_id="agent.1"), "invalid_subject_token"),
    Case("chat_id_star", MSG, raw(record__chat_id="chat-*"), "invalid_subject_token"),
    Case("agent_id_gt", MSG, raw(record__agent_id=">"), "invalid_subject_token"),
    Case("agent_id_space", MSG, raw(record__agent_id="agent 1"), "invalid_subject_token"),
    Case("agent_id_unit_separator", MSG, raw(record__agent_id="agent\x1f1"), "invalid_subject_token"),
    Case("agent_id_c1_control", MSG, raw(record__agent_id="agent\x851"), "invalid_subject_token"),
    Case("agent_id_nbsp", MSG, raw(record__agent_id="agent\u00a01"), "invalid_subject_token"),
    Case("agent_id_300_bytes", MSG, raw(record__agent_id="a" * 300), "invalid_subject_token"),
    Case("agent_id_257_bytes", MSG, raw(record__agent_id="a" * 257), "invalid_subject_token"),
    Case("agent_id_258_utf8_bytes", MSG, raw(record__agent_id="€" * 86), "invalid_subject_token"),
    Case("chat_id_empty", MSG, raw(record__chat_id=""), "invalid_subject_token"),
    Case(
        "sequin_record_company_dot",
        "sequin.changes.chatdb.public.messages.insert",
        raw(record__company_id="ac.me"),
        "invalid_subject_token",
        layout=SEQUIN,
        wire=False,
    ),
    # ------------------------------------------------------------------------------------------- tenant_mismatch
    Case("company_mismatch", MSG, raw(record__company_id="globex"), "tenant_mismatch"),
    Case("company_unicode_lookalike", MSG, raw(record__company_id="аcme"), "tenant_mismatch"),  # Cyrillic а
    # Duplicate keys: the last one wins (as in every JSON library the service uses), consistently for the check
    # and the published row_data.
    Case(
        "company_duplicate_key_last_differs",
        MSG,
        _sub(b'"company_id": "acme"', b'"company_id": "acme", "company_id": "globex"'),
        "tenant_mismatch",
    ),
    # -------------------------------------------------------------------------------------------- table_mismatch
    Case("table_name_mismatch", MSG, raw(metadata__table_name="chats"), "table_mismatch"),
    Case("table_name_case", MSG, raw(metadata__table_name="Messages"), "table_mismatch"),
    # ----------------------------------------------------------------------------------------- payload_too_large
    Case("body_300kb_valid_json", MSG, _padded_to(300_000, "big-1"), "payload_too_large"),
    Case("body_300kb_garbage", MSG, b"\xff" * 300_000, "payload_too_large"),
    Case("body_one_over_limit", MSG, _padded_to(MAX_PAYLOAD_BYTES + 1, "big-2"), "payload_too_large"),
    Case("body_1mib_plus", MSG, _padded_to(1024 * 1024 + 1, "big-3"), "payload_too_large", wire=False),
    # ---------------------------------------------------------------------------------------------------- skipped
    Case("unrouted_table_garbage", "cdc.acme.users", b"\xff\xfe not json at all", SKIPPED),
    Case("table_case_differs", "cdc.acme.Messages", GOOD, SKIPPED),
    Case("unicode_table", "cdc.acme.méssages", b"[" * 10_000, SKIPPED),
    # Issue 9: one of thousands of distinct unrouted names; counted under the one "<other>" table label.
    Case("unrouted_table_distinct_name", "cdc.acme.unrouted_4999", GOOD, SKIPPED),
    # -------------------------------------------------------------------------------------------------- published
    Case(
        "unicode_ids",
        MSG,
        raw(record__agent_id="agént-1", record__chat_id="чат-1", record__message_id="メッセージ-1😀"),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:メッセージ-1😀",
    ),
    Case(
        "unicode_company",
        "cdc.ácme.messages",
        raw(record__company_id="ácme", record__message_id="uc-1"),
        PUBLISHED,
        event_id="1000:chatdb:ácme:messages:uc-1",
    ),
    Case(
        "agent_id_256_bytes",
        MSG,
        raw(record__agent_id=A256, record__message_id="a256"),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:a256",
    ),
    Case(
        "agent_id_256_utf8_bytes",
        MSG,
        raw(record__agent_id="é" * 128, record__message_id="e256"),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:e256",
    ),
    Case("pk_256_bytes", MSG, raw(record__message_id=M256), PUBLISHED, event_id=f"1000:chatdb:acme:messages:{M256}"),
    # RFC 8259 §8.1: a parser may ignore a byte order mark.
    Case(
        "bom_prefix",
        MSG,
        b"\xef\xbb\xbf" + raw(record__message_id="bom-1"),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:bom-1",
    ),
    Case(
        "company_duplicate_key_last_matches",
        MSG,
        _sub(b'"company_id": "acme"', b'"company_id": "globex", "company_id": "acme"', raw(record__message_id="dup-1")),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:dup-1",
    ),
    Case(
        "lsn_uint64_max",
        MSG,
        raw(metadata__commit_lsn=18446744073709551615, record__message_id="u64"),
        PUBLISHED,
        event_id="18446744073709551615:chatdb:acme:messages:u64",
    ),
    Case(
        "negative_int_ids",
        MSG,
        raw(record__agent_id=-7, record__message_id=-5),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:-5",
    ),
    Case(
        "max_float_in_record",
        MSG,
        _sub(b'"hello there"', b"1.7976931348623157e308", raw(record__message_id="maxf")),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:maxf",
    ),
    Case(
        "nesting_200_in_record",
        MSG,
        _sub(b'"hello there"', _nested(200), raw(record__message_id="deep200")),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:deep200",
    ),
    # Issue 9: identity. A pk with trailing whitespace (nats-py strips header values) and another tenant or database
    # with the same LSN and pk each get their own event_id.
    Case(
        "pk_trailing_space",
        MSG,
        raw(record__message_id="k1 "),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:k1%20",
    ),
    Case(
        "pk_with_colon_and_percent",
        MSG,
        raw(record__message_id="a:b%"),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:a%3Ab%25",
    ),
    Case(
        "other_tenant_same_lsn_and_pk",
        "cdc.globex.messages",
        raw(record__company_id="globex", record__message_id="shared-pk"),
        PUBLISHED,
        event_id="1000:chatdb:globex:messages:shared-pk",
    ),
    Case(
        "other_database_same_lsn_and_pk",
        MSG,
        raw(metadata__database_name="archive", record__message_id="shared-pk"),
        PUBLISHED,
        event_id="1000:archive:acme:messages:shared-pk",
    ),
    Case("database_name_number", MSG, raw(metadata__database_name=7), "invalid_shape"),
    Case(
        "body_at_limit",
        MSG,
        _padded_to(MAX_PAYLOAD_BYTES, "at-limit"),
        PUBLISHED,
        event_id="1000:chatdb:acme:messages:at-limit",
    ),
]

BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
