"""Prometheus collectors, all on one injected registry. No per-subject or per-id labels."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Sequence

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from cdc_service import __version__
from cdc_service.core.outcomes import Reason

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RESULTS = ("published", "duplicate", "skipped", "dead_lettered", "retried")
ADVISORY_RESULTS = ("dead_lettered", "already_dead_lettered", "already_published", "no_route", "gone", "retried")
DRIFT_FIELDS = ("filter_subjects", "ack_wait", "max_deliver", "max_ack_pending", "ack_policy", "deliver_subject")
# The ``table`` label of every table without a route (and of subjects that name none): label values come from a
# bounded set, never from input. ">" cannot be in a routed table's name, so this never names a real route.
OTHER_TABLE = "<other>"
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    """Every collector the service exports. Tests build one on a fresh ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = Gauge(
            "cdc_consumer_build_info",
            "Always 1; the version label is the running package version.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(__version__).set(1)
        self.events = Counter(
            "cdc_consumer_events_total",
            "Inbound messages by table and result (published, duplicate, skipped, dead_lettered, retried).",
            ["table", "result"],
            registry=registry,
        )
        self.processing = Histogram(
            "cdc_consumer_processing_seconds",
            "Time from receipt of a message's batch to its ack, by table.",
            ["table"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.lag = Histogram(
            "cdc_consumer_lag_seconds",
            "Now minus the source commit_timestamp, observed when the event is published.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.publish_errors = Counter(
            "cdc_consumer_publish_errors_total",
            "Publish attempts that failed (timeout or rejection); each is retried with the same Nats-Msg-Id.",
            registry=registry,
        )
        self.dedup_lookups = Counter(
            "cdc_consumer_dedup_lookups_total",
            "Redis dedup lookups per event: hit (duplicate), miss (claimed or free), held (another replica's claim), "
            "or error (Redis unavailable, failed open).",
            ["result"],
            registry=registry,
        )
        self.dedup_mark_errors = Counter(
            "cdc_consumer_dedup_mark_errors_total",
            "Marker writes that failed or timed out after a successful publish (acked anyway).",
            registry=registry,
        )
        self.copy_waits = Counter(
            "cdc_consumer_copy_waits_total",
            "Copies of an event that arrived while it was being published, by holder: this_replica (the copy waited "
            "for the first one's outcome) or other_replica (another replica's Redis claim; looked up again).",
            ["holder"],
            registry=registry,
        )
        self.unclaimed_publishes = Counter(
            "cdc_consumer_unclaimed_publishes_total",
            "Events published without a Redis claim (Redis unavailable, or dedup.claim_ttl 0): a core NATS "
            "subscriber may see a repeat of these; the stream still stores each once.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "cdc_consumer_redis_errors_total",
            "Redis calls that failed, by operation.",
            ["operation"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "cdc_consumer_redis_up",
            "1 while Redis answers, 0 while dedup runs on JetStream's window only.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "cdc_consumer_dead_letters_total",
            "Messages sent to the dead-letter stream, by reason.",
            ["reason"],
            registry=registry,
        )
        self.redeliveries = Counter(
            "cdc_consumer_redeliveries_total", "Messages received with a delivery count above 1.", registry=registry
        )
        self.batch_size = Histogram(
            "cdc_consumer_batch_size",
            "Messages per micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.inflight = Gauge(
            "cdc_consumer_inflight_messages",
            "Messages received and not yet acked, nak'ed or terminated.",
            registry=registry,
        )
        self.inflight_bytes = Gauge(
            "cdc_consumer_inflight_bytes",
            "Payload bytes of the messages in flight; intake waits at ingest.max_inflight_mb.",
            registry=registry,
        )
        self.pool_size = Gauge("cdc_consumer_pool_size", "Worker threads in the pool.", registry=registry)
        self.pool_queue = Gauge(
            "cdc_consumer_pool_queue_depth",
            "Batches submitted to the worker pool and not yet started.",
            registry=registry,
        )
        self.last_ack = Gauge(
            "cdc_consumer_last_ack_timestamp_seconds",
            "Unix time of the most recent ack or terminate (naks do not count); the start time before the first.",
            registry=registry,
        )
        self.nats_connected = Gauge("cdc_consumer_nats_connected", "1 while connected to NATS.", registry=registry)
        self.nats_reconnects = Counter("cdc_consumer_nats_reconnects_total", "NATS reconnections.", registry=registry)
        self.consumer_recreated = Counter(
            "cdc_consumer_consumer_recreated_total",
            "Times the durable consumer was found deleted while running and created again.",
            registry=registry,
        )
        self.consumer_drift = Counter(
            "cdc_consumer_consumer_drift_total",
            "Times the consumer watchdog found the durable's configuration differing from the settings and restored "
            "it, by field.",
            ["field"],
            registry=registry,
        )
        self.max_delivery_advisories = Counter(
            "cdc_consumer_max_delivery_advisories_total",
            "MAX_DELIVERIES advisories handled, by result: dead_lettered, already_dead_lettered, already_published "
            "(Redis marker), no_route, gone (no longer in the input stream), retried.",
            ["result"],
            registry=registry,
        )
        self.backlog = Gauge(
            "cdc_consumer_backlog_messages",
            "Messages in the input stream not yet delivered to the durable (its num_pending), read by the consumer "
            "watchdog; a scaling signal.",
            registry=registry,
        )
        self.ack_floor = Gauge(
            "cdc_consumer_ack_floor_sequence",
            "Stream sequence below which the durable has everything acked; a recreated durable resumes after it.",
            registry=registry,
        )
        self.partitions_owned = Gauge(
            "cdc_consumer_partitions_owned",
            "Partitions this replica pulls as the membership assigns them (ordering = partitioned; else 0).",
            registry=registry,
        )
        self.partition_takeovers = Counter(
            "cdc_consumer_partition_takeovers_total",
            "Times this replica took a partition over while another owner still had messages of it unacked, and "
            "recreated its durable to resume after the ack floor.",
            registry=registry,
        )
        self.partition_members = Gauge(
            "cdc_consumer_partition_members",
            "Live replicas in the partition membership bucket, as this replica last read it.",
            registry=registry,
        )
        self.handler_errors = Counter(
            "cdc_consumer_handler_errors_total",
            "Unexpected exceptions while handling messages (a bug): the messages are nak'ed with a delay.",
            ["exception_type"],
            registry=registry,
        )
        self.unhandled_fields = Counter(
            "cdc_consumer_unhandled_fields_total",
            "Rows of a routed table with a column its routes.<table>.columns does not list, by table and column "
            '(at most 100 table/column series per replica, then field_name="other").',
            ["table", "field_name"],
            registry=registry,
        )
        self.missing_fields = Counter(
            "cdc_consumer_missing_fields_total",
            "Rows of a routed table without a column its routes.<table>.columns lists (deletes not counted), by table "
            'and column (same cap as unhandled_fields, then field_name="other").',
            ["table", "field_name"],
            registry=registry,
        )
        # Series exist from the start at 0, so rate() and increase() see the first event of each kind.
        for result in ("hit", "miss", "held", "error"):
            self.dedup_lookups.labels(result)
        for holder in ("this_replica", "other_replica"):
            self.copy_waits.labels(holder)
        for reason in Reason:
            self.dead_letters.labels(reason.value)
        for result in ADVISORY_RESULTS:
            self.max_delivery_advisories.labels(result)
        for name in DRIFT_FIELDS:
            self.consumer_drift.labels(name)

    def declare_tables(self, tables: Iterable[str]) -> None:
        """Create the per-table series of the routed tables (and of all others together) at 0."""
        for table in [*tables, OTHER_TABLE]:
            self.processing.labels(table)
            for result in RESULTS:
                self.events.labels(table, result)


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each of ``values`` (a labelled child or an unlabelled histogram): the same
    buckets, count and sum, at one lock per bucket touched instead of two locks per value. Reads prometheus_client's
    own fields (``_upper_bounds``, ``_buckets``, ``_sum``; tests/unit/test_metrics.py checks the figures against
    ``observe``); without them it observes one by one."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    summed = sum(values)
    if bounds is None or buckets is None or total is None or len(values) < 2 or math.isnan(summed):
        for value in values:
            histogram.observe(value)
        return
    total.inc(summed)
    # observe() counts a value in the first bucket whose bound is >= it: bisect_left's index (the last bound is +Inf).
    for index, n in Tally([bisect_left(bounds, value) for value in values]).items():
        buckets[index].inc(n)


def register_runtime_collectors(registry: CollectorRegistry) -> None:
    """Add the standard process (``process_resident_memory_bytes``, ``process_cpu_seconds_total``, open fds), platform
    (``python_info``) and GC (``python_gc_*``) collectors: what the memory and CPU sizing is checked against."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
