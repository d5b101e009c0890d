"""In-memory fakes of the ports, for unit tests and the in-process benchmark. Not for production use.

``FakeMessage`` records what the pipeline did with it (``acked``, ``naked``, ``termed``, ``in_progress``);
``FakePublisher`` resolves every publish at once, or fails while ``failing`` is set; ``FakeDedupStore`` is a set of
markers and a dict of claims, which several stores (replicas) may share; ``ManualClock`` is the engine's clock, moved
ahead by the test.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdc_service.ports import Claim, PubAck, PublishRejected


@dataclass
class _Sequence:
    stream: int
    consumer: int


@dataclass
class _Metadata:
    stream: str
    sequence: _Sequence
    num_delivered: int


class FakeMessage:
    """A delivered JetStream message: ``subject``, ``data``, a v1 ack ``reply`` and the ack family as coroutines."""

    def __init__(
        self, subject: str, data: bytes, *, seq: int = 1, delivered: int = 1, stream: str = "cdc_events_stream"
    ):
        self.subject = subject
        self.data = data
        self.headers: dict[str, str] | None = None
        self.reply = f"$JS.ACK.{stream}.cdc_consumers.{delivered}.{seq}.{seq}.1700000000000000000.0"
        self.metadata = _Metadata(stream, _Sequence(seq, seq), delivered)
        self.acked = 0
        self.naked: list[float | None] = []
        self.termed = 0
        self.in_progress_count = 0

    @property
    def settled(self) -> bool:
        return bool(self.acked or self.naked or self.termed)

    async def ack(self) -> None:
        self.acked += 1

    async def nak(self, delay: float | None = None) -> None:
        self.naked.append(delay)

    async def term(self) -> None:
        self.termed += 1

    async def in_progress(self) -> None:
        self.in_progress_count += 1


@dataclass
class Published:
    subject: str
    payload: bytes
    headers: dict[str, str]


@dataclass
class FakePublisher:
    """Stores publishes in ``published`` and dedups on ``Nats-Msg-Id`` like a JetStream stream with a window."""

    failing: bool = False
    max_payload: int = 1024 * 1024
    published: list[Published] = field(default_factory=list)
    attempts: int = 0
    _ids: set[str] = field(default_factory=set)

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, detailed: bool = False
    ) -> asyncio.Future[PubAck]:
        self.attempts += 1
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        if self.failing:
            future.set_exception(PublishRejected("fake output is failing"))
            return future
        msg_id = headers.get("Nats-Msg-Id", "")
        if msg_id and msg_id in self._ids:
            future.set_result(PubAck("fake", 0, duplicate=True))
            return future
        if msg_id:
            self._ids.add(msg_id)
        self.published.append(Published(subject, payload, dict(headers)))
        future.set_result(PubAck("fake", len(self.published)))
        return future

    def sweep(self) -> None:
        return None


@dataclass
class FakeDedupStore:
    """A set of marked event ids and a dict of claims (event id -> holder ``token``); pass the same set and dict to
    two stores for two replicas. Claims never expire here (delete them to act out an expiry). ``down`` makes every
    call fail open like an unreachable Redis; ``claims_on=False`` acts out ``dedup.claim_ttl = 0``."""

    marked: set[str] = field(default_factory=set)
    claims: dict[str, str] = field(default_factory=dict)
    token: str = "replica-a"
    routing: dict[str, str] = field(default_factory=dict)  # row key -> routing fields (JSON)
    down: bool = False
    claims_on: bool = True
    lookups: int = 0
    marks: int = 0
    released: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return not self.down

    def seen(self, event_ids: Sequence[str]) -> list[bool] | None:
        self.lookups += 1
        if self.down:
            return None
        return [event_id in self.marked for event_id in event_ids]

    def claim(self, event_ids: Sequence[str]) -> list[Claim] | None:
        self.lookups += 1
        if self.down:
            return None
        states = []
        for event_id in event_ids:
            holder = self.claims.get(event_id)
            if event_id in self.marked:
                states.append(Claim.DONE)
            elif holder == self.token:
                states.append(Claim.CLAIMED)
            elif holder is not None:
                states.append(Claim.HELD)
            elif self.claims_on:
                self.claims[event_id] = self.token
                states.append(Claim.CLAIMED)
            else:
                states.append(Claim.FREE)
        return states

    def release(self, event_ids: Sequence[str]) -> None:
        if self.down:
            return
        for event_id in event_ids:
            if self.claims.get(event_id) == self.token:
                del self.claims[event_id]
                self.released.append(event_id)

    def mark(self, event_ids: Sequence[str]) -> bool:
        self.marks += 1
        if self.down:
            return False
        self.marked.update(event_ids)
        for event_id in event_ids:  # the marker replaces the claim
            self.claims.pop(event_id, None)
        return True

    def routes(self, keys: Sequence[str]) -> list[str | None] | None:
        if self.down:
            return None
        return [self.routing.get(key) for key in keys]

    def remember_routes(self, entries: Sequence[tuple[str, str]]) -> bool:
        if self.down:
            return False
        self.routing.update(entries)
        return True


# ---------------------------------------------------------------------------------------------------------------
# Sample Sequin messages, shaped like the real NATS sink's (docs/schemas.md): for tests, benchmarks and the demo.

SAMPLE_RECORDS: dict[str, dict[str, Any]] = {
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


class ManualClock:
    """A ``pipeline.clock.Clock`` that runs with the real one but can be moved ahead (``advance``): a test makes
    ``publish.max_hold`` or ``health.stall_timeout`` pass at once instead of waiting for it. asyncio's own timers
    (``sleep``, ``wait_for``) still run on the real clock."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def sample_record(table: str, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of the sample row of ``table`` with ``overrides`` applied."""
    row = copy.deepcopy(SAMPLE_RECORDS.get(table, {"id": 9, "company_id": "acme"}))
    row.update(overrides)
    return row


def sequin_message(
    table: str,
    record: dict[str, Any],
    *,
    lsn: int | None = 1000,
    idx: int | None = None,
    action: str = "insert",
    commit_timestamp: str = "2026-11-27T04:00:00.123456Z",
) -> dict[str, Any]:
    """A Sequin change message carrying ``record``; ``lsn=None`` leaves ``commit_lsn`` out, as backfill reads do."""
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
    return {"record": record, "changes": None, "action": action, "metadata": metadata}
