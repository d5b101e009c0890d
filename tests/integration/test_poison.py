"""Poison input against real servers: each bad message is copied byte for byte to the dead-letter stream with its
reason, terminated (never redelivered), and the service keeps going with the next message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.helpers import (
    DLQ,
    INPUT,
    OUTPUT,
    consumer_settled,
    ensure_input,
    feed,
    payloads,
    read_all,
    wait_count,
    wait_until,
)
from tests.sequin import body, encode

GOOD_SUBJECT = "cdc.acme.messages"
SEQUIN_SUBJECT = "sequin.changes.chatdb.public.messages.insert"
SEQUIN = {
    "ingest.subject_layout": "sequin.changes.{database}.{schema}.{table}.{action}",
    "ingest.subjects": ["sequin.changes.>"],
}


def _without(path: str, doc: dict[str, Any] | None = None) -> bytes:
    """A good ``messages`` body with one key (``record.agent_id``, ``metadata``, ...) removed."""
    doc = doc or body("messages")
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    del target[last]
    return encode(doc)


def _with_lsn_as_string() -> bytes:
    doc = body("messages")
    doc["metadata"]["commit_lsn"] = "1000"
    return encode(doc)


def _with_table_name(name: str) -> bytes:
    doc = body("messages")
    doc["metadata"]["table_name"] = name
    return encode(doc)


@dataclass(frozen=True)
class Case:
    reason: str
    data: bytes
    subject: str = GOOD_SUBJECT
    good_subject: str = GOOD_SUBJECT
    settings: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "invalid_json": Case("invalid_json", b'{"record": {"message_id": "m1", '),
    "json_array": Case("invalid_shape", b'[{"record": {}, "metadata": {}}]'),
    "missing_record": Case("missing_field", _without("record")),
    "missing_metadata": Case("missing_field", _without("metadata")),
    "missing_pk": Case("missing_field", _without("record.message_id")),
    "missing_company": Case(
        "missing_field",
        _without("record.company_id"),
        subject=SEQUIN_SUBJECT,
        good_subject=SEQUIN_SUBJECT,
        settings=SEQUIN,
    ),
    "missing_agent_id": Case("missing_field", _without("record.agent_id")),
    "missing_chat_id": Case("missing_field", _without("record.chat_id")),
    # The company comes from the subject alone (no record.company_id), so only the token check can reject it.
    "star_in_subject_company": Case(
        "invalid_subject_token", _without("record.company_id"), subject="cdc.ac*me.messages"
    ),
    "dot_in_agent_id": Case("invalid_subject_token", encode(body("messages", agent_id="a.b"))),
    "gt_in_agent_id": Case("invalid_subject_token", encode(body("messages", agent_id="a>b"))),
    "space_in_agent_id": Case("invalid_subject_token", encode(body("messages", agent_id="a b"))),
    "tab_in_chat_id": Case("invalid_subject_token", encode(body("messages", chat_id="chat\t1"))),
    "tenant_mismatch": Case("tenant_mismatch", encode(body("messages", company_id="globex"))),
    "table_mismatch": Case("table_mismatch", _with_table_name("chats")),
    "commit_lsn_as_string": Case("invalid_shape", _with_lsn_as_string()),
    # Beyond the list in the brief: a subject that does not fit the layout, and an oversize body.
    "subject_off_layout": Case(
        "invalid_subject",
        encode(body("messages")),
        subject="sequin.changes.chatdb.messages.insert",
        good_subject=SEQUIN_SUBJECT,
        settings=SEQUIN,
    ),
    "payload_too_large": Case(
        "payload_too_large",
        encode(body("messages", padding="x" * 4096)),
        settings={"ingest.max_payload_bytes": 3000},
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_poison_is_dead_lettered_terminated_and_the_service_goes_on(js, start_service, case: Case) -> None:
    sequin = bool(case.settings.get("ingest.subjects"))
    await ensure_input(js, ["sequin.changes.>"] if sequin else None)
    svc = start_service(**case.settings)

    seq = await feed(js, case.subject, case.data)
    await feed(js, case.good_subject, body("messages"))

    assert await wait_count(js, OUTPUT, 1) == 1, svc.output()[-3000:]
    assert await wait_count(js, DLQ, 1) == 1, svc.output()[-3000:]
    [event] = payloads(await read_all(js, OUTPUT))
    assert event["event_id"] == "1000:chatdb:acme:messages:msg-1"
    assert event["company_id"] == "acme"

    [dead] = await read_all(js, DLQ)
    assert dead.subject == f"dlq.{case.subject}"
    assert dead.data == case.data
    headers = dead.headers or {}
    assert headers.get("Cdc-Error-Reason") == case.reason, headers
    assert headers.get("Cdc-Error-Detail", "").strip(), headers
    assert headers.get("Cdc-Source-Subject") == case.subject
    assert headers.get("Cdc-Source-Stream") == INPUT
    assert headers.get("Cdc-Source-Seq") == str(seq)
    assert headers.get("Cdc-Delivered") == "1"
    assert headers.get("Nats-Msg-Id") == f"dlq:{INPUT}:{seq}"

    # Terminated, not nak'ed: nothing pending, and each of the two messages was delivered exactly once.
    info = await consumer_settled(js)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == 2

    await wait_until(
        lambda: svc.metric("cdc_consumer_dead_letters_total", {"reason": case.reason}) == 1,
        what=f"cdc_consumer_dead_letters_total{{reason={case.reason}}} == 1",
    )
    await wait_until(
        lambda: svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 1,
        what="the good event counted as published",
    )
    assert svc.metric("cdc_consumer_events_total", {"result": "dead_lettered"}) == 1
    assert svc.metric("cdc_consumer_events_total", {"result": "retried"}) == 0
    assert svc.metric("cdc_consumer_redeliveries_total") == 0
    assert svc.alive()
