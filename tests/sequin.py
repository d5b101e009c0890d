"""Sequin CDC message bodies shaped like the real NATS sink's (see docs/schemas.md), for tests and benchmarks."""

from __future__ import annotations

import json
from typing import Any

_RECORDS: dict[str, dict[str, Any]] = {
    "messages": {
        "id": 1,
        "message_id": "msg-1",
        "chat_id": "chat-1",
        "agent_id": "agent-1",
        "company_id": "acme",
        "from_user": "6281234567890",
        "flow": "IN",
        "type": "text",
        "status": "delivered",
        "is_deleted": False,
        "body": {"text": "hello there"},
        "message_timestamp": "2026-11-27T04:00:00.000000Z",
        "created_at": "2026-11-27T04:00:00.123456Z",
    },
    "chats": {
        "id": 2,
        "chat_id": "chat-1",
        "agent_id": "agent-1",
        "company_id": "acme",
        "push_name": "Ayu",
        "unread_count": 3,
        "is_group": False,
        "last_message": {"text": "hello there"},
        "updated_at": "2026-11-27T04:00:00.123456Z",
    },
    "agents": {
        "id": 3,
        "agent_id": "agent-1",
        "company_id": "acme",
        "agent_name": "Support 1",
        "status": "active",
        "qr_code": None,
        "version": 7,
        "updated_at": "2026-11-27T04:00:00.123456Z",
    },
}


def record(table: str, **overrides: Any) -> dict[str, Any]:
    row = json.loads(json.dumps(_RECORDS.get(table, {"id": 9, "company_id": "acme"})))
    row.update(overrides)
    return row


def body(
    table: str = "messages",
    *,
    lsn: int | None = 1000,
    idx: int | None = None,
    action: str = "insert",
    commit_timestamp: str = "2026-11-27T04:00:00.123456Z",
    **record_overrides: Any,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "table_schema": "public",
        "table_name": table,
        "commit_timestamp": commit_timestamp,
        "idempotency_key": "MTAwMDox",
        "database_name": "chatdb",
        "transaction_annotations": None,
        "consumer": {"id": "f47ac10b-58cc-4372-a567-0e02b2c3d479", "name": f"{table}_sink"},
    }
    if lsn is not None:
        metadata["commit_lsn"] = lsn
    if idx is not None:
        metadata["commit_idx"] = idx
    return {"record": record(table, **record_overrides), "changes": None, "action": action, "metadata": metadata}


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()
