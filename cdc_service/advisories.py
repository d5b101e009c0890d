"""Max-deliveries advisories: no message is left behind when its deliveries run out out of this service's sight.

A message whose every delivery went to a replica that could not finish it (frozen, OOM-killed, killed while holding
``max_ack_pending`` messages) reaches ``ingest.max_deliver`` without the service seeing the final attempt. JetStream
then stops delivering it, the ack floor moves past it, and its only trace is the advisory
``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<durable>`` (JSON with ``stream_seq`` and ``deliveries``).
In partitioned mode each partition's durable has its own (``<durable>_p<i>`` on the partitioned stream); the message
is then read from the partitioned stream and dead-lettered under its original subject, with the partitioned stream's
name and sequence, as the engine does for a final delivery it sees.

``dlq.advisory_stream`` captures those advisories, so none is missed while no replica is running (a core
subscription would be), and a shared pull durable hands each to one replica. That replica reads the message from
the input stream by sequence and dead-letters it with reason ``max_deliveries`` (a poison message keeps its own
reason). It is idempotent across replicas and redeliveries: the dead letter carries ``Nats-Msg-Id:
dlq:<stream>:<seq>`` (the same id the engine uses on a final delivery) and a Redis marker of that id is checked
first, for repeats beyond the dead-letter stream's duplicate window. An event whose Redis marker says it was
published, or whose table has no route, is not dead-lettered.

Dead letters here never go through the engine's output gate: a failing dead-letter stream naks the advisory with a
delay (the advisory durable has no delivery limit) and events keep flowing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cdc_service.adapters.nats_jetstream import advisory_durable
from cdc_service.config import Settings
from cdc_service.core.dead_letters import build_dead_letter
from cdc_service.core.outcomes import (
    ClaimedElsewhere,
    DeadLetter,
    Duplicate,
    Outcome,
    Publish,
    Reason,
    Retry,
    Skip,
    dead_letter_id,
)
from cdc_service.core.partitions import original_subject
from cdc_service.logs import bound
from cdc_service.metrics import Metrics
from cdc_service.ports import DedupStore, Publisher

log = logging.getLogger("cdc_service.advisories")

_FETCH = 64
_RETRY_DELAY = 2.0


@dataclass(frozen=True, slots=True)
class _Sequence:
    stream: int
    consumer: int


@dataclass(frozen=True, slots=True)
class _Metadata:
    stream: str
    sequence: _Sequence
    num_delivered: int


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message read back from the input stream, shaped like a delivery for the batch preparer (never acked): it
    has every attribute of ``ports.InboundMessage`` the preparer reads (a missing one made the preparer fail on each
    advisory, so the published-marker lookup never ran)."""

    subject: str
    data: bytes
    metadata: _Metadata
    headers: Mapping[str, str] | None = None
    reply: str = ""


class MaxDeliveriesWatcher:
    """Fetches advisories from ``dlq.advisory_stream`` and dead-letters the messages they name. Loop thread only."""

    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        prepare: Callable[[Sequence[Any]], list[Outcome]],
        dedup: DedupStore,
        publisher: Publisher,
        executor: Executor,
        metrics: Metrics,
    ) -> None:
        self._js = js
        self._settings = settings
        self._prepare = prepare
        self._dedup = dedup
        self._publisher = publisher
        self._executor = executor
        self._metrics = metrics
        self._psub: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        durable = advisory_durable(self._settings.ingest.durable)
        self._psub = await self._js.pull_subscribe_bind(durable, stream=self._settings.dlq.advisory_stream)
        self._task = asyncio.create_task(self._loop(), name="cdc-max-deliveries")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._psub is not None:
            try:
                await self._psub.unsubscribe()
            except Exception:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                msgs = await self._psub.fetch(_FETCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected, durable gone: ask again shortly
                log.debug("advisory fetch failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                await asyncio.sleep(1.0)  # back-off before the next fetch
                continue
            # One fetched batch at a time, its advisories concurrently: each is a few round trips (read the
            # message, publish, PubAck), and an OOM loop can leave thousands. Each names another sequence.
            await asyncio.gather(*(self._settle(msg) for msg in msgs))

    async def _settle(self, msg: Any) -> None:
        wait = self._too_early(msg)
        if wait > 0:
            await self._nak(msg, wait)
            return
        try:
            result = await self.handle(msg.data)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or a lost connection: the advisory comes back after the delay
            log.exception("handling a max-deliveries advisory failed")
            result = "retried"
        self._metrics.max_delivery_advisories.labels(result).inc()
        if result == "retried":
            await self._nak(msg, _RETRY_DELAY)
            return
        try:
            await msg.ack()
        except Exception:  # the connection is gone: the advisory is redelivered after its AckWait
            pass

    def _too_early(self, msg: Any) -> float:
        """Seconds until the advisory may be acted on.

        The server gives up on a message when its final delivery's AckWait expires, but a replica may still hold
        that delivery (queued in its client, or slowed down) and publish it a little later. Waiting one more
        AckWait lets such a replica finish (its Redis marker then says "already published") or, later still, see
        the dead-letter marker and drop its copy (``BatchPreparer``).
        """
        try:
            stored = float(msg.metadata.timestamp.timestamp())
        except Exception:  # no JetStream metadata: act now
            return 0.0
        return stored + self._settings.ingest.ack_wait + 1.0 - time.time()

    @staticmethod
    async def _nak(msg: Any, delay: float) -> None:
        try:
            await msg.nak(delay=delay)
        except Exception:  # the connection is gone: the advisory is redelivered after its AckWait
            pass

    async def handle(self, advisory: bytes) -> str:
        """Dead-letter the message one advisory names; return the result label (see ``Metrics``)."""
        info = orjson.loads(advisory)
        stream = str(info.get("stream") or self._settings.ingest.stream)
        seq = int(info["stream_seq"])
        deliveries = int(info.get("deliveries") or 0)
        marker = dead_letter_id(stream, seq)
        loop = asyncio.get_running_loop()
        with bound(stream_seq=seq, delivered=deliveries):
            try:
                raw = await self._js.get_msg(stream, seq)
            except NotFoundError:
                log.error("a message ran out of deliveries and is no longer in the input stream")
                return "gone"
            subject = str(raw.subject or "")
            if stream == self._settings.ingest.partition_stream:
                subject = original_subject(subject)  # as the partitioned intake hands it on: no partition token
            seen = await loop.run_in_executor(self._executor, self._dedup.seen, [marker])
            if seen and seen[0]:
                return "already_dead_lettered"  # another replica (or an earlier attempt) did it
            headers = dict(raw.headers) if raw.headers else None
            stored = StoredMessage(
                subject, bytes(raw.data or b""), _Metadata(stream, _Sequence(seq, 0), deliveries), headers
            )
            [outcome] = await loop.run_in_executor(self._executor, self._prepare, [stored])
            decided = self._decide(outcome, deliveries)
            if isinstance(decided, str):
                return decided
            # The preparer's lookup claims the event when claims are on; this replica will not publish it.
            claimed = [outcome.event_id] if isinstance(outcome, Publish) and outcome.claimed else []
            try:
                return await self._dead_letter(stored, decided)
            finally:
                if claimed:  # neither a retry nor a replay of the dead letter waits for this claim to expire
                    await loop.run_in_executor(self._executor, self._dedup.release, claimed)

    @staticmethod
    def _decide(outcome: Outcome, deliveries: int) -> DeadLetter | str:
        """The dead letter to write for the preparer's ``outcome``, or the result label when there is none."""
        if isinstance(outcome, Skip):
            return "no_route"
        if isinstance(outcome, Duplicate):
            log.info("a message ran out of deliveries after it was published; nothing to do")
            return "already_published"
        if isinstance(outcome, ClaimedElsewhere):
            # A replica still finishing the final delivery is publishing it now: look again after the delay, when
            # its marker says published (or its claim expired with it).
            log.info("a message ran out of deliveries while a replica publishes it; looking again shortly")
            return "retried"
        if isinstance(outcome, (Publish, Retry)):
            return DeadLetter(
                outcome.table,
                Reason.MAX_DELIVERIES,
                f"JetStream stopped delivering it after {deliveries} deliveries that no replica finished",
            )
        assert isinstance(outcome, DeadLetter)
        return outcome

    async def _dead_letter(self, stored: StoredMessage, outcome: DeadLetter) -> str:
        """Write ``outcome`` for ``stored`` to the dead-letter stream, then its Redis marker; the result label."""
        subject, stream, seq = stored.subject, stored.metadata.stream, stored.metadata.sequence.stream
        if not self._settings.dlq.enabled:
            log.critical(
                "a message ran out of deliveries and the dead-letter stream is disabled; it stays only in the input "
                "stream",
                extra={"subject": subject, "reason": outcome.reason.value},
            )
            return "gone"
        dead = build_dead_letter(
            subject_prefix=self._settings.dlq.subject_prefix,
            dlq_stream=self._settings.dlq.stream,
            max_payload=self._publisher.max_payload,
            source_subject=subject,
            data=stored.data,
            stream=stream,
            seq=seq,
            delivered=stored.metadata.num_delivered,
            reason=outcome.reason.value,
            detail=outcome.detail,
        )
        future = await self._publisher.publish(dead.subject, dead.data, dead.headers)
        try:
            await asyncio.wait_for(future, self._settings.publish.timeout)
        except (TimeoutError, Exception) as exc:
            self._metrics.publish_errors.inc()
            log.warning(
                "could not dead-letter a message that ran out of deliveries; retrying",
                extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            return "retried"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._dedup.mark, [dead_letter_id(stream, seq)])
        self._metrics.dead_letters.labels(outcome.reason.value).inc()
        log.warning(
            "dead-lettered a message that ran out of deliveries",
            extra={"subject": subject, "reason": outcome.reason.value},
        )
        return "dead_lettered"
