"""The published payload matches docs/enriched_event.schema.json, checked on what the real service wrote to wa_stream.

The schema is the contract with the websocket fan-out service; validating real output (not a hand-built dict) is what
catches a drift between the event builder and the document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from tests.integration.helpers import OUTPUT, ensure_input, feed, payloads, read_all, wait_count
from tests.sequin import body

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "enriched_event.schema.json"


def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)  # a broken schema must fail here, not validate everything
    return Draft202012Validator(schema)


def errors(check: Draft202012Validator, payload: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in check.iter_errors(payload)]


async def test_published_payloads_match_the_schema(js, start_service) -> None:
    check = validator()
    await ensure_input(js)
    start_service()
    # One message per routed table, each with its own LSN so none is deduplicated; commit_idx exercises "<lsn>.<idx>".
    await feed(js, "cdc.acme.messages", body("messages", lsn=2001, idx=3))
    await feed(js, "cdc.acme.chats", body("chats", lsn=2002))
    await feed(js, "cdc.acme.agents", body("agents", lsn=2003, action="update"))

    assert await wait_count(js, OUTPUT, 3) == 3
    out = await read_all(js, OUTPUT)
    published = payloads(out)
    assert [m.subject for m in out] == [
        "wa.acme.agent-1.messages.chat-1",
        "wa.acme.agent-1.chats",
        "wa.acme.agent-1.agents",
    ]
    assert [p["event_id"] for p in published] == [
        "2001.3:chatdb:acme:messages:msg-1",
        "2002:chatdb:acme:chats:chat-1",
        "2003:chatdb:acme:agents:agent-1",
    ]
    for payload in published:
        assert errors(check, payload) == [], payload

    # The schema must be able to fail: the same real payloads, broken, are rejected.
    without_row = {k: v for k, v in published[0].items() if k != "row_data"}
    assert any("'row_data' is a required property" in e for e in errors(check, without_row))
    assert errors(check, {**published[1], "event_id": "chat-1"})
    assert errors(check, {**published[2], "action": "upsert"})
    assert errors(check, {**published[2], "agent_id": 7})
