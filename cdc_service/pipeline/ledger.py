"""The settle ledger: every inbound message is acked, nak'ed or terminated exactly once, and counted."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from cdc_service.config import Settings
from cdc_service.core.outcomes import Action, Reason, Result
from cdc_service.metrics import OTHER_TABLE, Metrics, observe_all
from cdc_service.pipeline.clock import Clock
from cdc_service.pipeline.common import Batch, about
from cdc_service.ports import InboundMessage

log = logging.getLogger("cdc_service.engine")

# An enum class attribute (``Action.ACK``) costs about 60 ns to look up on Python 3.11, and settle runs once per
# message: the actions are bound here once and compared by identity.
_ACK, _TERM = Action.ACK, Action.TERM


class SettleLedger:
    """Bookkeeping of what is in flight, from dispatch (``open``) to settling (``settle``).

    Keeps the in-flight counts (messages and payload bytes) behind the back-pressure (``wait_for_room``), the
    ``idle`` event drain waits on, the progress times the health checks read, the totals and the event metrics
    (per batch, when its last message is settled: thousands of counter updates a second are not cheap).
    """

    def __init__(self, settings: Settings, metrics: Metrics, clock: Clock) -> None:
        self._metrics = metrics
        self._clock = clock
        self._monotonic = clock.monotonic  # bound once: settle reads both clocks per message
        self._wall_time = clock.time
        self._routed = frozenset(settings.routes)
        self._max_ack_pending = settings.ingest.max_ack_pending
        self._max_inflight_bytes = settings.ingest.max_inflight_mb * 1024 * 1024
        self.open_batches: set[Batch] = set()
        self.inflight = 0
        self.inflight_bytes = 0
        self.last_received = clock.monotonic()
        self.last_settled = clock.monotonic()
        # Until the first ack, "the last ack" is the engine's start: no-acks alerts then measure from there.
        self._last_settled_wall = clock.time()
        metrics.last_ack.set(self._last_settled_wall)
        self.totals: Counter[str] = Counter()
        self._counters: dict[tuple[str, str], Any] = {}
        self._timers: dict[str, Any] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._backpressure = True  # off once intake stops, so a draining subscription never waits for room

    # ------------------------------------------------------------------------------------------- intake side

    def open(self, batch: Batch) -> None:
        """``batch`` was dispatched: its messages and bytes are in flight until each is settled."""
        self.inflight_bytes += batch.nbytes
        self.last_received = self._clock.monotonic()
        self.open_batches.add(batch)
        self.inflight += len(batch.messages)
        self.idle.clear()
        self._metrics.inflight.set(self.inflight)

    def over_bytes(self) -> bool:
        """True when intake should stop buffering and wait: the in-flight bytes are at their bound."""
        return self._backpressure and self.inflight_bytes >= self._max_inflight_bytes

    def has_room(self) -> bool:
        return not self._backpressure or (
            self.inflight < self._max_ack_pending and self.inflight_bytes < self._max_inflight_bytes
        )

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def release_intake(self) -> None:
        """Stop back-pressure for good: intake is stopping and what it still hands over must not wait for room."""
        self._backpressure = False
        self._room.set()

    # ------------------------------------------------------------------------------------------- settling

    async def settle(
        self,
        batch: Batch,
        index: int,
        result: Result,
        table: str,
        *,
        delay: float = 0.0,
        reason: Reason | None = None,
    ) -> None:
        """Settle message ``index`` of ``batch`` as ``result`` says (once; later calls do nothing) and count it.

        ``delay`` is the nak delay of a retried message (0: redeliver at once); ``reason`` counts a dead letter.
        """
        msg = self._take(batch, index)
        if msg is None:
            return
        action = result.action
        try:
            if action is _ACK:
                await msg.ack()
            elif action is _TERM:
                await msg.term()
            else:  # Action.NAK, the only other one
                await msg.nak(delay=delay or None)
        except Exception as exc:  # connection lost: the server redelivers after AckWait, nothing is lost
            _log_unsettled(action, exc, msg)
        now = self._monotonic()
        if table not in self._routed:
            table = OTHER_TABLE  # a metric label: unrouted table names come from input, so they share one
        if result.timed:
            self._timer(table).observe(now - batch.received)
        if reason is not None:
            self._metrics.dead_letters.labels(reason.value).inc()
        self._count(batch, result, table, now)

    async def settle_all(self, batch: Batch, settles: list[tuple[int, Result, str]]) -> None:
        """``settle`` each of ``settles`` (index, result, table), all acks (published, duplicate, skipped), in one
        coroutine; each message's processing time goes into the histogram with those of its table at the end (one
        update per bucket instead of an ``observe`` per message; the same figures)."""
        timed: dict[str, list[float]] = {}
        monotonic, received = self._monotonic, batch.received
        for index, result, named in settles:
            msg = self._take(batch, index)
            if msg is None:
                continue
            try:
                await msg.ack()
            except Exception as exc:  # connection lost: the server redelivers after AckWait, nothing is lost
                _log_unsettled(_ACK, exc, msg)
            now = monotonic()
            table = named if named in self._routed else OTHER_TABLE
            if result.timed:
                times = timed.get(table)
                if times is None:
                    times = timed[table] = []
                times.append(now - received)
            self._count(batch, result, table, now)
        for table, times in timed.items():
            observe_all(self._timer(table), times)

    def _take(self, batch: Batch, index: int) -> InboundMessage | None:
        """Message ``index`` of ``batch``, now no longer open; None when it was settled already."""
        if index not in batch.open:
            return None
        batch.open.discard(index)
        msg = batch.messages[index]
        size = len(msg.data)
        batch.nbytes -= size
        self.inflight_bytes -= size
        return msg

    def _count(self, batch: Batch, result: Result, table: str, now: float) -> None:
        """Count a settled message; the batch is closed (and its counters updated) with its last one."""
        if result.progress:
            self.last_settled = now
            self._last_settled_wall = self._wall_time()
        batch.counts[(table, result)] += 1  # the member itself: .value is a Python-level descriptor
        self.inflight -= 1
        if not batch.open:
            self._close(batch)

    def _timer(self, table: str) -> Any:
        timed = self._timers.get(table)
        if timed is None:
            timed = self._timers[table] = self._metrics.processing.labels(table)
        return timed

    def _close(self, batch: Batch) -> None:
        self.open_batches.discard(batch)
        for (table_name, result), n in batch.counts.items():
            result_name = result.value
            self.totals[result_name] += n
            counter = self._counters.get((table_name, result_name))
            if counter is None:
                counter = self._counters[(table_name, result_name)] = self._metrics.events.labels(
                    table_name, result_name
                )
            counter.inc(n)
        self._metrics.inflight.set(self.inflight)
        self._metrics.inflight_bytes.set(self.inflight_bytes)
        self._metrics.last_ack.set(self._last_settled_wall)
        if self.inflight <= 0:
            self.inflight = 0
            self.inflight_bytes = 0
            self.idle.set()
        if self.has_room():
            self._room.set()


def _log_unsettled(action: Action, exc: Exception, msg: InboundMessage) -> None:
    log.debug("could not %s message", action.value, extra={"error": str(exc)[:200], **about(msg)})
