"""SettleLedger: each message is settled once, as its Result says; counts, progress times, idle and room."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from cdc_service.config import IngestSettings, Settings
from cdc_service.core.outcomes import Reason, Result
from cdc_service.metrics import Metrics
from cdc_service.pipeline.common import Batch
from cdc_service.pipeline.ledger import SettleLedger
from cdc_service.testing import FakeMessage, ManualClock


def make(settings: Settings | None = None) -> tuple[SettleLedger, ManualClock, CollectorRegistry]:
    registry, clock = CollectorRegistry(), ManualClock()
    return SettleLedger(settings or Settings(), Metrics(registry), clock), clock, registry


def batch_of(*sizes: int, received: float = 0.0) -> Batch:
    messages = [FakeMessage("cdc.acme.messages", b"x" * size, seq=i + 1) for i, size in enumerate(sizes)]
    return Batch(list(messages), received, set(range(len(messages))), number=1, nbytes=sum(sizes))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_each_result_is_settled_with_its_action_once() -> None:
    ledger, _, registry = make()
    batch = batch_of(1, 1, 1, 1, 1)
    ledger.open(batch)
    results = [Result.PUBLISHED, Result.DUPLICATE, Result.SKIPPED, Result.DEAD_LETTERED, Result.RETRIED]
    for index, result in enumerate(results):
        await ledger.settle(batch, index, result, "messages", delay=2.0 if result is Result.RETRIED else 0.0)
        await ledger.settle(batch, index, Result.PUBLISHED, "messages")  # a second settle does nothing
    msgs = batch.messages
    assert [m.acked for m in msgs] == [1, 1, 1, 0, 0]  # type: ignore[attr-defined]
    assert msgs[3].termed == 1 and msgs[4].naked == [2.0]  # type: ignore[attr-defined]
    assert dict(ledger.totals) == {r.value: 1 for r in results}
    for result in results:
        assert sample(registry, "cdc_consumer_events_total", table="messages", result=result.value) == 1


async def test_a_nak_without_delay_redelivers_at_once() -> None:
    ledger, _, _ = make()
    batch = batch_of(1)
    ledger.open(batch)
    await ledger.settle(batch, 0, Result.RETRIED, "messages")
    assert batch.messages[0].naked == [None]  # type: ignore[attr-defined]


async def test_counts_wait_for_the_batch_to_close() -> None:
    ledger, _, registry = make()
    batch = batch_of(1, 1)
    ledger.open(batch)
    await ledger.settle(batch, 0, Result.PUBLISHED, "messages")
    assert ledger.totals == {} and batch in ledger.open_batches
    assert not ledger.idle.is_set()
    await ledger.settle(batch, 1, Result.PUBLISHED, "messages")
    assert ledger.totals == {"published": 2} and not ledger.open_batches
    assert ledger.idle.is_set() and ledger.inflight == 0 and ledger.inflight_bytes == 0
    assert sample(registry, "cdc_consumer_inflight_messages") == 0


async def test_unrouted_tables_share_one_label_and_dead_letters_count_their_reason() -> None:
    ledger, _, registry = make()
    batch = batch_of(1, 1)
    ledger.open(batch)
    await ledger.settle(batch, 0, Result.SKIPPED, "contacts")
    await ledger.settle(batch, 1, Result.DEAD_LETTERED, "messages", reason=Reason.INVALID_JSON)
    assert sample(registry, "cdc_consumer_events_total", table="<other>", result="skipped") == 1
    assert sample(registry, "cdc_consumer_dead_letters_total", reason="invalid_json") == 1


async def test_only_acks_and_terms_are_progress() -> None:
    ledger, clock, _ = make()
    batch = batch_of(1, 1)
    ledger.open(batch)
    before = ledger.last_settled
    clock.advance(10)
    await ledger.settle(batch, 0, Result.RETRIED, "messages")
    assert ledger.last_settled == before  # a nak hands work back: not progress
    clock.advance(10)
    await ledger.settle(batch, 1, Result.DEAD_LETTERED, "messages")
    assert ledger.last_settled >= before + 20


async def test_processing_time_is_measured_on_the_clock_for_results_that_went_through() -> None:
    ledger, clock, registry = make()
    batch = batch_of(1, 1, received=clock.monotonic())
    ledger.open(batch)
    clock.advance(3)
    await ledger.settle(batch, 0, Result.PUBLISHED, "messages")
    await ledger.settle(batch, 1, Result.RETRIED, "messages")
    assert sample(registry, "cdc_consumer_processing_seconds_count", table="messages") == 1
    assert sample(registry, "cdc_consumer_processing_seconds_sum", table="messages") >= 3


async def test_settle_all_acks_each_open_message_once_and_times_each_like_settle() -> None:
    """The finisher's bulk settle: the same acks, counts, progress and processing-time figures as one settle per
    message; a message settled already is left alone, and a failing ack is still settled."""

    class Broken(FakeMessage):
        async def ack(self) -> None:
            raise ConnectionError("gone")

    ledger, clock, registry = make()
    batch = batch_of(1, 1, 1, 1, received=clock.monotonic())
    batch.messages[3] = Broken("cdc.acme.messages", b"x", seq=4)
    ledger.open(batch)
    clock.advance(3)
    await ledger.settle(batch, 0, Result.RETRIED, "messages")
    settles = [(0, Result.PUBLISHED, "messages"), (1, Result.PUBLISHED, "messages")]
    settles += [(2, Result.DUPLICATE, "users"), (3, Result.PUBLISHED, "messages")]
    await ledger.settle_all(batch, settles)
    assert [m.acked for m in batch.messages[:3]] == [0, 1, 1]  # type: ignore[attr-defined]
    assert batch.messages[0].naked == [None]  # type: ignore[attr-defined]
    assert ledger.inflight == 0 and ledger.inflight_bytes == 0 and ledger.idle.is_set()
    assert dict(ledger.totals) == {"retried": 1, "published": 2, "duplicate": 1}
    assert ledger.last_settled >= batch.received + 3
    assert sample(registry, "cdc_consumer_events_total", table="<other>", result="duplicate") == 1
    assert sample(registry, "cdc_consumer_processing_seconds_count", table="messages") == 2
    assert 6 <= sample(registry, "cdc_consumer_processing_seconds_sum", table="messages") < 7
    assert sample(registry, "cdc_consumer_processing_seconds_bucket", table="messages", le="2.5") == 0
    assert sample(registry, "cdc_consumer_processing_seconds_bucket", table="messages", le="5.0") == 2
    assert sample(registry, "cdc_consumer_processing_seconds_count", table="<other>") == 1


async def test_a_failing_ack_is_still_settled() -> None:
    class Broken(FakeMessage):
        async def ack(self) -> None:
            raise ConnectionError("gone")

    ledger, _, _ = make()
    batch = batch_of(1)
    batch.messages[0] = Broken("cdc.acme.messages", b"x")
    ledger.open(batch)
    await ledger.settle(batch, 0, Result.PUBLISHED, "messages")
    assert ledger.inflight == 0 and ledger.totals == {"published": 1}


@pytest.mark.parametrize(("limit", "sizes"), [("count", (1, 1, 1)), ("bytes", (600_000, 600_000))])
async def test_room_waits_until_a_batch_closes(limit: str, sizes: tuple[int, ...]) -> None:
    ingest = IngestSettings(max_ack_pending=3, max_inflight_mb=1)
    ledger, _, _ = make(Settings(ingest=ingest))
    batch = batch_of(*sizes)
    ledger.open(batch)
    assert not ledger.has_room()
    waiting = asyncio.ensure_future(ledger.wait_for_room())
    await asyncio.sleep(0)
    assert not waiting.done()
    for index in range(len(sizes)):
        await ledger.settle(batch, index, Result.PUBLISHED, "messages")
    await asyncio.wait_for(waiting, 5)
    assert ledger.has_room()


async def test_released_intake_never_waits_for_room() -> None:
    ledger, _, _ = make(Settings(ingest=IngestSettings(max_ack_pending=1)))
    ledger.open(batch_of(1, 1))
    assert not ledger.has_room() and not ledger.over_bytes()
    ledger.release_intake()
    await asyncio.wait_for(ledger.wait_for_room(), 1)
