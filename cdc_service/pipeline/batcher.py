"""Micro-batching: messages in, batches out to the worker pool, queued in receipt order for the engine's walk."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from cdc_service.config import IngestSettings
from cdc_service.core.outcomes import Outcome, Publish
from cdc_service.metrics import Metrics
from cdc_service.pipeline.clock import Clock
from cdc_service.pipeline.common import Batch
from cdc_service.pipeline.ledger import SettleLedger
from cdc_service.ports import InboundMessage


class Batcher:
    """Buffers pushed messages into batches of ``ingest.batch_size`` (or what arrived within ``batch_wait_ms``),
    takes pulled batches as they are, and dispatches each to the pool (``prepare``) at once.

    Dispatched batches wait in ``queue``, in receipt order, until the engine's walk takes them (``next`` and
    ``pop``); their outcomes are prepared meanwhile, possibly out of order. Back-pressure is the ledger's.
    """

    def __init__(
        self,
        ingest: IngestSettings,
        prepare: Callable[[Sequence[InboundMessage]], list[Outcome]],
        executor: Executor,
        ledger: SettleLedger,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._batch_size = ingest.batch_size
        self._batch_wait = ingest.batch_wait_ms / 1000.0
        self._prepare = prepare
        self._executor = executor
        self._ledger = ledger
        self._metrics = metrics
        self._clock = clock
        self._buffer: list[InboundMessage] = []
        self._buffer_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.queue: deque[Batch] = deque()
        self._queued = asyncio.Event()
        self.dispatched = 0  # batches dispatched so far: the number of the latest

    def take(self, msg: Any) -> bool:
        """Push intake: buffer the message; the batch goes out when full or after batch_wait_ms. False when
        ``ingest.max_inflight_mb`` is in flight: the caller then waits (``wait_for_room``) before the next one, since
        the server's ``max_ack_pending`` bounds push by count only."""
        buffer = self._buffer
        buffer.append(msg)
        if len(buffer) >= self._batch_size:
            self.flush()
        elif len(buffer) == 1:
            self._buffer_started = self._clock.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self._batch_wait, self.flush)
        if self._ledger.over_bytes():
            self.flush()
            return False
        return True

    async def wait_for_room(self) -> None:
        """Until the in-flight counts are below their bounds (or intake is released)."""
        await self._ledger.wait_for_room()

    async def on_message(self, msg: Any) -> None:
        """``take`` as a push-subscription callback: waits for room where ``take`` says so. What arrives meanwhile
        waits in the subscription's own bounded queue (see ``PushIntake``)."""
        if not self.take(msg):
            await self._ledger.wait_for_room()

    async def on_batch(self, messages: list[Any]) -> None:
        """Pull-loop callback: one fetched batch. Waits while too much is in flight, by count or by bytes (the pull
        back-pressure: nothing more is fetched, so nothing waits outside the engine)."""
        self.dispatch(messages, self._clock.monotonic())
        await self._ledger.wait_for_room()

    def flush(self) -> None:
        """Dispatch what is buffered now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            messages, self._buffer = self._buffer, []
            self.dispatch(messages, self._buffer_started or self._clock.monotonic())
            self._buffer_started = 0.0

    def dispatch(self, messages: list[InboundMessage], received: float) -> None:
        """Hand ``messages`` to the pool as one batch and queue it for the walk."""
        self.dispatched += 1
        nbytes = sum(len(m.data) for m in messages)
        batch = Batch(messages, received, set(range(len(messages))), number=self.dispatched, nbytes=nbytes)
        self._ledger.open(batch)
        batch.outcomes = asyncio.get_running_loop().run_in_executor(self._executor, self._prepare_batch, batch)
        self.queue.append(batch)
        self._queued.set()
        self._metrics.batch_size.observe(len(messages))
        self.update_queue_gauge()

    def _prepare_batch(self, batch: Batch) -> list[Outcome]:
        batch.started = True  # a plain attribute write; the loop only reads it for the queue-depth gauge
        return self._prepare(batch.messages)

    def update_queue_gauge(self) -> None:
        self._metrics.pool_queue.set(sum(1 for b in self.queue if not b.started))

    async def next(self) -> Batch:
        """The oldest batch not yet walked (left in the queue until ``pop``); waits for one."""
        while not self.queue:
            self._queued.clear()
            await self._queued.wait()
        return self.queue[0]

    def pop(self) -> Batch:
        return self.queue.popleft()

    def claimed_in_queue(self) -> set[str]:
        """Events of prepared batches not yet walked (behind a hold) that hold this replica's claim."""
        ids: set[str] = set()
        for batch in self.queue:
            if batch.outcomes.done() and not batch.outcomes.cancelled() and batch.outcomes.exception() is None:
                ids.update(o.event_id for o in batch.outcomes.result() if isinstance(o, Publish) and o.claimed)
        return ids
