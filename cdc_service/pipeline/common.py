"""What the pipeline's classes share: a batch of inbound messages, one publish of it, and the tasks drain cancels."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from cdc_service.core.outcomes import DeadLetter, Outcome, Publish, Result
from cdc_service.core.subjects import printable_subject
from cdc_service.ports import InboundMessage, PubAck, source_position


@dataclass(eq=False)
class Batch:
    """Messages dispatched to the pool together; settled one by one, counted when the last one is settled."""

    messages: list[InboundMessage]
    received: float
    open: set[int]  # indexes not yet acked, nak'ed or terminated
    outcomes: asyncio.Future[list[Outcome]] = field(init=False)
    started: bool = False  # a worker has picked it up
    number: int = 0  # dispatch order, from 1
    nbytes: int = 0  # payload bytes of the messages still open (the in-flight memory bound counts these)
    counts: Counter[tuple[str, Result]] = field(default_factory=Counter)  # (table, result), counted when it closes


@dataclass(eq=False)
class Send:
    """One publish of a batch: an event to the output stream, or an original message to the dead-letter stream."""

    index: int
    subject: str
    payload: bytes
    headers: dict[str, str]
    outcome: Publish | DeadLetter
    future: asyncio.Future[PubAck] | None = None
    error: str = ""
    exc: BaseException | None = None  # what the last failed attempt raised, classified by decide_failure
    duplicate: bool = False  # JetStream already held this Nats-Msg-Id


class Tasks:
    """Tasks started beside the receipt-order walk (finishers, followers, dead-letter holds); drain cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def about(msg: InboundMessage, event_id: str = "") -> dict[str, Any]:
    """Log fields that identify one message: its subject, source stream and sequence, and its event id when known."""
    stream, seq = source_position(msg.reply)
    fields: dict[str, Any] = {"subject": printable_subject(msg.subject)[0], "stream": stream, "stream_seq": seq}
    if event_id:
        fields["event_id"] = event_id
    return fields
