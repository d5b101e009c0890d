"""The small interfaces the pipeline depends on. Real adapters live in ``adapters/``, fakes in ``testing.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from cdc_service.core.outcomes import PublishRejected

__all__ = ["DedupStore", "InboundMessage", "PubAck", "PublishRejected", "Publisher", "PushSink", "delivery_count"]


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream's answer to a publish. ``duplicate`` means the stream already held this ``Nats-Msg-Id``."""

    stream: str
    seq: int
    duplicate: bool = False


class Claim(Enum):
    """What a lookup-and-claim found for one event id."""

    DONE = "done"  # the "done" marker: published before, ack as a duplicate
    CLAIMED = "claimed"  # this replica holds the claim now (taken by this call, or already its own)
    HELD = "held"  # another replica's claim: it is publishing this event right now
    FREE = "free"  # neither marker nor claim, and no claim taken (claims are off)


class DedupStore(Protocol):
    """Long-range duplicate memory (Redis). Every call fails open: none raises."""

    def seen(self, event_ids: Sequence[str]) -> list[bool] | None:
        """Which ids were already published; ``None`` when the store cannot be asked (count as misses)."""

    def claim(self, event_ids: Sequence[str]) -> list[Claim] | None:
        """Look up each id and, where neither a marker nor a claim exists, take a short-lived claim for this replica,
        in one round trip. A claim says "in progress" and never "done": only ``mark`` says that. ``None`` when the
        store cannot be asked (publish without a claim)."""

    def release(self, event_ids: Sequence[str]) -> None:
        """Drop this replica's claims on these ids (their publish failed); others' claims and markers stay."""

    def mark(self, event_ids: Sequence[str]) -> bool:
        """Remember ids whose publish was acknowledged; ``False`` when that did not happen."""

    def routes(self, keys: Sequence[str]) -> list[str | None] | None:
        """The routing fields remembered for each row key (JSON text, ``None`` when unknown); ``None`` when the store
        cannot be asked."""

    def remember_routes(self, entries: Sequence[tuple[str, str]]) -> bool:
        """Remember ``(row key, routing fields as JSON)`` pairs for ``dedup.routing_ttl``; ``False`` on failure."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable."""


class Publisher(Protocol):
    """Pipelined JetStream publishing. Only the loop thread calls it."""

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, detailed: bool = False
    ) -> asyncio.Future[PubAck]:
        """Send one message; the returned future resolves with its ``PubAck`` or a ``PublishRejected``.

        Only a ``detailed`` publish's ``PubAck`` is sure to carry the stream and sequence (the others are read
        without a JSON parse).

        Submission order is wire order. The future may never resolve (lost reply): callers bound the wait.
        """

    def sweep(self) -> None:
        """Forget futures the caller gave up on."""

    @property
    def max_payload(self) -> int:
        """The largest message (headers included) the server accepts."""


def delivery_count(reply: str) -> int:
    """The delivery attempt (1 = first) from a JetStream ack subject, cheaper than nats-py's ``msg.metadata``.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (v1) or the v2 form with a domain and
    account hash in front.
    """
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[4])
        if len(tokens) >= 11:
            return int(tokens[6])
    except ValueError:
        pass
    return 1


def source_position(reply: str) -> tuple[str, int | None]:
    """(stream, stream sequence) from a JetStream ack subject, for log lines; ``("", None)`` when it is not one."""
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return tokens[2], int(tokens[5])
        if len(tokens) >= 11:
            return tokens[4], int(tokens[7])
    except ValueError:
        pass
    return "", None


class InboundMessage(Protocol):
    """The part of a nats-py ``Msg`` the pipeline uses. Acks are coroutines: call them on the loop thread only."""

    @property
    def subject(self) -> str: ...

    @property
    def reply(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str] | None: ...

    @property
    def metadata(self) -> Any: ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def term(self) -> None: ...

    async def in_progress(self) -> None: ...


class PushSink(Protocol):
    """Where push intake hands messages, one at a time, in arrival order (the engine). Loop thread only."""

    def take(self, msg: Any) -> bool:
        """Accept ``msg``; False when the caller must ``wait_for_room`` before handing over the next one."""

    async def wait_for_room(self) -> None:
        """Return once there is room again (at once after intake was released for shutdown)."""
