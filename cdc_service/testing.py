"""In-memory fakes of the ports, for unit tests and the in-process benchmark. Not for production use.

``FakeMessage`` records what the pipeline did with it (``acked``, ``naked``, ``termed``, ``in_progress``);
``FakePublisher`` resolves every publish at once, or fails while ``failing`` is set; ``FakeDedupStore`` is a set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cdc_service.ports import PubAck, PublishRejected


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

    async def publish(self, subject: str, payload: bytes, headers: Mapping[str, str]) -> asyncio.Future[PubAck]:
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
    """A set of marked event ids. ``down`` makes every call fail open like an unreachable Redis."""

    marked: set[str] = field(default_factory=set)
    down: bool = False
    lookups: int = 0
    marks: int = 0

    @property
    def available(self) -> bool:
        return not self.down

    def seen(self, event_ids: Sequence[str]) -> list[bool] | None:
        self.lookups += 1
        if self.down:
            return None
        return [event_id in self.marked for event_id in event_ids]

    def mark(self, event_ids: Sequence[str]) -> bool:
        self.marks += 1
        if self.down:
            return False
        self.marked.update(event_ids)
        return True
