"""Worker-thread side of a micro-batch: parse, route, build, one Redis lookup-and-claim. Returns outcomes, touches no
NATS."""

from __future__ import annotations

import logging
import threading
from collections import Counter as TallyCounter
from collections.abc import Sequence
from typing import Any

import orjson
import simdjson

from cdc_service.core.correlation import request_id, traceparent
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import (
    ClaimedElsewhere,
    DeadLetter,
    Duplicate,
    Outcome,
    Publish,
    TransientError,
    dead_letter_id,
    decide_failure,
)
from cdc_service.logs import bound
from cdc_service.metrics import Metrics
from cdc_service.ports import Claim, DedupStore, InboundMessage, delivery_count, source_position

log = logging.getLogger("cdc_service.worker")
_RECENT_ROUTING_SIZE = 10_000  # routing fields of rows planned lately, for deletes that follow them closely

MAX_DRIFT_SERIES = 100  # distinct (table, column) label pairs per replica; past it, field_name="other"
OTHER = "other"
_MAX_FIELD_LABEL = 64


class ColumnDrift:
    """Counts columns that appear in or vanish from a routed table's rows, and logs each (table, column) once.

    Column names come from input: a runaway or hostile schema must not grow the series or the log without limit,
    so past ``max_series`` distinct pairs (or for a name that is long or not printable) the count goes under
    ``field_name="other"`` and one more warning says so. Thread-safe; the lock is taken only for a new pair.
    """

    def __init__(self, metrics: Metrics, max_series: int = MAX_DRIFT_SERIES) -> None:
        self._counters = {"unexpected": metrics.unhandled_fields, "missing": metrics.missing_fields}
        self._children: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()
        self._max_series = max_series
        self._named = 0
        self._capped = False

    def record(self, drifts: Sequence[tuple[str, tuple[str, ...], tuple[str, ...]]]) -> None:
        """Count one batch's ``(table, unexpected, missing)`` findings: one counter update per distinct column."""
        counts: TallyCounter[tuple[str, str, str]] = TallyCounter()
        for (table, unexpected, missing), rows in TallyCounter(drifts).items():
            for name in unexpected:
                counts["unexpected", table, name] += rows
            for name in missing:
                counts["missing", table, name] += rows
        for key, n in counts.items():
            child = self._children.get(key) or self._child(*key)
            child.inc(n)

    def _child(self, change: str, table: str, name: str) -> Any:
        with self._lock:
            child = self._children.get((change, table, name))
            if child is not None:
                return child
            label = name if name != OTHER and len(name) <= _MAX_FIELD_LABEL and name.isprintable() else ""
            if label and self._named < self._max_series:
                self._named += 1
                child = self._children[(change, table, name)] = self._counters[change].labels(table, label)
                what = "appeared in" if change == "unexpected" else "is missing from"
                log.warning(
                    "schema drift: column %s rows of table %s",
                    what,
                    table,
                    extra={"table": table, "field_name": label, "change": change},
                )
                return child
            if not self._capped and label:
                self._capped = True
                log.warning(
                    "schema drift: over %d distinct columns; further ones are counted as field_name=%s, not logged",
                    self._max_series,
                    OTHER,
                    extra={"table": table},
                )
            # Not remembered by name: a flood of distinct names must not grow this dict either.
            key = (change, table, OTHER)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._counters[change].labels(table, OTHER)
            return child


def _correlate(event: Publish, msg: InboundMessage) -> None:
    # X-Request-ID from the event id (the same on every retry); the source's traceparent passed through.
    event.request_id = request_id(event.event_id)
    if msg.headers:
        event.traceparent = traceparent(msg.headers)


class BatchPreparer:
    """Callable run in the pool: ``outcomes = preparer(messages)``, one outcome per message, in order.

    Never raises for bad input. Reading ``subject``, ``data`` and ``reply`` of a nats-py message from a worker is
    safe; acking it is not, and is left to the loop thread.
    """

    def __init__(self, builder: EventBuilder, dedup: DedupStore, metrics: Metrics, *, max_deliver: int) -> None:
        self._builder = builder
        self._dedup = dedup
        self._metrics = metrics
        self._max_deliver = max_deliver
        self._local = threading.local()
        self._drift = ColumnDrift(metrics)
        self._recent_routing: dict[str, str] = {}

    def _parser(self) -> simdjson.Parser:
        # A pysimdjson Parser is not thread-safe and its documents die at the next parse: one per worker thread.
        parser: simdjson.Parser | None = getattr(self._local, "parser", None)
        if parser is None:
            parser = self._local.parser = simdjson.Parser()
        return parser

    def __call__(self, messages: Sequence[InboundMessage]) -> list[Outcome]:
        parser = self._parser()
        plan = self._builder.plan
        outcomes: list[Outcome] = []
        delivered: list[int] = []  # each message's delivery attempt, read from its reply subject once
        redelivered = 0
        drifts: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        for msg in messages:
            count = delivery_count(msg.reply)
            delivered.append(count)
            if count > 1:
                redelivered += 1
            try:
                outcome = plan(msg.subject, msg.data, parser)
                if type(outcome) is Publish:
                    _correlate(outcome, msg)
                    if outcome.drift is not None:
                        drifts.append((outcome.table, *outcome.drift))
                outcomes.append(outcome)
            except Exception as exc:  # a bug, not bad input: retry later, never kill the worker
                outcomes.append(self._failed(msg, count, exc))
        if redelivered:
            self._metrics.redeliveries.inc(redelivered)
        if drifts:
            self._drift.record(drifts)
        self._route_from_cache(messages, outcomes, parser)
        return self._drop_known_duplicates(outcomes, messages, delivered)

    def _failed(self, msg: InboundMessage, count: int, exc: Exception) -> Outcome:
        table = self._builder.table_of(msg.subject)
        self._metrics.handler_errors.labels(type(exc).__name__).inc()
        stream, seq = source_position(msg.reply)
        with bound(subject=msg.subject, table=table, delivered=count, stream=stream, stream_seq=seq):
            log.exception("unexpected error while building an event")
        return decide_failure(exc, table=table, num_delivered=count, max_deliver=self._max_deliver)

    def _route_from_cache(self, messages: Sequence[InboundMessage], outcomes: list[Outcome], parser: Any) -> None:
        """Deletes that lack their routing fields: plan them again with the fields remembered for their row (one
        lookup for the batch). Unknown rows stay dead letters; an unreachable store is retried like any outage."""
        self._remember_routing(outcomes)
        lacking = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, DeadLetter) and o.routing_key]
        if not lacking:
            return
        found, store_failed = self._remembered([dead.routing_key for _, dead in lacking])
        for (i, dead), remembered in zip(lacking, found, strict=True):
            if remembered is None and store_failed:
                outcomes[i] = decide_failure(
                    TransientError("the routing cache is unavailable"),
                    table=dead.table,
                    num_delivered=delivery_count(messages[i].reply),
                    max_deliver=self._max_deliver,
                )
            elif remembered is not None:
                outcomes[i] = self._replan(messages[i], dead, remembered, parser)

    def _remember_routing(self, outcomes: list[Outcome]) -> None:
        recent = self._recent_routing
        for outcome in outcomes:
            if isinstance(outcome, Publish) and outcome.routing is not None:
                if len(recent) >= _RECENT_ROUTING_SIZE:
                    recent.clear()
                key, fields = outcome.routing
                recent[key] = fields

    def _remembered(self, keys: list[str]) -> tuple[list[str | None], bool]:
        """The routing fields remembered for each row key (None: unknown), and whether the store failed to answer.
        The row's insert may be in this batch or one still in flight, before its entry reaches Redis."""
        found = [self._recent_routing.get(key) for key in keys]
        unknown = [j for j, value in enumerate(found) if value is None]
        if not unknown:
            return found, False
        answers = self._dedup.routes([keys[j] for j in unknown])
        if answers is None:
            return found, True
        for j, value in zip(unknown, answers, strict=True):
            found[j] = value
        return found, False

    def _replan(self, msg: InboundMessage, dead: DeadLetter, remembered: str, parser: Any) -> Outcome:
        try:
            routing = orjson.loads(remembered)
        except orjson.JSONDecodeError:
            return dead  # not an entry this service wrote: stays a dead letter
        if not isinstance(routing, dict):
            return dead
        replanned = self._builder.plan(msg.subject, msg.data, parser, routing)
        if type(replanned) is Publish:
            _correlate(replanned, msg)
        return replanned

    def _drop_known_duplicates(
        self, outcomes: list[Outcome], messages: Sequence[InboundMessage], delivered: list[int]
    ) -> list[Outcome]:
        """Look up and claim the batch's events in Redis (one call): known ones become duplicates, ones another
        replica is publishing become ``ClaimedElsewhere``, the rest carry this replica's claim."""
        events = [(i, o) for i, o in enumerate(outcomes) if type(o) is Publish]
        if events and 0 < self._max_deliver <= max(delivered):
            events = self._drop_dead_lettered_finals(outcomes, messages, delivered, events)
        if not events:
            return outcomes
        states = self._dedup.claim([event.event_id for _, event in events])
        if states is None:
            # Fail open, unclaimed: JetStream's Nats-Msg-Id window still keeps a repeat out of the stream.
            self._metrics.dedup_lookups.labels("error").inc(len(events))
            return outcomes
        self._apply_claims(outcomes, events, states)
        return outcomes

    def _drop_dead_lettered_finals(
        self,
        outcomes: list[Outcome],
        messages: Sequence[InboundMessage],
        delivered: list[int],
        events: list[tuple[int, Publish]],
    ) -> list[tuple[int, Publish]]:
        """A final delivery that was held past its AckWait may already have been dead-lettered from its
        max-deliveries advisory (cdc_service.advisories): then publishing it too would make it both."""
        finals = [(i, e) for i, e in events if delivered[i] >= self._max_deliver]
        if not finals:
            return events
        dead = [dead_letter_id(messages[i].metadata.stream, messages[i].metadata.sequence.stream) for i, _ in finals]
        gone = set()
        for (i, event), was_dead in zip(finals, self._dedup.seen(dead) or [False] * len(finals), strict=True):
            if was_dead:
                outcomes[i] = Duplicate(event.table, event.event_id)
                gone.add(i)
        return [(i, e) for i, e in events if i not in gone] if gone else events

    def _apply_claims(
        self, outcomes: list[Outcome], events: list[tuple[int, Publish]], states: Sequence[Claim]
    ) -> None:
        hits = held = 0
        for (i, event), state in zip(events, states, strict=True):
            match state:  # the usual answer first
                case Claim.CLAIMED:
                    event.claimed = True
                case Claim.DONE:
                    outcomes[i] = Duplicate(event.table, event.event_id)
                    hits += 1
                case Claim.HELD:
                    outcomes[i] = ClaimedElsewhere(event.table, event)
                    held += 1
                case Claim.FREE:
                    pass  # claims are off (dedup.claim_ttl = 0): publish unclaimed
        lookups = self._metrics.dedup_lookups
        if hits:
            lookups.labels("hit").inc(hits)
        if held:
            lookups.labels("held").inc(held)
        if len(events) - hits - held:
            lookups.labels("miss").inc(len(events) - hits - held)
