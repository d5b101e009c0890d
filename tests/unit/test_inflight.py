"""A copy of an event in flight is not published again: the in-flight table (one replica) and the Redis claim
(several replicas), with the in-memory fakes. ``FakePublisher.attempts`` counts what went on the wire, including
repeats the stream would drop; ``published`` is what the stream stored."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cdc_service.config import DedupSettings, IngestSettings, PublishSettings, Settings
from cdc_service.core.outcomes import Outcome
from cdc_service.ports import PubAck
from cdc_service.testing import FakeDedupStore, FakeMessage, FakePublisher
from tests.unit.pipeline_harness import harness, message, wait_until

EVENT = "1000:chatdb:acme:messages:msg-1"
ONE_BY_ONE = Settings(ingest=IngestSettings(batch_size=1))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-worker")
    yield pool
    pool.shutdown(wait=True)


class Gated(FakePublisher):
    """Sends at once (``attempts``), answers only when the test calls ``answer()``."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[asyncio.Future[PubAck], asyncio.Future[PubAck]]] = []

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], **options: Any
    ) -> asyncio.Future[PubAck]:
        answer = await super().publish(subject, payload, headers, **options)
        held: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self.waiting.append((answer, held))
        return held

    def answer(self) -> None:
        for answer, held in self.waiting:
            if not held.done():
                held.set_result(answer.result())
        self.waiting.clear()


async def test_identical_ids_in_one_batch_collapse_to_one_publish(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    copies = [message(seq=i) for i in range(1, 4)]
    engine = await h.run(copies)
    assert h.publisher.attempts == 1  # on the wire once, not only in the stream
    assert all(m.acked == 1 and not m.naked for m in copies)
    assert dict(engine.totals) == {"published": 1, "duplicate": 2}
    assert h.sample("cdc_consumer_copy_waits_total", {"holder": "this_replica"}) == 2


async def test_a_later_copy_waits_for_the_first_and_is_then_acked_as_duplicate(executor: ThreadPoolExecutor) -> None:
    publisher = Gated()
    h = harness(executor, publisher=publisher, settings=ONE_BY_ONE)
    engine = h.build()
    await engine.start()
    first, again = message(seq=1), message(seq=2)
    await engine.on_message(first)
    await wait_until(lambda: publisher.attempts == 1, 5, "first copy sent")
    await engine.on_message(again)
    await wait_until(lambda: h.sample("cdc_consumer_copy_waits_total", {"holder": "this_replica"}) == 1, 5, "wait")
    assert not first.settled and not again.settled  # the copy waits for the first copy's outcome
    publisher.answer()
    await engine.drain(time.monotonic() + 5)
    assert publisher.attempts == 1
    assert (first.acked, again.acked) == (1, 1)
    assert dict(engine.totals) == {"published": 1, "duplicate": 1}
    assert h.dedup.marked == {EVENT}


async def test_a_copy_publishes_when_the_first_copy_fails(executor: ThreadPoolExecutor) -> None:
    publisher = FakePublisher(failing=True)

    class Failed(FakeMessage):
        async def nak(self, delay: float | None = None) -> None:
            await super().nak(delay)
            publisher.failing = False  # the output heals after the first copy gave up

    settings = Settings(
        ingest=IngestSettings(batch_size=1),
        publish=PublishSettings(max_hold=0.2, retry_initial=0.01, retry_max=0.05, timeout=0.2),
    )
    h = harness(executor, publisher=publisher, settings=settings)
    template = message(seq=1)
    first = Failed(template.subject, template.data, seq=1)
    again = message(seq=2)
    engine = await h.run([first, again])
    assert first.naked == [1.0] and first.acked == 0  # handed back, not lost
    assert again.acked == 1
    assert [p.headers["Nats-Msg-Id"] for p in publisher.published] == [EVENT]  # stored once
    assert dict(engine.totals) == {"published": 1, "retried": 1}
    assert h.dedup.claims == {}  # the copy took over the claim; the marker replaced it
    assert h.dedup.marked == {EVENT}


async def test_a_failed_publish_releases_its_claim(executor: ThreadPoolExecutor) -> None:
    settings = Settings(publish=PublishSettings(max_hold=0.1, retry_initial=0.01, retry_max=0.05, timeout=0.1))
    h = harness(executor, publisher=FakePublisher(failing=True), settings=settings)
    msg = message()
    await h.run([msg])
    assert msg.naked == [1.0]
    await wait_until(lambda: h.dedup.released == [EVENT], 5, "claim released")
    assert h.dedup.claims == {}
    assert h.dedup.marked == set()


async def test_a_copy_looked_up_before_the_marker_was_written_is_a_duplicate(executor: ThreadPoolExecutor) -> None:
    """The second copy's lookup finds the first copy's claim, and it reaches the publisher only after the first copy
    was stored and marked: the table still knows the event, so it is not published again."""
    dedup = FakeDedupStore()
    marked = threading.Event()

    class Marking(FakeDedupStore):
        def mark(self, event_ids: Sequence[str]) -> bool:
            ok = dedup.mark(event_ids)
            marked.set()
            return ok

    store = Marking(marked=dedup.marked, claims=dedup.claims)
    calls = 0

    def wrap(prepare: Any) -> Any:
        def prepared(messages: Sequence[Any]) -> list[Outcome]:
            nonlocal calls
            calls += 1
            outcomes: list[Outcome] = prepare(messages)
            if calls == 2:  # the second copy: looked up now, handed to the loop after the marker is written
                assert marked.wait(5)
            return outcomes

        return prepared

    h = harness(executor, dedup=store, settings=ONE_BY_ONE, wrap=wrap)
    engine = await h.run([message(seq=1), message(seq=2)])
    assert h.publisher.attempts == 1
    assert dict(engine.totals) == {"published": 1, "duplicate": 1}


# ------------------------------------------------------------------------------------------------ other replicas


async def test_another_replicas_claim_is_waited_for_and_its_marker_acks_the_copy(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore(claims={EVENT: "replica-b"})
    h = harness(executor, dedup=dedup)
    engine = h.build()
    await engine.start()
    msg = message()
    await engine.on_message(msg)
    await wait_until(lambda: dedup.lookups >= 3, 5, "looked up again")
    assert not msg.settled
    dedup.mark([EVENT])  # replica b published and wrote its marker
    await engine.drain(time.monotonic() + 5)
    assert msg.acked == 1
    assert h.publisher.attempts == 0
    assert dict(engine.totals) == {"duplicate": 1}
    assert h.sample("cdc_consumer_copy_waits_total", {"holder": "other_replica"}) == 1
    assert h.sample("cdc_consumer_dedup_lookups_total", {"result": "held"}) == 1


async def test_a_released_or_expired_claim_is_taken_and_the_copy_published(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore(claims={EVENT: "replica-b"})
    h = harness(executor, dedup=dedup)
    engine = h.build()
    await engine.start()
    msg = message()
    await engine.on_message(msg)
    await wait_until(lambda: dedup.lookups >= 2, 5, "looked up again")
    del dedup.claims[EVENT]  # replica b's publish failed (released), or it died (expired)
    await engine.drain(time.monotonic() + 5)
    assert msg.acked == 1
    assert h.publisher.attempts == 1
    assert dict(engine.totals) == {"published": 1}
    assert dedup.marked == {EVENT}
    assert h.sample("cdc_consumer_unclaimed_publishes_total") == 0


async def test_a_copy_waiting_on_another_replica_is_handed_back_at_shutdown(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, dedup=FakeDedupStore(claims={EVENT: "replica-b"}))
    msg = message()
    engine = await h.run([msg], deadline=0.2)
    assert msg.naked == [None] and msg.acked == 0  # never dropped: another replica takes it at once
    assert h.publisher.attempts == 0
    assert engine.inflight == 0


async def test_two_replicas_sharing_redis_publish_each_copy_pair_once(executor: ThreadPoolExecutor) -> None:
    wire = FakePublisher()  # one server: attempts is what a core subscriber sees
    shared = FakeDedupStore()
    stores = [FakeDedupStore(marked=shared.marked, claims=shared.claims, token=t) for t in ("a", "b")]
    engines = [harness(executor, publisher=wire, dedup=store, settings=ONE_BY_ONE).build() for store in stores]
    for engine in engines:
        await engine.start()
    pairs = [
        (message(seq=2 * i, lsn=i, message_id=f"m{i}"), message(seq=2 * i + 1, lsn=i, message_id=f"m{i}"))
        for i in range(1, 41)
    ]
    for a, b in pairs:  # each copy to another replica, at the same moment
        await engines[0].on_message(a)
        await engines[1].on_message(b)
    await wait_until(lambda: all(m.settled for pair in pairs for m in pair), 10, "all settled")
    for engine in engines:
        await engine.drain(time.monotonic() + 5)
    assert wire.attempts == 40  # each event on the wire once
    assert len(wire.published) == 40
    assert all(m.acked == 1 for pair in pairs for m in pair)
    assert sum(e.totals["published"] for e in engines) == 40
    assert sum(e.totals["duplicate"] for e in engines) == 40
    assert shared.claims == {}


# ------------------------------------------------------------------------------------------------ without a claim


async def test_redis_down_publishes_unclaimed_and_counts_it(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, dedup=FakeDedupStore(down=True))
    msgs = [message(seq=i, lsn=i, message_id=f"m{i}") for i in range(1, 6)]
    engine = await h.run(msgs)
    assert engine.totals["published"] == 5
    assert h.sample("cdc_consumer_unclaimed_publishes_total") == 5


async def test_claims_off_looks_up_only(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore(claims_on=False)
    h = harness(executor, dedup=dedup, settings=Settings(dedup=DedupSettings(claim_ttl=0)))
    engine = await h.run([message(seq=1), message(seq=2)])  # still one replica's in-flight table
    assert h.publisher.attempts == 1
    assert dedup.claims == {}
    assert dict(engine.totals) == {"published": 1, "duplicate": 1}
    assert h.sample("cdc_consumer_unclaimed_publishes_total") == 1


async def test_the_claim_of_an_event_still_in_flight_is_renewed(executor: ThreadPoolExecutor) -> None:
    """A slow PubAck or a hold outlasting dedup.claim_ttl: the claim is renewed so copies elsewhere keep waiting."""
    publisher = Gated()
    settings = Settings(dedup=DedupSettings(claim_ttl=0.15), publish=PublishSettings(timeout=5.0))
    dedup = FakeDedupStore()
    h = harness(executor, publisher=publisher, dedup=dedup, settings=settings)
    engine = h.build()
    await engine.start()
    msg = message()
    await engine.on_message(msg)
    await wait_until(lambda: publisher.attempts == 1, 5, "sent")
    await wait_until(lambda: dedup.lookups >= 3, 5, "claim renewed while the PubAck is outstanding")
    assert dedup.claims == {EVENT: dedup.token}
    publisher.answer()
    await engine.drain(time.monotonic() + 5)
    assert msg.acked == 1
    assert dedup.claims == {} and dedup.marked == {EVENT}
