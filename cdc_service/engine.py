"""Loop-thread side of the pipeline: the receipt-order walk, finishing and draining. The parts it drives live in
``cdc_service.pipeline`` (see its docstring for how one message flows through them).

The path of one batch::

    intake ──► Batcher (≤ batch_size or batch_wait_ms) ──► pool: parse, route, build, Redis lookup ──► outcomes
      ──► walk (FIFO, so receipt order is wire order): ack skips and duplicates, send publishes
      ──► Finisher task: wait for PubAcks (Output holds and retries on failure) ──► pool: Redis markers
      ──► SettleLedger: ack / nak / term

Only this thread touches NATS objects. The ack of a published event comes after its PubAck (at-least-once) and the
publish carries ``Nats-Msg-Id: <event_id>`` so a repeat inside JetStream's window is dropped (exactly-once effect).

Core NATS subscribers see every publish, including those the stream drops as repeats, so a copy of an event is not
published while the event is in flight: within this replica the in-flight table (``FlightTable``) makes a later copy
wait for the first copy's outcome (``Copies``); across replicas the Redis claim taken with the lookup does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import assert_never

from cdc_service.config import Settings
from cdc_service.core.correlation import CORRELATION_HEADER_BYTES
from cdc_service.core.outcomes import (
    ClaimedElsewhere,
    DeadLetter,
    Duplicate,
    Outcome,
    Publish,
    Reason,
    Result,
    Retry,
    Skip,
    decide_failure,
)
from cdc_service.core.subjects import publishable_subject_problem
from cdc_service.metrics import Metrics
from cdc_service.pipeline.batcher import Batcher
from cdc_service.pipeline.clock import SYSTEM_CLOCK, Clock
from cdc_service.pipeline.common import Batch, Send, Tasks, about
from cdc_service.pipeline.copies import Copies
from cdc_service.pipeline.finisher import Finisher
from cdc_service.pipeline.flights import FlightTable
from cdc_service.pipeline.ledger import SettleLedger
from cdc_service.pipeline.output import Output
from cdc_service.ports import DedupStore, InboundMessage, Publisher, delivery_count

log = logging.getLogger("cdc_service.engine")

# Room kept under the server's max_payload for an event's headers: Nats-Msg-Id, Nats-Expected-Stream and the
# correlation headers count against it too.
EVENT_HEADER_ROOM = 512 + CORRELATION_HEADER_BYTES
# After the drain deadline, how long holds get to notice shutdown (at their next attempt) and hand back their work.
HOLD_STOP_GRACE = 0.5
# How long drain waits for claim releases to reach Redis before the pool shuts down.
RELEASE_GRACE = 1.0
# Output subjects found publishable, remembered so the walk checks each one once; they come from input (company and
# table tokens), so the set is emptied when it reaches this size.
PUBLISHABLE_SUBJECTS_KEPT = 10_000


def _report_unexpected_end(task: asyncio.Task[None]) -> None:
    """These tasks run until drain cancels them; ending otherwise is a bug that the stall guard will act on."""
    if not task.cancelled() and task.exception() is not None:
        log.critical(
            "%s ended unexpectedly; liveness will fail once work is stuck", task.get_name(), exc_info=task.exception()
        )


class Engine:
    """Runs on the loop thread. Push intake feeds it with ``take`` (and waits in ``wait_for_room`` when told to;
    ``on_message`` does both, for a caller that can await), pull with ``on_batch``; ``drain`` empties it."""

    def __init__(
        self,
        settings: Settings,
        prepare: Callable[[Sequence[InboundMessage]], list[Outcome]],
        dedup: DedupStore,
        publisher: Publisher,
        executor: Executor,
        metrics: Metrics,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._max_deliver = settings.ingest.max_deliver
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned = Tasks()
        self._publishable: set[str] = set()  # see PUBLISHABLE_SUBJECTS_KEPT
        self.ledger = SettleLedger(settings, metrics, clock)
        self.batcher = Batcher(settings.ingest, prepare, executor, self.ledger, metrics, clock)
        self.output = Output(settings.publish, publisher, metrics, clock)
        self.flights = FlightTable(
            dedup,
            executor,
            metrics,
            clock,
            dispatched=lambda: self.batcher.dispatched,
            claimed_in_queue=self.batcher.claimed_in_queue,
        )
        self._finisher = Finisher(
            settings, self.ledger, self.output, self.flights, dedup, executor, metrics, clock, self._spawned
        )
        self._copies = Copies(
            self.flights, self.ledger, self.output, self._finisher, dedup, executor, metrics, self._spawned
        )
        self.on_message = self.batcher.on_message
        self.on_batch = self.batcher.on_batch
        self.take = self.batcher.take
        self.wait_for_room = self.batcher.wait_for_room

    # ------------------------------------------------------------------------------------------- figures

    @property
    def inflight(self) -> int:
        return self.ledger.inflight

    @property
    def inflight_bytes(self) -> int:
        return self.ledger.inflight_bytes

    @property
    def last_received(self) -> float:
        return self.ledger.last_received

    @property
    def last_settled(self) -> float:
        return self.ledger.last_settled

    @property
    def totals(self) -> Counter[str]:
        return self.ledger.totals

    @property
    def lag(self) -> float | None:
        """Seconds from source commit to PubAck of the latest published event."""
        return self._finisher.lag

    # ------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_in_order(), name="cdc-publisher"),
            asyncio.create_task(self._keep_alive(), name="cdc-keepalive"),
        ]
        if self._settings.dedup.claim_ttl > 0:
            renew = self.flights.renew_claims(self._settings.dedup.claim_ttl)
            self._tasks.append(asyncio.create_task(renew, name="cdc-claims"))
        for task in self._tasks:
            task.add_done_callback(_report_unexpected_end)

    def stalled(self, now: float | None = None) -> bool:
        """True when work is pending and nothing was acked or terminated for ``health.stall_timeout``.

        A hold is not a stall: the engine is waiting on an output it knows is failing, a restart would not help
        and would only spend delivery attempts; the publish-errors alert reports that state instead.
        """
        now = self._clock.monotonic() if now is None else now
        waiting = self.ledger.inflight - self.output.dead_letters_held  # a held dead letter waits, like a hold
        quiet = now - self.ledger.last_settled
        return waiting > 0 and self.output.holds == 0 and quiet > self._settings.health.stall_timeout

    def release_intake(self) -> None:
        """Stop back-pressure for good: intake is stopping and what it still hands over must not wait for room."""
        self.ledger.release_intake()

    async def drain(self, deadline: float) -> None:
        """Finish everything received (intake must already be stopped) until ``deadline`` (monotonic).

        What is still retrying at the deadline is nak'ed without delay so another replica takes it at once.
        """
        self.batcher.flush()
        idle = self.ledger.idle
        try:
            await asyncio.wait_for(idle.wait(), max(0.0, deadline - self._clock.monotonic()))
        except TimeoutError:
            log.warning("drain deadline reached, handing back unfinished work", extra={"inflight": self.inflight})
        self.output.stop()
        try:
            # Holds notice the stop at their next attempt and nak what they hold; give them a moment.
            await asyncio.wait_for(idle.wait(), HOLD_STOP_GRACE)
        except TimeoutError:
            pass
        await self._hand_back()
        # Claims released by holds that gave up: let them reach Redis before the pool is shut down, so another
        # replica takes the nak'ed messages at once instead of after dedup.claim_ttl.
        if self.flights.releases:
            await asyncio.wait(set(self.flights.releases), timeout=RELEASE_GRACE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._spawned.cancel()

    async def _hand_back(self) -> None:
        for batch in list(self.ledger.open_batches):
            for index in list(batch.open):
                msg = batch.messages[index]
                if 0 < self._max_deliver <= delivery_count(msg.reply):
                    log.critical(
                        "handing back a message on its final delivery at shutdown; the server will not redeliver it",
                        extra={**about(msg), "delivered": delivery_count(msg.reply)},
                    )
                await self.ledger.settle(batch, index, Result.RETRIED, "")

    async def _keep_alive(self) -> None:
        """Extend AckWait (``in_progress``) for messages held longer than a third of it, so holding does not burn
        delivery attempts; and forget abandoned publish futures."""
        period = max(0.05, min(5.0, self._settings.ingest.ack_wait / 3.0))
        while True:
            await asyncio.sleep(period)
            self.output.sweep()
            self.batcher.update_queue_gauge()
            cutoff = self._clock.monotonic() - period
            for batch in list(self.ledger.open_batches):
                if batch.received < cutoff:
                    for index in list(batch.open):
                        try:
                            await batch.messages[index].in_progress()
                        except Exception:
                            pass

    # ------------------------------------------------------------------------------------------- the walk

    async def _publish_in_order(self) -> None:
        """Take batches in receipt order and send their publishes; the waiting happens in per-batch finishers.

        Ordering: this task is the only one that sends a first publish of an event, and it walks batches and their
        messages in receipt order, so the wire order of events is receipt order, as before the in-flight table. A
        copy of an event in flight publishes nothing here: it waits beside the walk (``Copies``) and is acked as a
        duplicate when the first copy is stored. Only when that first copy failed for good does the copy publish,
        later than its receipt position; the failed copy is nak'ed and would come back out of order in any case, so
        no order that existed is lost. A copy whose claim another replica holds has no position here at all: its
        event is placed on the wire by that replica.
        """
        while True:
            batch = await self.batcher.next()
            outcomes = await self._outcomes_of(batch)
            # While the output is failing, later batches wait here so they do not overtake the held one.
            await self.output.wait_open()
            self.batcher.pop()
            self.flights.forget(batch.number)
            await self._walk(batch, outcomes)

    async def _outcomes_of(self, batch: Batch) -> list[Outcome]:
        try:
            return await batch.outcomes
        except Exception as exc:  # the worker itself failed: a bug; retry the whole batch later
            self._metrics.handler_errors.labels(type(exc).__name__).inc()
            log.exception("batch preparation failed", extra={"batch": len(batch.messages)})
            return [
                decide_failure(exc, table="", num_delivered=delivery_count(m.reply), max_deliver=self._max_deliver)
                for m in batch.messages
            ]

    async def _walk(self, batch: Batch, outcomes: list[Outcome]) -> None:
        """Send or settle each message of ``batch``, in receipt order (skips and duplicates are acked together at the
        end); the sends' finisher runs beside the walk."""
        # Bound per batch: looking up a member on its enum class (Result.SKIPPED) costs about 60 ns on Python 3.11.
        skipped, duplicate = Result.SKIPPED, Result.DUPLICATE
        # The table is asked directly: the Copies.of_flight coroutine only for an event in it (rare), not per event.
        in_flight, take_off, event_send = self.flights.get, self.flights.take_off, self._finisher.event_send
        sends: list[Send] = []
        acks: list[tuple[int, Result, str]] = []  # skips and duplicates: acked together once the batch is walked
        to_release: list[str] = []
        limit = self.output.max_payload - EVENT_HEADER_ROOM
        for index, planned in enumerate(outcomes):
            outcome = _vetted(planned, limit, to_release, self._publishable) if type(planned) in _EVENTS else planned
            match outcome:
                case Skip():
                    acks.append((index, skipped, outcome.table))
                case Duplicate():
                    acks.append((index, duplicate, outcome.table))
                case Publish():
                    if in_flight(outcome.event_id) is None or not await self._copies.of_flight(batch, index, outcome):
                        take_off(outcome)
                        sends.append(event_send(index, outcome))
                case ClaimedElsewhere():
                    self._metrics.copy_waits.labels("other_replica").inc()
                    if not await self._copies.of_flight(batch, index, outcome.event):
                        self._copies.claimed_elsewhere(batch, index, outcome.event)
                case DeadLetter():
                    await self._dead_letter(batch, index, outcome, sends)
                case Retry():
                    await self._finisher.nak(batch, index, outcome)
                case _:
                    assert_never(outcome)
        if to_release:
            self.flights.release(to_release)
        self.flights.count_unclaimed()
        if acks:
            await self.ledger.settle_all(batch, acks)
        if sends:
            await self.output.send_all(sends)
            self._spawned.spawn(self._finisher.finish(batch, sends))

    async def _dead_letter(self, batch: Batch, index: int, outcome: DeadLetter, sends: list[Send]) -> None:
        send = self._finisher.dead_letter_send(batch, index, outcome)
        if send is None:
            await self.ledger.settle(batch, index, Result.DEAD_LETTERED, outcome.table, reason=outcome.reason)
        else:
            sends.append(send)


_EVENTS = (Publish, ClaimedElsewhere)  # the outcomes that carry an event to vet before it is sent


def _vetted(planned: Outcome, limit: int, to_release: list[str], publishable: set[str]) -> Outcome:
    """``planned``, or a dead letter for an event the server would refuse on every attempt (poison, not an outage):
    larger than ``limit`` bytes, or with a subject that would close the connection. The claim of an event turned
    into a dead letter goes into ``to_release``: other copies need not wait for it to expire. ``publishable`` holds
    subjects already found fine (added to here)."""
    event = planned.event if isinstance(planned, ClaimedElsewhere) else planned
    if not isinstance(event, Publish):
        return planned
    if len(event.payload) > limit:
        dead = DeadLetter(
            event.table,
            Reason.PAYLOAD_TOO_LARGE,
            f"the event would be {len(event.payload)} bytes; the server accepts {limit}",
            event.event_id,
        )
    elif event.subject in publishable:
        return planned
    elif problem := publishable_subject_problem(event.subject):
        # A protocol line over the server's max_control_line closes the connection: never send one.
        dead = DeadLetter(event.table, Reason.INVALID_SUBJECT_TOKEN, f"the event subject {problem}", event.event_id)
    else:
        if len(publishable) >= PUBLISHABLE_SUBJECTS_KEPT:
            publishable.clear()
        publishable.add(event.subject)
        return planned
    if event.claimed:
        to_release.append(event.event_id)
    return dead
