"""Finishing a batch's publishes: PubAcks, holds and give-ups, Redis markers, then each message's ``Result``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import replace
from typing import assert_never

from cdc_service.config import Settings
from cdc_service.core.correlation import REQUEST_ID, TRACEPARENT, request_id
from cdc_service.core.dead_letters import build_dead_letter
from cdc_service.core.outcomes import (
    DeadLetter,
    Publish,
    Result,
    Retry,
    TransientError,
    decide_failure,
    is_permanent_rejection,
)
from cdc_service.logs import bound
from cdc_service.metrics import Metrics, observe_all
from cdc_service.pipeline.clock import Clock
from cdc_service.pipeline.common import Batch, Send, Tasks, about
from cdc_service.pipeline.flights import FlightTable
from cdc_service.pipeline.ledger import SettleLedger
from cdc_service.pipeline.output import Output
from cdc_service.ports import DedupStore, InboundMessage, delivery_count

log = logging.getLogger("cdc_service.engine")


def events_of(sends: Iterable[Send]) -> list[Publish]:
    return [s.outcome for s in sends if isinstance(s.outcome, Publish)]


class Finisher:
    """Turns sent publishes into settled messages. A publish that fails is held (``Output.hold``), then nak'ed or
    dead-lettered (``decide_failure``); a stored event gets its Redis marker before its ack (at-least-once)."""

    def __init__(
        self,
        settings: Settings,
        ledger: SettleLedger,
        output: Output,
        flights: FlightTable,
        dedup: DedupStore,
        executor: Executor,
        metrics: Metrics,
        clock: Clock,
        tasks: Tasks,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._output = output
        self._flights = flights
        self._dedup = dedup
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._tasks = tasks
        self._max_deliver = settings.ingest.max_deliver
        self._output_stream = settings.publish.stream
        self.lag: float | None = None  # seconds from source commit to PubAck of the latest published event

    # ------------------------------------------------------------------------------------------- building sends

    def event_send(self, index: int, event: Publish) -> Send:
        # Nats-Expected-Stream makes JetStream refuse the event if another stream captured the subject.
        headers = {
            "Nats-Msg-Id": event.event_id,
            "Nats-Expected-Stream": self._output_stream,
            REQUEST_ID: event.request_id or request_id(event.event_id),
        }
        if event.traceparent:
            headers[TRACEPARENT] = event.traceparent
        return Send(index, event.subject, event.payload, headers, event)

    def dead_letter_send(self, batch: Batch, index: int, outcome: DeadLetter) -> Send | None:
        """The dead letter of message ``index`` (logged here), or None when the dead-letter stream is disabled."""
        msg = batch.messages[index]
        metadata = msg.metadata
        with bound(**about(msg, outcome.event_id), table=outcome.table, reason=outcome.reason.value):
            log.warning("dead-lettering message", extra={"detail": outcome.detail, "delivered": metadata.num_delivered})
        dlq = self._settings.dlq
        if not dlq.enabled:
            return None
        dead = build_dead_letter(
            subject_prefix=dlq.subject_prefix,
            dlq_stream=dlq.stream,
            max_payload=self._output.max_payload,
            source_subject=msg.subject,
            data=msg.data,
            stream=metadata.stream,
            seq=metadata.sequence.stream,
            delivered=metadata.num_delivered,
            reason=outcome.reason.value,
            detail=outcome.detail,
        )
        return Send(index, dead.subject, dead.data, dead.headers, outcome)

    # ------------------------------------------------------------------------------------------- finishing

    async def finish(self, batch: Batch, sends: list[Send]) -> None:
        """Wait for the PubAcks of ``sends`` (already on the wire) and settle each of their messages."""
        try:
            await self._retry_failures(batch, await self._output.await_acks(sends))
            published = [s for s in sends if s.future is not None and not s.error]
            events = events_of(published)
            self._flights.land(events, stored=True)
            await self._mark([e.event_id for e in events], [e.routing for e in events if e.routing is not None])
            await self._settle_published(batch, published)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in our own bookkeeping: hand the work back rather than lose track of it
            self._metrics.handler_errors.labels(type(exc).__name__).inc()
            log.exception("finishing a batch failed; nak'ing what is left")
            self._flights.land(events_of(sends), stored=False)
            self._flights.marked([e.event_id for e in events_of(sends)])
            for send in sends:
                await self._ledger.settle(batch, send.index, Result.RETRIED, "", delay=5.0)

    async def _retry_failures(self, batch: Batch, failed: list[Send]) -> None:
        # Dead letters wait for their stream outside the output gate (they need no order with events), and an
        # event the output refuses for good is dead-lettered at once: neither may stop the valid traffic.
        for send in [s for s in failed if isinstance(s.outcome, DeadLetter)]:
            self._tasks.spawn(self._hold_dead_letter(batch, send))
        failed = [s for s in failed if isinstance(s.outcome, Publish)]
        refused = [s for s in failed if is_permanent_rejection(s.exc or TransientError(s.error))]
        failed = [s for s in failed if s not in refused]
        if failed:
            failed = await self._output.hold(failed)
        self._flights.land(events_of(refused + failed), stored=False)
        for send in refused + failed:
            await self._give_up(batch, send)

    async def _settle_published(self, batch: Batch, published: list[Send]) -> None:
        wall = self._clock.time()
        stored, repeated = Result.PUBLISHED, Result.DUPLICATE  # bound per batch: an enum class lookup is slow
        acks: list[tuple[int, Result, str]] = []
        lags: list[float] = []
        dead_letters: list[Send] = []
        for send in published:
            event = send.outcome
            if type(event) is Publish:
                if event.commit_time is not None:
                    lags.append(max(0.0, wall - event.commit_time))
                acks.append((send.index, repeated if send.duplicate else stored, event.table))
            else:
                dead_letters.append(send)
        if lags:
            self.lag = lags[-1]
            observe_all(self._metrics.lag, lags)
        await self._ledger.settle_all(batch, acks)
        for send in dead_letters:
            dead = send.outcome
            assert isinstance(dead, DeadLetter)
            self._log_dead_letter_stored(batch.messages[send.index], send, dead)
            await self._ledger.settle(batch, send.index, Result.DEAD_LETTERED, dead.table, reason=dead.reason)

    def _log_dead_letter_stored(self, msg: InboundMessage, send: Send, dead: DeadLetter) -> None:
        """The one line that ties the source position, the event id and the dead-letter sequence together."""
        assert send.future is not None
        ack = send.future.result()
        with bound(**about(msg, dead.event_id), table=dead.table, reason=dead.reason.value):
            log.info("dead letter stored", extra={"dlq_stream": ack.stream, "dlq_seq": ack.seq})

    # ------------------------------------------------------------------------------------------- giving up

    async def _give_up(self, batch: Batch, send: Send) -> None:
        """A publish still fails after its hold, or was refused for good: ``decide_failure`` says whether to nak it
        or dead-letter it (a permanent refusal, or the final delivery)."""
        msg = batch.messages[send.index]
        decided = decide_failure(
            send.exc or TransientError(send.error),
            table=send.outcome.table,
            num_delivered=delivery_count(msg.reply),
            max_deliver=self._max_deliver,
        )
        match decided:
            case Retry():
                await self.nak(batch, send.index, decided)
            case DeadLetter():
                if isinstance(send.outcome, DeadLetter):
                    decided = send.outcome  # the dead-letter stream itself failed: keep the original reason
                if not decided.event_id and send.outcome.event_id:
                    decided = replace(decided, event_id=send.outcome.event_id)
                await self.dead_letter_final(batch, send.index, decided)
            case _:
                assert_never(decided)

    async def nak(self, batch: Batch, index: int, outcome: Retry) -> None:
        delay = 0.0 if self._output.stopping else outcome.delay  # at shutdown another replica should take it at once
        await self._ledger.settle(batch, index, Result.RETRIED, outcome.table, delay=delay)

    async def dead_letter_final(self, batch: Batch, index: int, outcome: DeadLetter) -> None:
        """Dead-letter a message (a permanent refusal, or its final delivery attempt) and terminate it once the
        dead-letter stream has it; while that stream fails, hold it there (``_hold_dead_letter``)."""
        send = self.dead_letter_send(batch, index, outcome)
        if send is None:
            await self._ledger.settle(batch, index, Result.DEAD_LETTERED, outcome.table, reason=outcome.reason)
            return
        await self._output.send(send)
        if await self._output.await_acks([send]):
            await self._hold_dead_letter(batch, send)
        else:
            await self._ledger.settle(batch, index, Result.DEAD_LETTERED, outcome.table, reason=outcome.reason)

    async def _hold_dead_letter(self, batch: Batch, send: Send) -> None:
        """Hold one dead letter until its stream takes it, then terminate the message. It is handed back only at
        shutdown; if that was its final delivery, the max-deliveries advisory brings it back."""
        outcome = send.outcome
        assert isinstance(outcome, DeadLetter)
        log.warning(
            "dead-letter stream refuses the dead letter; holding it while events keep flowing",
            extra={"error": send.error[:300], "reason": outcome.reason.value},
        )
        if not await self._output.hold_dead_letter(send):
            msg = batch.messages[send.index]
            if 0 < self._max_deliver <= delivery_count(msg.reply):
                log.critical(
                    "could not dead-letter a message on its final delivery; its max-deliveries advisory will",
                    extra={**about(msg, outcome.event_id), "reason": outcome.reason.value},
                )
            await self._ledger.settle(batch, send.index, Result.RETRIED, outcome.table)
            return
        log.info("dead-letter stream took the held dead letter", extra={"reason": outcome.reason.value})
        await self._ledger.settle(batch, send.index, Result.DEAD_LETTERED, outcome.table, reason=outcome.reason)

    # ------------------------------------------------------------------------------------------- markers

    async def _mark(self, event_ids: list[str], routing: list[tuple[str, str]] | None = None) -> None:
        """Write the dedup markers (after the PubAcks), waiting at most ``dedup.mark_timeout`` before acking anyway;
        and the routing cache entries of the published rows (routes with ``routing_cache``).

        The in-flight table learns when the write really ended (``marked``), also when that is after the timeout.
        """
        if not event_ids:
            return
        write = asyncio.get_running_loop().run_in_executor(
            self._executor, self._write_markers, event_ids, routing or []
        )
        write.add_done_callback(lambda _: self._flights.marked(event_ids))
        done, _ = await asyncio.wait({write}, timeout=self._settings.dedup.mark_timeout)
        if not (done and write.result()):
            self._metrics.dedup_mark_errors.inc(len(event_ids))

    def _write_markers(self, event_ids: list[str], routing: list[tuple[str, str]]) -> bool:
        # A lost routing entry only means a later delete of that row is dead-lettered (replayable): best effort.
        if routing:
            self._dedup.remember_routes(routing)
        return self._dedup.mark(event_ids)
