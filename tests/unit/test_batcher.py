"""Batcher: pushed messages become batches (full, or after batch_wait_ms), pulled batches go as they are; batches
wait in receipt order for the walk; intake waits while the in-flight bound is reached."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from cdc_service.config import IngestSettings, Settings
from cdc_service.core.outcomes import Outcome, Publish, Result, Skip
from cdc_service.metrics import Metrics
from cdc_service.pipeline.batcher import Batcher
from cdc_service.pipeline.ledger import SettleLedger
from cdc_service.ports import InboundMessage
from cdc_service.testing import FakeMessage, ManualClock


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-batcher")
    yield pool
    pool.shutdown(wait=True)


def skip_all(messages: Sequence[InboundMessage]) -> list[Outcome]:
    return [Skip("contacts") for _ in messages]


def make(
    executor: ThreadPoolExecutor, prepare: object = skip_all, **ingest: object
) -> tuple[Batcher, SettleLedger, ManualClock]:
    settings = Settings(ingest=IngestSettings(**ingest))  # type: ignore[arg-type]
    metrics, clock = Metrics(CollectorRegistry()), ManualClock()
    ledger = SettleLedger(settings, metrics, clock)
    return Batcher(settings.ingest, prepare, executor, ledger, metrics, clock), ledger, clock  # type: ignore[arg-type]


def msgs(count: int, size: int = 1) -> list[FakeMessage]:
    return [FakeMessage("cdc.acme.contacts", b"x" * size, seq=i + 1) for i in range(count)]


async def test_a_full_buffer_is_dispatched_at_once(executor: ThreadPoolExecutor) -> None:
    batcher, ledger, _ = make(executor, batch_size=3, batch_wait_ms=60_000)
    for msg in msgs(7):
        await batcher.on_message(msg)
    assert [len(b.messages) for b in batcher.queue] == [3, 3]  # the 7th waits for more, or for its timer
    assert ledger.inflight == 6 and batcher.dispatched == 2
    batcher.flush()
    assert [len(b.messages) for b in batcher.queue] == [3, 3, 1]
    assert [b.number for b in batcher.queue] == [1, 2, 3]


async def test_a_partial_buffer_goes_out_after_batch_wait(executor: ThreadPoolExecutor) -> None:
    batcher, _, _ = make(executor, batch_size=100, batch_wait_ms=1)
    first = msgs(2)
    for msg in first:
        await batcher.on_message(msg)
    assert not batcher.queue
    batch = await asyncio.wait_for(batcher.next(), 5)  # dispatched by the batch_wait_ms timer
    assert batch.messages == first


async def test_a_pulled_batch_goes_as_it_is(executor: ThreadPoolExecutor) -> None:
    batcher, ledger, clock = make(executor, batch_size=2)
    clock.advance(100)
    pulled = msgs(5)
    await batcher.on_batch(list(pulled))
    [batch] = batcher.queue
    assert batch.messages == pulled and batch.received >= clock.monotonic() - 1
    assert ledger.inflight == 5 and batch in ledger.open_batches


async def test_batches_are_walked_in_receipt_order_even_when_prepared_out_of_order(
    executor: ThreadPoolExecutor,
) -> None:
    second_done = threading.Event()

    def prepare(messages: Sequence[InboundMessage]) -> list[Outcome]:
        if messages[0].subject.endswith("first"):
            second_done.wait(5)  # the first batch is prepared last
        else:
            second_done.set()
        return skip_all(messages)

    batcher, _, _ = make(executor, prepare)
    await batcher.on_batch([FakeMessage("cdc.acme.first", b"1")])
    await batcher.on_batch([FakeMessage("cdc.acme.second", b"2")])
    head = await batcher.next()
    assert head.messages[0].subject == "cdc.acme.first"
    assert await head.outcomes == [Skip("contacts")]
    assert batcher.pop() is head
    assert (await batcher.next()).messages[0].subject == "cdc.acme.second"


async def test_intake_waits_while_the_bytes_in_flight_are_at_their_bound(executor: ThreadPoolExecutor) -> None:
    batcher, ledger, _ = make(executor, batch_size=1, max_inflight_mb=1)
    big = msgs(2, size=600_000)
    await asyncio.wait_for(batcher.on_message(big[0]), 5)
    second = asyncio.ensure_future(batcher.on_message(big[1]))
    await asyncio.sleep(0)  # let it run up to its wait
    assert not second.done() and ledger.inflight_bytes == 1_200_000
    first = batcher.pop()
    await ledger.settle(first, 0, Result.SKIPPED, "contacts")
    await asyncio.wait_for(second, 5)


async def test_claimed_events_of_prepared_batches_are_known(executor: ThreadPoolExecutor) -> None:
    def prepare(messages: Sequence[InboundMessage]) -> list[Outcome]:
        return [
            Publish("messages", "claimed-1", "wa.x", b"{}", None, claimed=True),
            Publish("messages", "unclaimed", "wa.x", b"{}", None),
        ]

    batcher, _, _ = make(executor, prepare)
    await batcher.on_batch(msgs(2))
    await batcher.queue[0].outcomes
    assert batcher.claimed_in_queue() == {"claimed-1"}
