"""Loop-thread side of the pipeline: micro-batching, ordered publishing, markers, acks, holding, draining.

The path of one batch::

    intake ──► buffer (≤ batch_size or batch_wait_ms) ──► pool: parse, route, build, Redis lookup ──► outcomes
      ──► publisher task (FIFO, so receipt order is wire order): ack skips and duplicates, send publishes
      ──► finisher task: wait for PubAcks (retry and hold on failure) ──► pool: Redis markers ──► ack / term

Only this thread touches NATS objects. The ack of a published event comes after its PubAck (at-least-once) and the
publish carries ``Nats-Msg-Id: <event_id>`` so a repeat inside JetStream's window is dropped (exactly-once effect).

Core NATS subscribers see every publish, including those the stream drops as repeats, so a copy of an event is not
published while the event is in flight: within this replica the in-flight table (``_flights``, loop thread only)
makes a later copy wait for the first copy's outcome; across replicas the Redis claim taken with the lookup does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay, wait_exponential_jitter
from tenacity.stop import stop_base

from cdc_service.config import Settings
from cdc_service.core.correlation import CORRELATION_HEADER_BYTES, REQUEST_ID, TRACEPARENT, request_id
from cdc_service.core.outcomes import (
    ClaimedElsewhere,
    DeadLetter,
    Duplicate,
    Outcome,
    Publish,
    Reason,
    Retry,
    Skip,
    TransientError,
    dead_letter_id,
    decide_failure,
    is_permanent_rejection,
)
from cdc_service.core.subjects import dead_letter_subject, printable_subject, publishable_subject_problem
from cdc_service.logs import bound
from cdc_service.metrics import OTHER_TABLE, Metrics
from cdc_service.ports import Claim, DedupStore, InboundMessage, PubAck, Publisher, delivery_count, source_position

log = logging.getLogger("cdc_service.engine")


@dataclass(eq=False)
class _Batch:
    messages: list[InboundMessage]
    received: float
    open: set[int]  # indexes not yet acked, nak'ed or terminated
    outcomes: asyncio.Future[list[Outcome]] = field(init=False)
    started: bool = False  # a worker has picked it up
    number: int = 0  # dispatch order, from 1
    nbytes: int = 0  # payload bytes of the messages still open (the in-flight memory bound counts these)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (table, result), counted when it closes


@dataclass(eq=False)
class _Send:
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


@dataclass(eq=False)
class _Flight:
    """An event this replica is publishing. Later copies wait on ``result``: True once the stream holds the event
    (ack them as duplicates), False when the attempt failed for good (then one of them publishes).

    A failed flight leaves the table at once. A published one stays until every batch that was looked up in Redis
    before its marker write ended has been walked (``marked_at``, a dispatch number): such a batch may have missed
    the marker, and only this entry tells it that its copy is a duplicate.
    """

    result: asyncio.Future[bool]
    claimed: bool = False  # this replica's Redis claim covers it: renewed while it is pending
    claimed_at: float = 0.0  # monotonic time the claim was taken or last renewed
    waiters: int = 0
    marked_at: int = 0  # batches dispatched when the marker write ended; 0 until then


_RECHECK_FIRST = 0.005  # a claim holder normally finishes (PubAck and marker) within a few ms
_RECHECK_MAX = 0.25

# Nats-Msg-Id, Nats-Expected-Stream and the correlation headers count against the server's max_payload.
_HEADER_ROOM = 512 + CORRELATION_HEADER_BYTES


class _StillFailing(Exception):
    pass


class stop_when(stop_base):  # noqa: N801 (named like tenacity's own stop conditions)
    """Stop retrying as soon as ``condition()`` is true (e.g. the service is shutting down)."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self._condition = condition

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._condition()


def _report_unexpected_end(task: asyncio.Task[None]) -> None:
    """These tasks run until drain cancels them; ending otherwise is a bug that the stall guard will act on."""
    if not task.cancelled() and task.exception() is not None:
        log.critical(
            "%s ended unexpectedly; liveness will fail once work is stuck", task.get_name(), exc_info=task.exception()
        )


def _about(msg: InboundMessage, event_id: str = "") -> dict[str, Any]:
    """Log fields that identify one message: its subject, source stream and sequence, and its event id when known."""
    stream, seq = source_position(msg.reply)
    fields: dict[str, Any] = {"subject": printable_subject(msg.subject)[0], "stream": stream, "stream_seq": seq}
    if event_id:
        fields["event_id"] = event_id
    return fields


def _header_bytes(headers: dict[str, str]) -> int:
    """Wire size of a NATS header block (``NATS/1.0``, ``name: value`` lines, the blank line)."""
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def _header_text(text: str, limit: int = 300) -> str:
    """Header values cannot carry line breaks or control characters."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


def dead_letter(
    settings: Settings,
    max_payload: int,
    *,
    source_subject: str,
    data: bytes,
    stream: str,
    seq: int,
    delivered: int,
    outcome: DeadLetter,
) -> tuple[str, bytes, dict[str, str]]:
    """Subject, body and headers of the dead letter of stream message ``seq``.

    ``Nats-Msg-Id: dlq:<stream>:<seq>`` makes every way of dead-lettering one message (the engine on its final
    delivery, any replica handling its max-deliveries advisory) land in the dead-letter stream once.
    """
    dlq = settings.dlq
    # A subject that is not UTF-8 arrives with its bad bytes as lone surrogates: the header gets it escaped.
    printable, escaped = printable_subject(source_subject)
    headers = {
        "Nats-Msg-Id": dead_letter_id(stream, seq),
        "Nats-Expected-Stream": dlq.stream,
        "Cdc-Error-Reason": outcome.reason.value,
        "Cdc-Error-Detail": _header_text(outcome.detail),
        "Cdc-Source-Subject": printable,
        "Cdc-Source-Stream": stream,
        "Cdc-Source-Seq": str(seq),
        "Cdc-Delivered": str(delivered),
    }
    if escaped:
        headers["Cdc-Source-Subject-Escaped"] = "true"
    room = max_payload - _header_bytes(headers) - 64
    if len(data) > room:
        # The server closes the connection on a message larger than max_payload, headers included. Keep what
        # fits; the whole original stays in the source stream at Cdc-Source-Seq.
        headers["Cdc-Body-Truncated"] = str(len(data))
        data = data[: max(0, room - 64)]
    # The source subject itself when it can be published, else a hashed stand-in: a subject near the server's
    # control-line limit, not UTF-8 or with a wildcard token must not close the connection or be refused.
    return dead_letter_subject(dlq.subject_prefix, source_subject), data, headers


class Engine:
    """Runs on the loop thread. ``on_message`` (push) or ``on_batch`` (pull) feed it; ``drain`` empties it."""

    def __init__(
        self,
        settings: Settings,
        prepare: Callable[[Sequence[InboundMessage]], list[Outcome]],
        dedup: DedupStore,
        publisher: Publisher,
        executor: Executor,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._prepare = prepare
        self._dedup = dedup
        self._publisher = publisher
        self._executor = executor
        self._metrics = metrics
        self._batch_size = settings.ingest.batch_size
        self._batch_wait = settings.ingest.batch_wait_ms / 1000.0
        self._max_deliver = settings.ingest.max_deliver
        self._output_stream = settings.publish.stream
        self._routed = frozenset(settings.routes)
        self._buffer: list[InboundMessage] = []
        self._buffer_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._queue: deque[_Batch] = deque()
        self._queued = asyncio.Event()
        self._open_batches: set[_Batch] = set()
        self._finishers: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._output_ok = asyncio.Event()
        self._output_ok.set()
        self._hold_lock = asyncio.Lock()
        self._holds = 0
        self._last_give_up = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._backpressure = True  # off once intake stops, so a draining subscription never waits for room
        self._stopping = False
        self._dispatched = 0
        self._flights: dict[str, _Flight] = {}
        self._marked_flights: deque[tuple[int, str, _Flight]] = deque()
        self._releases: set[asyncio.Future[None]] = set()
        self._dead_letters_held = 0  # messages whose dead letter waits for the dead-letter stream (no gate)
        self.inflight = 0
        self.inflight_bytes = 0
        self._max_inflight_bytes = settings.ingest.max_inflight_mb * 1024 * 1024
        self.last_received = time.monotonic()
        self.last_settled = time.monotonic()
        # Until the first ack, "the last ack" is the engine's start: no-acks alerts then measure from there.
        self._last_settled_wall = time.time()
        metrics.last_ack.set(self._last_settled_wall)
        self._counters: dict[tuple[str, str], Any] = {}
        self._timers: dict[str, Any] = {}
        self.totals: Counter[str] = Counter()
        self.lag: float | None = None  # seconds from source commit to PubAck of the latest published event

    # ------------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_in_order(), name="cdc-publisher"),
            asyncio.create_task(self._keep_alive(), name="cdc-keepalive"),
        ]
        if self._settings.dedup.claim_ttl > 0:
            self._tasks.append(asyncio.create_task(self._renew_claims(), name="cdc-claims"))
        for task in self._tasks:
            task.add_done_callback(_report_unexpected_end)

    def stalled(self, now: float | None = None) -> bool:
        """True when work is pending and nothing was acked or terminated for ``health.stall_timeout``.

        A hold is not a stall: the engine is waiting on an output it knows is failing, a restart would not help
        and would only spend delivery attempts; the publish-errors alert reports that state instead.
        """
        now = time.monotonic() if now is None else now
        waiting = self.inflight - self._dead_letters_held  # a held dead letter waits on its stream, like a hold
        return waiting > 0 and self._holds == 0 and now - self.last_settled > self._settings.health.stall_timeout

    def release_intake(self) -> None:
        """Stop back-pressure for good: intake is stopping and what it still hands over must not wait for room."""
        self._backpressure = False
        self._room.set()

    def _has_room(self) -> bool:
        return not self._backpressure or (
            self.inflight < self._settings.ingest.max_ack_pending and self.inflight_bytes < self._max_inflight_bytes
        )

    async def drain(self, deadline: float) -> None:
        """Finish everything received (intake must already be stopped) until ``deadline`` (monotonic).

        What is still retrying at the deadline is nak'ed without delay so another replica takes it at once.
        """
        self._flush()
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("drain deadline reached, handing back unfinished work", extra={"inflight": self.inflight})
        self._stopping = True
        self._output_ok.set()
        try:
            # Holds notice _stopping at their next attempt and nak what they hold; give them a moment.
            await asyncio.wait_for(self._idle.wait(), 0.5)
        except TimeoutError:
            pass
        for batch in list(self._open_batches):
            for index in list(batch.open):
                msg = batch.messages[index]
                if 0 < self._max_deliver <= delivery_count(msg.reply):
                    log.critical(
                        "handing back a message on its final delivery at shutdown; the server will not redeliver it",
                        extra={**_about(msg), "delivered": delivery_count(msg.reply)},
                    )
                await self._settle(batch, index, "nak", "", "retried")
        # Claims released by holds that gave up: let them reach Redis before the pool is shut down, so another
        # replica takes the nak'ed messages at once instead of after dedup.claim_ttl.
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=1.0)
        for task in [*self._tasks, *self._finishers]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._finishers, return_exceptions=True)

    # ------------------------------------------------------------------------------------------------ intake

    async def on_message(self, msg: Any) -> None:
        """Push-subscription callback: buffer the message; the batch goes out when full or after batch_wait_ms.

        Waits while ``ingest.max_inflight_mb`` is in flight: the server's ``max_ack_pending`` bounds push by count
        only. What arrives meanwhile waits in the subscription's own bounded queue (see ``PushIntake``).
        """
        buffer = self._buffer
        buffer.append(msg)
        if len(buffer) >= self._batch_size:
            self._flush()
        elif len(buffer) == 1:
            self._buffer_started = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self._batch_wait, self._flush)
        if self.inflight_bytes >= self._max_inflight_bytes and self._backpressure:
            self._flush()
            await self._wait_for_room()

    async def on_batch(self, messages: list[Any]) -> None:
        """Pull-loop callback: one fetched batch. Waits while too much is in flight, by count or by bytes (the pull
        back-pressure: nothing more is fetched, so nothing waits outside the engine)."""
        self._dispatch(messages, time.monotonic())
        await self._wait_for_room()

    async def _wait_for_room(self) -> None:
        while not self._has_room():
            self._room.clear()
            await self._room.wait()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            messages, self._buffer = self._buffer, []
            self._dispatch(messages, self._buffer_started or time.monotonic())
            self._buffer_started = 0.0

    def _dispatch(self, messages: list[InboundMessage], received: float) -> None:
        self._dispatched += 1
        nbytes = sum(len(m.data) for m in messages)
        batch = _Batch(messages, received, set(range(len(messages))), number=self._dispatched, nbytes=nbytes)
        self.inflight_bytes += batch.nbytes
        self.last_received = time.monotonic()
        batch.outcomes = asyncio.get_running_loop().run_in_executor(self._executor, self._prepare_batch, batch)
        self._open_batches.add(batch)
        self._queue.append(batch)
        self._queued.set()
        self.inflight += len(messages)
        self._idle.clear()
        self._metrics.inflight.set(self.inflight)
        self._metrics.batch_size.observe(len(messages))
        self._metrics.pool_queue.set(sum(1 for b in self._queue if not b.started))

    def _prepare_batch(self, batch: _Batch) -> list[Outcome]:
        batch.started = True  # a plain attribute write; the loop only reads it for the queue-depth gauge
        return self._prepare(batch.messages)

    # ------------------------------------------------------------------------------------------------ publishing

    async def _publish_in_order(self) -> None:
        """Take batches in receipt order and send their publishes; the waiting happens in per-batch finishers.

        Ordering: this task is the only one that sends a first publish of an event, and it walks batches and their
        messages in receipt order, so the wire order of events is receipt order, as before the in-flight table. A
        copy of an event in flight publishes nothing here: it waits beside the walk (``_follow``) and is acked as a
        duplicate when the first copy is stored. Only when that first copy failed for good does the copy publish,
        later than its receipt position; the failed copy is nak'ed and would come back out of order in any case, so
        no order that existed is lost. A copy whose claim another replica holds has no position here at all: its
        event is placed on the wire by that replica.
        """
        while True:
            if not self._queue:
                self._queued.clear()
                await self._queued.wait()
                continue
            batch = self._queue[0]
            try:
                outcomes = await batch.outcomes
            except Exception as exc:  # the worker itself failed: a bug; retry the whole batch later
                self._metrics.handler_errors.labels(type(exc).__name__).inc()
                log.exception("batch preparation failed", extra={"batch": len(batch.messages)})
                outcomes = [
                    decide_failure(exc, table="", num_delivered=delivery_count(m.reply), max_deliver=self._max_deliver)
                    for m in batch.messages
                ]
            # While the output is failing, later batches wait here so they do not overtake the held one.
            await self._output_ok.wait()
            self._queue.popleft()
            self._forget_flights(batch.number)
            sends: list[_Send] = []
            to_release: list[str] = []
            limit = self._publisher.max_payload - _HEADER_ROOM
            for index, planned in enumerate(outcomes):
                outcome = planned
                event = planned.event if isinstance(planned, ClaimedElsewhere) else planned
                if isinstance(event, Publish) and len(event.payload) > limit:
                    # The server would reject it on every attempt: this is poison, not an outage.
                    outcome = DeadLetter(
                        event.table,
                        Reason.PAYLOAD_TOO_LARGE,
                        f"the event would be {len(event.payload)} bytes; the server accepts {limit}",
                        event.event_id,
                    )
                    if event.claimed:
                        to_release.append(event.event_id)  # other copies need not wait for the claim to expire
                elif isinstance(event, Publish) and (problem := publishable_subject_problem(event.subject)):
                    # A protocol line over the server's max_control_line closes the connection: never send one.
                    outcome = DeadLetter(
                        event.table, Reason.INVALID_SUBJECT_TOKEN, f"the event subject {problem}", event.event_id
                    )
                    if event.claimed:
                        to_release.append(event.event_id)
                if isinstance(outcome, Skip):
                    await self._settle(batch, index, "ack", outcome.table, "skipped")
                elif isinstance(outcome, Duplicate):
                    await self._settle(batch, index, "ack", outcome.table, "duplicate")
                elif isinstance(outcome, Publish):
                    if await self._copy_of_flight(batch, index, outcome):
                        continue
                    self._take_off(outcome)
                    sends.append(
                        _Send(index, outcome.subject, outcome.payload, self._event_headers_for(outcome), outcome)
                    )
                elif isinstance(outcome, ClaimedElsewhere):
                    self._metrics.copy_waits.labels("other_replica").inc()
                    if not await self._copy_of_flight(batch, index, outcome.event):
                        self._spawn(self._claim_and_publish(batch, index, outcome.event, wait=True))
                elif isinstance(outcome, DeadLetter):
                    send = self._dead_letter_send(batch, index, outcome)
                    if send is None:
                        await self._settle(batch, index, "term", outcome.table, "dead_lettered", reason=outcome.reason)
                    else:
                        sends.append(send)
                else:
                    await self._nak(batch, index, outcome)
            if to_release:
                self._release(to_release)
            for send in sends:
                send.future = await self._send(send)
            if sends:
                self._spawn(self._finish(batch, sends))

    def _spawn(self, work: Any) -> None:
        """A task drain cancels (after handing back what it still holds)."""
        task = asyncio.create_task(work)
        self._finishers.add(task)
        task.add_done_callback(self._finishers.discard)

    # ------------------------------------------------------------------------------------------------ in flight

    def _take_off(self, event: Publish) -> _Flight:
        """Enter ``event`` in the in-flight table; the caller publishes it next, before awaiting anything else."""
        flight = _Flight(asyncio.get_running_loop().create_future(), event.claimed, time.monotonic())
        self._flights[event.event_id] = flight
        if not event.claimed:
            self._metrics.unclaimed_publishes.inc()
        return flight

    async def _copy_of_flight(self, batch: _Batch, index: int, event: Publish) -> bool:
        """If this replica is publishing ``event`` already, settle this copy after that outcome and return True.

        Decides without awaiting when it returns False, so a caller may enter the event in the table right after.
        """
        flight = self._flights.get(event.event_id)
        if flight is None:
            return False
        self._metrics.copy_waits.labels("this_replica").inc()
        if flight.result.done():  # in the table and done means stored: failed flights leave at once
            await self._settle(batch, index, "ack", event.table, "duplicate")
        else:
            flight.waiters += 1
            self._spawn(self._follow(batch, index, event, flight))
        return True

    async def _follow(self, batch: _Batch, index: int, event: Publish, flight: _Flight) -> None:
        """A copy of an event in flight here: a duplicate once the first copy is stored, else published itself."""
        try:
            stored = await flight.result
        finally:
            flight.waiters -= 1
        if stored:
            await self._settle(batch, index, "ack", event.table, "duplicate")
        else:
            await self._claim_and_publish(batch, index, event, wait=False)

    async def _claim_and_publish(self, batch: _Batch, index: int, event: Publish, *, wait: bool) -> None:
        """Publish a copy outside the receipt-order walk, once it holds the claim: a copy whose first copy failed
        here, or one whose claim another replica holds (``wait``: look again after a growing pause). Never drops
        it: the claim ends as a marker (ack as a duplicate), is released, or expires; at shutdown the copy is
        handed back."""
        loop = asyncio.get_running_loop()
        delay = _RECHECK_FIRST
        while index in batch.open:
            if wait:
                await asyncio.sleep(delay)  # the other replica's publish is under way; it usually ends in ms
                delay = min(delay * 2, _RECHECK_MAX)
            wait = True
            if self._stopping:
                await self._settle(batch, index, "nak", event.table, "retried")
                return
            if await self._copy_of_flight(batch, index, event):
                return
            states = await loop.run_in_executor(self._executor, self._dedup.claim, [event.event_id])
            if index not in batch.open:
                return
            state = None if states is None else states[0]
            if state is Claim.DONE:
                await self._settle(batch, index, "ack", event.table, "duplicate")
                return
            if state is Claim.HELD:
                continue
            event.claimed = state is Claim.CLAIMED  # None: Redis unavailable, publish unclaimed (fail open)
            await self._output_ok.wait()  # behind a hold, like every batch
            if self._stopping or index not in batch.open:
                continue
            if await self._copy_of_flight(batch, index, event):
                return
            self._take_off(event)
            send = _Send(index, event.subject, event.payload, self._event_headers_for(event), event)
            send.future = await self._send(send)
            self._spawn(self._finish(batch, [send]))
            return

    def _land(self, sends: list[_Send], stored: bool) -> None:
        """Tell the copies waiting on these publishes how they ended; a failed claim is released for other
        replicas unless a copy here takes it over (the claim is this replica's, not the message's)."""
        release = []
        for send in sends:
            event = send.outcome
            if not isinstance(event, Publish):
                continue
            flight = self._flights.get(event.event_id)
            if flight is None or flight.result.done():
                continue
            flight.result.set_result(stored)
            if not stored:
                del self._flights[event.event_id]
                if event.claimed and flight.waiters == 0:
                    release.append(event.event_id)
        if release:
            queued = self._queued_ids()
            release = [event_id for event_id in release if event_id not in queued]
        if release:
            self._release(release)

    def _queued_ids(self) -> set[str]:
        """Events of prepared batches not yet walked (behind a hold): a copy there may hold our claim already."""
        ids: set[str] = set()
        for batch in self._queue:
            if batch.outcomes.done() and not batch.outcomes.cancelled() and batch.outcomes.exception() is None:
                ids.update(o.event_id for o in batch.outcomes.result() if isinstance(o, Publish) and o.claimed)
        return ids

    def _marked(self, event_ids: list[str]) -> None:
        """The marker write of these published events ended (either way): batches dispatched from now on look
        them up after it, so the table keeps them only until the walk passes today's dispatch number."""
        for event_id in event_ids:
            flight = self._flights.get(event_id)
            if flight is not None and flight.marked_at == 0:
                flight.marked_at = self._dispatched
                self._marked_flights.append((self._dispatched, event_id, flight))

    def _forget_flights(self, number: int) -> None:
        marked = self._marked_flights
        while marked and marked[0][0] < number:
            _, event_id, flight = marked.popleft()
            if self._flights.get(event_id) is flight:
                del self._flights[event_id]

    def _release(self, event_ids: list[str]) -> None:
        # Not awaited (drain waits for what is left): release never raises, and a claim left behind only expires.
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._dedup.release, event_ids)
        self._releases.add(future)
        future.add_done_callback(self._releases.discard)

    async def _renew_claims(self) -> None:
        """Keep the claims of events still in flight (a slow PubAck, a hold) from expiring under them, so a copy at
        another replica keeps waiting instead of publishing too. Renewing is the lookup-and-claim call itself: our
        own claim gets its TTL back; one that expired is taken again unless someone else has it by now."""
        ttl = self._settings.dedup.claim_ttl
        period = ttl / 3.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            due = time.monotonic() - period
            renew = []
            for event_id, flight in self._flights.items():
                if flight.claimed and not flight.result.done() and flight.claimed_at < due:
                    flight.claimed_at = time.monotonic()
                    renew.append(event_id)
            if renew:
                await loop.run_in_executor(self._executor, self._dedup.claim, renew)

    async def _send(self, send: _Send) -> asyncio.Future[PubAck]:
        if type(send.outcome) is DeadLetter:
            # Its PubAck is read in full: the dead-letter sequence goes into the `dead letter stored` line.
            return await self._publisher.publish(send.subject, send.payload, send.headers, detailed=True)
        return await self._publisher.publish(send.subject, send.payload, send.headers)

    def _event_headers_for(self, event: Publish) -> dict[str, str]:
        # Nats-Expected-Stream makes JetStream refuse the event if another stream captured the subject.
        headers = {
            "Nats-Msg-Id": event.event_id,
            "Nats-Expected-Stream": self._output_stream,
            REQUEST_ID: event.request_id or request_id(event.event_id),
        }
        if event.traceparent:
            headers[TRACEPARENT] = event.traceparent
        return headers

    def _dead_letter_send(self, batch: _Batch, index: int, outcome: DeadLetter) -> _Send | None:
        msg = batch.messages[index]
        metadata = msg.metadata
        seq = metadata.sequence.stream
        with bound(**_about(msg, outcome.event_id), table=outcome.table, reason=outcome.reason.value):
            log.warning("dead-lettering message", extra={"detail": outcome.detail, "delivered": metadata.num_delivered})
        if not self._settings.dlq.enabled:
            return None
        subject, data, headers = dead_letter(
            self._settings,
            self._publisher.max_payload,
            source_subject=msg.subject,
            data=msg.data,
            stream=metadata.stream,
            seq=seq,
            delivered=metadata.num_delivered,
            outcome=outcome,
        )
        return _Send(index, subject, data, headers, outcome)

    async def _finish(self, batch: _Batch, sends: list[_Send]) -> None:
        try:
            failed = await self._await_acks(sends)
            # Dead letters wait for their stream outside the output gate (they need no order with events), and an
            # event the output refuses for good is dead-lettered at once: neither may stop the valid traffic.
            for send in [s for s in failed if isinstance(s.outcome, DeadLetter)]:
                self._spawn(self._hold_dead_letter(batch, send))
            failed = [s for s in failed if isinstance(s.outcome, Publish)]
            refused = [s for s in failed if is_permanent_rejection(s.exc or TransientError(s.error))]
            failed = [s for s in failed if s not in refused]
            if failed:
                failed = await self._hold(failed)
            self._land(refused + failed, stored=False)
            for send in refused + failed:
                await self._give_up_send(batch, send)
            published = [s for s in sends if s.future is not None and not s.error]
            self._land(published, stored=True)
            events = [s.outcome for s in published if isinstance(s.outcome, Publish)]
            await self._mark([e.event_id for e in events], [e.routing for e in events if e.routing is not None])
            wall = time.time()
            for send in published:
                outcome = send.outcome
                if isinstance(outcome, Publish):
                    if outcome.commit_time is not None:
                        self.lag = max(0.0, wall - outcome.commit_time)
                        self._metrics.lag.observe(self.lag)
                    result = "duplicate" if send.duplicate else "published"
                    await self._settle(batch, send.index, "ack", outcome.table, result)
                else:
                    self._log_dead_letter_stored(batch.messages[send.index], send)
                    await self._settle(batch, send.index, "term", outcome.table, "dead_lettered", reason=outcome.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in our own bookkeeping: hand the work back rather than lose track of it
            self._metrics.handler_errors.labels(type(exc).__name__).inc()
            log.exception("finishing a batch failed; nak'ing what is left")
            self._land(sends, stored=False)
            self._marked([s.outcome.event_id for s in sends if isinstance(s.outcome, Publish)])
            for send in sends:
                await self._settle(batch, send.index, "nak", "", "retried", delay=5.0)

    def _log_dead_letter_stored(self, msg: InboundMessage, send: _Send) -> None:
        """The one line that ties the source position, the event id and the dead-letter sequence together."""
        assert isinstance(send.outcome, DeadLetter) and send.future is not None
        ack = send.future.result()
        with bound(**_about(msg, send.outcome.event_id), table=send.outcome.table, reason=send.outcome.reason.value):
            log.info("dead letter stored", extra={"dlq_stream": ack.stream, "dlq_seq": ack.seq})

    async def _await_acks(self, sends: list[_Send]) -> list[_Send]:
        """Wait (bounded) for every PubAck; return the sends that failed or got no answer."""
        futures = [s.future for s in sends if s.future is not None]
        if futures:
            await asyncio.wait(futures, timeout=self._settings.publish.timeout)
        failed: list[_Send] = []
        for send in sends:
            future = send.future
            if future is None or not future.done():
                if future is not None:
                    future.cancel()
                send.error = "no PubAck within publish.timeout"
                send.exc = None
            elif future.exception() is not None:
                send.exc = future.exception()
                send.error = str(send.exc)
            else:
                send.error = ""
                send.exc = None
                send.duplicate = future.result().duplicate
                continue
            failed.append(send)
        if failed:
            self._metrics.publish_errors.inc(len(failed))
        return failed

    async def _hold(self, failed: list[_Send]) -> list[_Send]:
        """Retry failed publishes with backoff while keeping their messages alive (``in_progress``).

        Holds run one at a time, in the order the failures were seen, and no new batch is sent while any is
        pending: so once the output recovers, held events still reach it in the order they were received.
        Retries reuse each event's ``Nats-Msg-Id``, so a publish whose PubAck was merely lost is not stored twice.
        Returns what still fails after ``publish.max_hold`` or at shutdown; a hold that was queued behind one that
        gave up returns at once instead of starting a new clock against an output that is still down.
        """
        publish = self._settings.publish
        self._holds += 1
        self._output_ok.clear()
        queued_at = time.monotonic()
        try:
            async with self._hold_lock:
                if self._stopping or self._last_give_up > queued_at:
                    return failed
                first = failed[0].outcome
                log.warning(
                    "publish failed, holding and retrying",
                    extra={
                        "count": len(failed),
                        "error": failed[0].error[:300],
                        "max_hold": publish.max_hold,
                        "first_event_id": first.event_id or None,
                    },
                )
                remaining = failed
                refused: list[_Send] = []
                try:
                    async for attempt in AsyncRetrying(
                        stop=stop_after_delay(publish.max_hold) | stop_when(lambda: self._stopping),
                        wait=wait_exponential_jitter(
                            multiplier=publish.retry_initial, max=publish.retry_max, jitter=publish.retry_initial
                        ),
                        retry=retry_if_exception_type(_StillFailing),
                        reraise=True,
                    ):
                        with attempt:
                            for send in remaining:
                                send.future = await self._send(send)
                            remaining = await self._await_acks(remaining)
                            # A permanent refusal leaves the hold at once: waiting cannot fix it.
                            refused.extend(s for s in remaining if s.exc is not None and is_permanent_rejection(s.exc))
                            remaining = [s for s in remaining if s not in refused]
                            if remaining:
                                raise _StillFailing()
                except _StillFailing:
                    self._last_give_up = time.monotonic()
                    log.warning("giving up the hold; nak'ing with a delay", extra={"count": len(remaining)})
                else:
                    log.info("publishing works again", extra={"count": len(failed)})
                return refused + remaining
        finally:
            self._holds -= 1
            if self._holds == 0:
                self._output_ok.set()

    async def _give_up_send(self, batch: _Batch, send: _Send) -> None:
        """A publish still fails after its hold, or was refused for good: ``decide_failure`` says whether to nak it
        or dead-letter it (a permanent refusal, or the final delivery)."""
        msg = batch.messages[send.index]
        outcome = decide_failure(
            send.exc or TransientError(send.error),
            table=send.outcome.table,
            num_delivered=delivery_count(msg.reply),
            max_deliver=self._max_deliver,
        )
        if isinstance(outcome, Retry):
            await self._nak(batch, send.index, outcome)
            return
        if isinstance(send.outcome, DeadLetter):
            outcome = send.outcome  # the dead-letter stream itself failed: keep the original reason
        assert isinstance(outcome, DeadLetter)
        if not outcome.event_id and send.outcome.event_id:
            outcome = replace(outcome, event_id=send.outcome.event_id)
        await self._dead_letter_final(batch, send.index, outcome)

    async def _nak(self, batch: _Batch, index: int, outcome: Retry) -> None:
        delay = 0.0 if self._stopping else outcome.delay  # at shutdown another replica should take it at once
        await self._settle(batch, index, "nak", outcome.table, "retried", delay=delay)

    async def _dead_letter_final(self, batch: _Batch, index: int, outcome: DeadLetter) -> None:
        """Dead-letter a message (a permanent refusal, or its final delivery attempt) and terminate it once the
        dead-letter stream has it; while that stream fails, hold it there (``_hold_dead_letter``)."""
        send = self._dead_letter_send(batch, index, outcome)
        if send is None:
            await self._settle(batch, index, "term", outcome.table, "dead_lettered", reason=outcome.reason)
            return
        send.future = await self._send(send)
        if await self._await_acks([send]):
            await self._hold_dead_letter(batch, send)
        else:
            await self._settle(batch, index, "term", outcome.table, "dead_lettered", reason=outcome.reason)

    async def _hold_dead_letter(self, batch: _Batch, send: _Send) -> None:
        """Retry one dead letter with backoff until its stream takes it, then terminate the message.

        Runs beside the output gate, not through it: while the dead-letter stream is full or missing, events keep
        flowing and only this message waits (kept alive by ``_keep_alive``, so it spends no delivery attempt). It is
        handed back only at shutdown; if that was its final delivery, the max-deliveries advisory brings it back.
        """
        publish = self._settings.publish
        outcome = send.outcome
        assert isinstance(outcome, DeadLetter)
        self._dead_letters_held += 1
        delay = publish.retry_initial
        log.warning(
            "dead-letter stream refuses the dead letter; holding it while events keep flowing",
            extra={"error": send.error[:300], "reason": outcome.reason.value},
        )
        try:
            while send.error and not self._stopping:
                await asyncio.sleep(delay)  # back-off between attempts against a failing stream
                delay = min(publish.retry_max, delay * 2)
                send.future = await self._send(send)
                await self._await_acks([send])
        finally:
            self._dead_letters_held -= 1
        if send.error:
            msg = batch.messages[send.index]
            if 0 < self._max_deliver <= delivery_count(msg.reply):
                log.critical(
                    "could not dead-letter a message on its final delivery; its max-deliveries advisory will",
                    extra={**_about(msg, outcome.event_id), "reason": outcome.reason.value},
                )
            await self._settle(batch, send.index, "nak", outcome.table, "retried")
            return
        log.info("dead-letter stream took the held dead letter", extra={"reason": outcome.reason.value})
        await self._settle(batch, send.index, "term", outcome.table, "dead_lettered", reason=outcome.reason)

    async def _mark(self, event_ids: list[str], routing: list[tuple[str, str]] | None = None) -> None:
        """Write the dedup markers (after the PubAcks), waiting at most ``dedup.mark_timeout`` before acking anyway;
        and the routing cache entries of the published rows (routes with ``routing_cache``).

        The in-flight table learns when the write really ended (``_marked``), also when that is after the timeout.
        """
        if not event_ids:
            return
        write = asyncio.get_running_loop().run_in_executor(
            self._executor, self._write_markers, event_ids, routing or []
        )
        write.add_done_callback(lambda _: self._marked(event_ids))
        done, _ = await asyncio.wait({write}, timeout=self._settings.dedup.mark_timeout)
        if not (done and write.result()):
            self._metrics.dedup_mark_errors.inc(len(event_ids))

    def _write_markers(self, event_ids: list[str], routing: list[tuple[str, str]]) -> bool:
        # A lost routing entry only means a later delete of that row is dead-lettered (replayable): best effort.
        if routing:
            self._dedup.remember_routes(routing)
        return self._dedup.mark(event_ids)

    # ------------------------------------------------------------------------------------------------ settling

    async def _settle(
        self,
        batch: _Batch,
        index: int,
        action: str,
        table: str,
        result: str,
        *,
        delay: float = 0.0,
        reason: Reason | None = None,
    ) -> None:
        """Ack, nak or terminate one message exactly once and count it under ``result``."""
        if index not in batch.open:
            return
        batch.open.discard(index)
        if table not in self._routed:
            table = OTHER_TABLE  # a metric label: unrouted table names come from input, so they share one
        msg = batch.messages[index]
        size = len(msg.data)
        batch.nbytes -= size
        self.inflight_bytes -= size
        try:
            if action == "ack":
                await msg.ack()
            elif action == "term":
                await msg.term()
            else:
                await msg.nak(delay=delay or None)
        except Exception as exc:  # connection lost: the server redelivers after AckWait, nothing is lost
            log.debug("could not %s message", action, extra={"error": str(exc)[:200], **_about(msg)})
        now = time.monotonic()
        if action != "nak":
            self.last_settled = now
            self._last_settled_wall = time.time()
        batch.counts[(table, result)] += 1
        if result in ("published", "duplicate", "skipped"):
            timed = self._timers.get(table)
            if timed is None:
                timed = self._timers[table] = self._metrics.processing.labels(table)
            timed.observe(now - batch.received)
        if reason is not None:
            self._metrics.dead_letters.labels(reason.value).inc()
        self.inflight -= 1
        if batch.open:
            return
        # Per batch, not per message: counters, gauges and wake-ups are cheap, but thousands a second are not.
        self._open_batches.discard(batch)
        for (table_name, result_name), n in batch.counts.items():
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
            self._idle.set()
        if self._has_room():
            self._room.set()

    async def _keep_alive(self) -> None:
        """Extend AckWait (``in_progress``) for messages held longer than a third of it, so holding does not burn
        delivery attempts; and forget abandoned publish futures."""
        period = max(0.05, min(5.0, self._settings.ingest.ack_wait / 3.0))
        while True:
            await asyncio.sleep(period)
            self._publisher.sweep()
            self._metrics.pool_queue.set(sum(1 for b in self._queue if not b.started))
            cutoff = time.monotonic() - period
            for batch in list(self._open_batches):
                if batch.received < cutoff:
                    for index in list(batch.open):
                        try:
                            await batch.messages[index].in_progress()
                        except Exception:
                            pass
