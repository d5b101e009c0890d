"""Worker and engine together, with the in-memory fakes, a real thread pool and the real asyncio loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest

from cdc_service.config import DlqSettings, HealthSettings, IngestSettings, PublishSettings, Settings
from cdc_service.core.correlation import request_id
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import Outcome
from cdc_service.ports import Claim, PubAck, PublishRejected
from cdc_service.testing import FakeDedupStore, FakeMessage, FakePublisher
from tests.sequin import body, encode
from tests.unit.pipeline_harness import chat_messages, harness, message, settled_once, wait_until

FAST_PUBLISH = PublishSettings(max_hold=0.3, retry_initial=0.01, retry_max=0.05, timeout=0.2)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-worker")
    yield pool
    pool.shutdown(wait=True)


class FailingFor(FakePublisher):
    """Fails every publish whose subject starts with ``prefix``; others behave like FakePublisher."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any
    ) -> asyncio.Future[PubAck]:
        self.failing = subject.startswith(self.prefix)
        return await super().publish(subject, payload, headers)


class Recovering(FakePublisher):
    """Fails until ``recover_after`` seconds after its first failed publish, flipped from ``loop.call_later``."""

    def __init__(self, recover_after: float) -> None:
        super().__init__(failing=True)
        self.recover_after = recover_after
        self.failures = 0
        self._scheduled = False

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any
    ) -> asyncio.Future[PubAck]:
        if self.failing:
            self.failures += 1
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_later(self.recover_after, setattr, self, "failing", False)
        return await super().publish(subject, payload, headers)


# ------------------------------------------------------------------------------------------------ happy path


async def test_every_message_settled_exactly_once(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, dedup=FakeDedupStore(marked={"7:chatdb:acme:agents:agent-1"}))
    msgs = [
        message("messages", seq=1),
        message("chats", seq=2),
        message("agents", seq=3, lsn=7),  # already marked in Redis
        message("contacts", seq=4),  # unrouted
        FakeMessage("cdc.acme.messages", b"not json", seq=5),  # poison
        message("agents", seq=6, lsn=8),
    ]
    engine = await h.run(msgs)
    assert all(settled_once(m) for m in msgs), [(m.acked, m.termed, m.naked) for m in msgs]
    assert [m.acked for m in msgs] == [1, 1, 1, 1, 0, 1]
    assert msgs[4].termed == 1
    assert engine.inflight == 0
    assert dict(engine.totals) == {"published": 3, "duplicate": 1, "skipped": 1, "dead_lettered": 1}
    assert h.published_ids == [
        "1000:chatdb:acme:messages:msg-1",
        "1000:chatdb:acme:chats:chat-1",
        "8:chatdb:acme:agents:agent-1",
    ]
    assert h.sample("cdc_consumer_inflight_messages") == 0


async def test_published_events_and_headers(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    msgs = [message("messages", seq=1), message("chats", seq=2), message("agents", seq=3)]
    await h.run(msgs)
    out = h.publisher.published
    assert [p.subject for p in out] == [
        "wa.acme.agent-1.messages.chat-1",
        "wa.acme.agent-1.chats",
        "wa.acme.agent-1.agents",
    ]
    for published, msg in zip(out, msgs, strict=True):
        payload = orjson.loads(published.payload)
        assert published.headers == {
            "Nats-Msg-Id": payload["event_id"],
            "Nats-Expected-Stream": "wa_stream",
            "X-Request-ID": request_id(payload["event_id"]),
        }
        assert payload["row_data"] == orjson.loads(msg.data)["record"]
        assert msg.acked == 1


async def test_traceparent_passes_through_when_well_formed(executor: ThreadPoolExecutor) -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced, forged = message(seq=1), message(seq=2, lsn=7, message_id="other")
    traced.headers = {"traceparent": trace}
    forged.headers = {"traceparent": "00-not-a-trace\r\nX-Evil: 1"}
    h = harness(executor)
    await h.run([traced, forged])
    out = h.publisher.published
    assert out[0].headers["traceparent"] == trace
    assert "traceparent" not in out[1].headers and "X-Evil" not in out[1].headers
    assert out[0].headers["X-Request-ID"] != out[1].headers["X-Request-ID"]


async def test_expected_stream_follows_settings(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, settings=Settings(publish=PublishSettings(stream="other_out")))
    await h.run([message()])
    assert h.publisher.published[0].headers["Nats-Expected-Stream"] == "other_out"


async def test_order_of_one_chat_across_batches(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, settings=Settings(ingest=IngestSettings(batch_size=4)))
    msgs = chat_messages(30)
    await h.run(msgs)
    ids = [orjson.loads(p.payload)["message_id"] for p in h.publisher.published]
    assert ids == [f"msg-{i}" for i in range(30)]
    assert all(m.acked == 1 for m in msgs)
    assert h.sample("cdc_consumer_batch_size_count") == 8  # 7 full batches of 4 and one of 2


async def test_order_survives_batches_prepared_out_of_order(executor: ThreadPoolExecutor) -> None:
    """The first batch is held in its worker until the last batch is prepared: publishing must still follow receipt."""
    msgs = chat_messages(12)
    last_done = threading.Event()
    gate = {"waited": False}

    def wrap(prepare: Any) -> Any:
        def gated(batch: Sequence[Any]) -> list[Outcome]:
            if batch[0] is msgs[0]:
                gate["waited"] = last_done.wait(5.0)
            outcomes: list[Outcome] = prepare(batch)
            if batch[-1] is msgs[-1]:
                last_done.set()
            return outcomes

        return gated

    h = harness(executor, settings=Settings(ingest=IngestSettings(batch_size=4)), wrap=wrap)
    await h.run(msgs)
    assert gate["waited"] is True
    assert [orjson.loads(p.payload)["message_id"] for p in h.publisher.published] == [f"msg-{i}" for i in range(12)]


async def test_interleaved_chats_keep_receipt_order(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, settings=Settings(ingest=IngestSettings(batch_size=3)))
    msgs = [
        message(seq=i + 1, lsn=2000 + i, message_id=f"m{i}", chat_id=f"chat-{i % 3}", agent_id=f"agent-{i % 2}")
        for i in range(20)
    ]
    await h.run(msgs)
    assert h.published_ids == [f"{2000 + i}:chatdb:acme:messages:m{i}" for i in range(20)]
    assert [p.subject for p in h.publisher.published] == [
        f"wa.acme.agent-{i % 2}.messages.chat-{i % 3}" for i in range(20)
    ]


async def test_pull_batches(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, settings=Settings(ingest=IngestSettings(mode="pull")))
    engine = h.build()
    await engine.start()
    first, second = chat_messages(5), chat_messages(5, start=5, seq0=6)
    await engine.on_batch(list(first))
    await engine.on_batch(list(second))
    await engine.drain(h.clock.monotonic() + 5)
    assert len(h.publisher.published) == 10
    assert all(m.acked == 1 for m in first + second)
    assert h.sample("cdc_consumer_batch_size_count") == 2


# ------------------------------------------------------------------------------------------------ duplicates


async def test_redis_marked_event_is_acked_as_duplicate(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore(marked={"1000:chatdb:acme:messages:msg-1"})
    h = harness(executor, dedup=dedup)
    marked, fresh = message(seq=1), message(seq=2, lsn=1001, message_id="msg-2")
    engine = await h.run([marked, fresh])
    assert (marked.acked, marked.termed, marked.naked) == (1, 0, [])
    assert h.published_ids == ["1001:chatdb:acme:messages:msg-2"]
    assert engine.totals["duplicate"] == 1
    assert h.events("messages", "duplicate") == 1
    assert h.events("messages", "published") == 1
    assert h.sample("cdc_consumer_dedup_lookups_total", {"result": "hit"}) == 1
    assert h.sample("cdc_consumer_dedup_lookups_total", {"result": "miss"}) == 1


@pytest.mark.parametrize("batch_size", [256, 1])
async def test_same_event_twice_is_published_once(executor: ThreadPoolExecutor, batch_size: int) -> None:
    h = harness(executor, settings=Settings(ingest=IngestSettings(batch_size=batch_size)))
    first, again = message(seq=1), message(seq=2)  # a redelivery under a new stream sequence
    engine = await h.run([first, again])
    assert h.published_ids == ["1000:chatdb:acme:messages:msg-1"]
    assert (first.acked, again.acked) == (1, 1)
    assert (first.termed, again.termed, first.naked, again.naked) == (0, 0, [], [])
    assert dict(engine.totals) == {"published": 1, "duplicate": 1}
    assert h.events("messages", "published") == 1
    assert h.events("messages", "duplicate") == 1


async def test_commit_idx_keeps_two_changes_of_one_row(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    a, b = message(seq=1, idx=0), message(seq=2, idx=1, action="update")
    await h.run([a, b])
    assert h.published_ids == ["1000.0:chatdb:acme:messages:msg-1", "1000.1:chatdb:acme:messages:msg-1"]


async def test_redis_down_fails_open(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore(down=True)
    h = harness(executor, dedup=dedup, settings=Settings(ingest=IngestSettings(batch_size=4)))
    msgs = chat_messages(10)
    engine = await h.run(msgs)
    assert h.published_ids == [f"{1000 + i}:chatdb:acme:messages:msg-{i}" for i in range(10)]
    assert all(m.acked == 1 for m in msgs)
    assert engine.totals["published"] == 10
    assert h.sample("cdc_consumer_dedup_lookups_total", {"result": "error"}) == 10
    assert h.sample("cdc_consumer_dedup_lookups_total", {"result": "miss"}) == 0
    assert h.sample("cdc_consumer_dedup_mark_errors_total") == 10
    assert dedup.marked == set()


async def test_markers_only_for_published_events(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore()
    h = harness(executor, dedup=dedup)
    msgs = [
        message("messages", seq=1),
        message("contacts", seq=2),
        FakeMessage("cdc.acme.chats", b"{", seq=3),
        message("chats", seq=4, agent_id="bad agent"),
        message("agents", seq=5),
    ]
    await h.run(msgs)
    assert dedup.marked == {"1000:chatdb:acme:messages:msg-1", "1000:chatdb:acme:agents:agent-1"}
    assert dedup.marked == set(h.published_ids)
    assert h.sample("cdc_consumer_dedup_mark_errors_total") == 0


async def test_no_markers_when_publishing_fails(executor: ThreadPoolExecutor) -> None:
    dedup = FakeDedupStore()
    h = harness(executor, dedup=dedup, publisher=FakePublisher(failing=True), settings=Settings(publish=FAST_PUBLISH))
    await h.run(chat_messages(3))
    assert dedup.marked == set()
    assert dedup.marks == 0


# ------------------------------------------------------------------------------------------------ dead letters


@pytest.mark.parametrize(
    ("subject", "data", "reason"),
    [
        ("cdc.acme.messages", b"garbage", "invalid_json"),
        ("cdc.acme.messages", encode(body(agent_id="a.b")), "invalid_subject_token"),
        ("cdc.acme.chats", encode(body("chats", company_id="other")), "tenant_mismatch"),
        ("cdc.acme.agents", encode({"record": {"agent_id": "a"}, "action": "insert"}), "missing_field"),
        ("cdc.acme.x.messages", b"{}", "invalid_subject"),
    ],
)
async def test_poison_goes_to_dlq_and_is_terminated(
    executor: ThreadPoolExecutor, subject: str, data: bytes, reason: str
) -> None:
    h = harness(executor)
    poison = FakeMessage(subject, data, seq=41, delivered=2)
    engine = await h.run([poison])
    assert (poison.termed, poison.acked, poison.naked) == (1, 0, [])
    [dead] = h.publisher.published
    assert dead.subject == f"dlq.{subject}"
    assert dead.payload == data  # the original bytes
    assert dead.headers["Cdc-Error-Reason"] == reason
    assert dead.headers["Nats-Msg-Id"] == "dlq:cdc_events_stream:41"
    assert dead.headers["Nats-Expected-Stream"] == "cdc_dlq_stream"
    assert dead.headers["Cdc-Source-Subject"] == subject
    assert dead.headers["Cdc-Source-Stream"] == "cdc_events_stream"
    assert dead.headers["Cdc-Source-Seq"] == "41"
    assert dead.headers["Cdc-Delivered"] == "2"
    detail = dead.headers["Cdc-Error-Detail"]
    assert detail and detail.isprintable() and len(detail) <= 300
    assert engine.totals == {"dead_lettered": 1}
    assert h.sample("cdc_consumer_dead_letters_total", {"reason": reason}) == 1


async def test_poison_detail_header_is_printable(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    poison = FakeMessage("cdc.acme.messages", encode(body(action="in\nsert\x00")), seq=3)
    await h.run([poison])
    [dead] = h.publisher.published
    assert dead.headers["Cdc-Error-Reason"] == "invalid_shape"
    assert dead.headers["Cdc-Error-Detail"].isprintable()


async def test_redelivered_poison_is_dead_lettered_once(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    first, again = (
        FakeMessage("cdc.acme.messages", b"x", seq=9),
        FakeMessage("cdc.acme.messages", b"x", seq=9, delivered=2),
    )
    await h.run([first, again])
    assert len(h.publisher.published) == 1
    assert (first.termed, again.termed) == (1, 1)


async def test_dlq_disabled_terminates_without_publishing(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, settings=Settings(dlq=DlqSettings(enabled=False)))
    poison, good = FakeMessage("cdc.acme.messages", b"[", seq=1), message(seq=2)
    engine = await h.run([poison, good])
    assert (poison.termed, poison.acked, poison.naked) == (1, 0, [])
    assert h.published_ids == ["1000:chatdb:acme:messages:msg-1"]
    assert [p.subject for p in h.publisher.published] == ["wa.acme.agent-1.messages.chat-1"]
    assert engine.totals == {"dead_lettered": 1, "published": 1}
    assert h.sample("cdc_consumer_dead_letters_total", {"reason": "invalid_json"}) == 1


async def test_dlq_prefix_follows_settings(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, settings=Settings(dlq=DlqSettings(subject_prefix="dead.letters", stream="dl")))
    await h.run([FakeMessage("cdc.acme.chats", b"", seq=1)])
    [dead] = h.publisher.published
    assert dead.subject == "dead.letters.cdc.acme.chats"
    assert dead.headers["Nats-Expected-Stream"] == "dl"


# ------------------------------------------------------------------------------------------------ failing output


async def test_failing_publisher_naks_and_publishes_nothing(executor: ThreadPoolExecutor) -> None:
    publisher = FakePublisher(failing=True)
    h = harness(executor, publisher=publisher, settings=Settings(publish=FAST_PUBLISH))
    msgs = [*chat_messages(3), message("chats", seq=10)]
    engine = await h.run(msgs)
    assert publisher.published == []
    assert publisher.attempts > len(msgs)  # retried while holding
    for m in msgs:
        assert (m.acked, m.termed) == (0, 0)
        assert m.naked == [1.0]  # retry_delay of the first delivery
    assert engine.totals == {"retried": 4}
    assert h.events("messages", "retried") == 3
    assert h.events("chats", "retried") == 1
    assert h.sample("cdc_consumer_publish_errors_total") >= 4


async def test_failing_publisher_later_delivery_waits_longer(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, publisher=FakePublisher(failing=True), settings=Settings(publish=FAST_PUBLISH))
    msg = message(delivered=2)
    await h.run([msg])
    assert msg.naked == [2.0]


async def test_final_attempt_publish_failure_is_dead_lettered(executor: ThreadPoolExecutor) -> None:
    publisher = FailingFor("wa.")
    h = harness(executor, publisher=publisher, settings=Settings(publish=FAST_PUBLISH))
    final, earlier = message(seq=7, delivered=3), message("chats", seq=8, delivered=1)
    engine = await h.run([final, earlier])
    assert (final.termed, final.acked, final.naked) == (1, 0, [])
    assert (earlier.termed, earlier.acked, earlier.naked) == (0, 0, [1.0])
    [dead] = publisher.published
    assert dead.subject == "dlq.cdc.acme.messages"
    assert dead.payload == final.data
    assert dead.headers["Cdc-Error-Reason"] == "max_deliveries"
    assert dead.headers["Cdc-Delivered"] == "3"
    assert dead.headers["Nats-Msg-Id"] == "dlq:cdc_events_stream:7"
    assert engine.totals == {"dead_lettered": 1, "retried": 1}
    assert h.sample("cdc_consumer_dead_letters_total", {"reason": "max_deliveries"}) == 1


async def test_unlimited_deliveries_never_dead_letter(executor: ThreadPoolExecutor) -> None:
    publisher = FailingFor("wa.")
    settings = Settings(publish=FAST_PUBLISH, ingest=IngestSettings(max_deliver=-1))
    h = harness(executor, publisher=publisher, settings=settings)
    msg = message(delivered=50)
    await h.run([msg])
    assert publisher.published == []
    assert (msg.termed, msg.acked, msg.naked) == (0, 0, [30.0])


async def test_final_delivery_is_held_while_the_dlq_fails_and_handed_back_at_shutdown(
    executor: ThreadPoolExecutor,
) -> None:
    publisher = FailingFor("dlq.")
    h = harness(executor, publisher=publisher, settings=Settings(publish=FAST_PUBLISH))
    engine = h.build()
    await engine.start()
    poison, good = FakeMessage("cdc.acme.messages", b"nope", seq=1, delivered=3), message(seq=2)
    await engine.on_message(poison)
    await engine.on_message(good)
    # it keeps trying the dead-letter stream, while the event after it goes through
    await wait_until(lambda: publisher.attempts > 4 and good.acked == 1, timeout=5, what="dead letter retried")
    assert poison.termed == 0 and poison.acked == 0 and poison.naked == []
    await engine.drain(h.clock.monotonic())  # the deadline has passed: hand back what is held
    assert poison.termed == 0 and poison.acked == 0
    assert poison.naked == [None]  # only at shutdown, without delay, for another replica
    assert h.published_ids == ["1000:chatdb:acme:messages:msg-1"]
    assert good.acked == 1


async def test_a_dead_letter_waits_outside_the_output_gate_while_the_dlq_fails(executor: ThreadPoolExecutor) -> None:
    """Issue 17 item 4: the poison's dead letter is held on its own; the events after it are not held behind it."""
    publisher = FailingFor("dlq.")
    # a hold through the output gate would keep the batches behind the poison waiting for max_hold (30 s)
    long_hold = PublishSettings(max_hold=30, retry_initial=0.01, retry_max=0.05, timeout=0.2)
    h = harness(
        executor, publisher=publisher, settings=Settings(publish=long_hold, ingest=IngestSettings(batch_size=1))
    )
    engine = h.build()
    await engine.start()
    poison = FakeMessage("cdc.acme.messages", b"nope", seq=1, delivered=1)
    good = [message(seq=i, lsn=i, message_id=f"m{i}") for i in range(2, 40)]
    await engine.on_message(poison)
    await wait_until(lambda: publisher.attempts >= 3, what="the dead letter retried")  # its stream is failing
    for msg in good:
        await engine.on_message(msg)
    await wait_until(lambda: all(m.acked == 1 for m in good), timeout=5, what="events after the poison acked")
    assert poison.termed == 0 and poison.naked == []  # still held, the dead-letter stream still failing
    await engine.drain(h.clock.monotonic())
    assert poison.termed == 0 and poison.naked == [None]  # handed back at shutdown, at once
    assert publisher.attempts > 3 + len(good)  # the dead letter was retried meanwhile


class Refusing(FakePublisher):
    """Refuses publishes to ``subject`` with a JetStream error, like a stream whose per-subject limit is reached."""

    def __init__(self, subject: str, detail: str, code: int) -> None:
        super().__init__()
        self.subject, self.detail, self.code = subject, detail, code
        self.refusals = 0

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any
    ) -> asyncio.Future[PubAck]:
        if subject != self.subject:
            return await super().publish(subject, payload, headers)
        self.refusals += 1
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        future.set_exception(PublishRejected(f"{self.detail} (code {self.code})", self.code))
        return future


async def test_a_permanent_refusal_is_dead_lettered_at_once(executor: ThreadPoolExecutor) -> None:
    """Issue 17 item 5: error 10077 'maximum messages per subject exceeded' is not an outage: no hold, no retry."""
    refused = message(seq=1, lsn=1, message_id="m1", chat_id="c1")
    subject = "wa.acme.agent-1.messages.c1"
    publisher = Refusing(subject, "maximum messages per subject exceeded", 10077)
    # a long max_hold: holding the refusal would show as a drain that runs into its deadline
    h = harness(executor, publisher=publisher, settings=Settings(publish=PublishSettings(max_hold=30, timeout=0.2)))
    others = [message(seq=i, lsn=i, message_id=f"m{i}", chat_id="c2") for i in range(2, 6)]
    started = time.monotonic()
    engine = await h.run([refused, *others], deadline=20)
    assert time.monotonic() - started < 10
    assert publisher.refusals == 1
    assert refused.termed == 1 and refused.naked == []
    [dead] = [p for p in publisher.published if p.subject.startswith("dlq.")]
    assert dead.headers["Cdc-Error-Reason"] == "output_rejected"
    assert "per subject" in dead.headers["Cdc-Error-Detail"]
    assert all(m.acked == 1 for m in others)
    assert engine.totals == {"dead_lettered": 1, "published": 4}


async def test_a_full_output_stream_is_still_an_outage(executor: ThreadPoolExecutor) -> None:
    """'maximum messages exceeded' (discard=new on a full stream) clears as messages age out: hold and nak."""
    msg = message(seq=1, lsn=1, message_id="m1", chat_id="c1")
    publisher = Refusing("wa.acme.agent-1.messages.c1", "maximum messages exceeded", 10077)
    h = harness(executor, publisher=publisher, settings=Settings(publish=FAST_PUBLISH))
    await h.run([msg])
    assert publisher.refusals > 1 and msg.termed == 0 and len(msg.naked) == 1
    assert not [p for p in publisher.published if p.subject.startswith("dlq.")]


async def test_final_delivery_keeps_its_reason_when_the_dlq_recovers(executor: ThreadPoolExecutor) -> None:
    publisher = Recovering(recover_after=0.1)
    h = harness(
        executor,
        publisher=publisher,
        settings=Settings(publish=PublishSettings(max_hold=0.05, retry_initial=0.01, retry_max=0.02, timeout=0.2)),
    )
    poison = FakeMessage("cdc.acme.messages", b"nope", seq=7, delivered=3)
    await h.run([poison])
    assert poison.termed == 1 and poison.naked == []
    [dead] = publisher.published
    assert dead.subject == "dlq.cdc.acme.messages"
    assert dead.headers["Cdc-Error-Reason"] == "invalid_json"


async def test_an_event_too_large_for_the_server_is_dead_lettered(executor: ThreadPoolExecutor) -> None:
    publisher = FakePublisher(max_payload=1200)
    h = harness(executor, publisher=publisher)
    big, small = message(seq=1, lsn=1, body={"text": "x" * 2000}), message(seq=2, lsn=2, message_id="m2")
    await h.run([big, small])
    assert big.termed == 1 and big.acked == 0
    assert [p.headers.get("Cdc-Error-Reason") for p in publisher.published] == ["payload_too_large", None]
    assert small.acked == 1


async def test_publisher_recovers_and_publishes_each_event_once(executor: ThreadPoolExecutor) -> None:
    publisher = Recovering(recover_after=0.1)
    settings = Settings(
        ingest=IngestSettings(batch_size=4),
        publish=PublishSettings(max_hold=5.0, retry_initial=0.01, retry_max=0.05, timeout=0.2),
    )
    h = harness(executor, publisher=publisher, settings=settings)
    msgs = [*chat_messages(10), message("agents", seq=50)]
    engine = await h.run(msgs)
    assert publisher.failures >= 1
    assert publisher.failing is False
    assert sorted(h.published_ids) == sorted(
        [f"{1000 + i}:chatdb:acme:messages:msg-{i}" for i in range(10)] + ["1000:chatdb:acme:agents:agent-1"]
    )
    assert len(set(h.published_ids)) == len(h.published_ids) == 11
    assert all(m.acked == 1 and m.naked == [] and m.termed == 0 for m in msgs)
    assert engine.totals == {"published": 11}
    assert h.events("messages", "published") == 10
    assert h.events("agents", "published") == 1
    assert h.sample("cdc_consumer_publish_errors_total") >= 1
    assert h.dedup.marked == set(h.published_ids)


@pytest.mark.parametrize("attempt", range(5))
async def test_order_is_kept_when_the_output_recovers(executor: ThreadPoolExecutor, attempt: int) -> None:
    publisher = Recovering(recover_after=0.05 + attempt * 0.02)
    settings = Settings(
        ingest=IngestSettings(batch_size=4),
        publish=PublishSettings(max_hold=5.0, retry_initial=0.01, retry_max=0.03, timeout=0.2),
    )
    h = harness(executor, publisher=publisher, settings=settings)
    await h.run(chat_messages(40))
    assert publisher.failures >= 1
    assert h.published_ids == [f"{1000 + i}:chatdb:acme:messages:msg-{i}" for i in range(40)]


async def test_lost_puback_retry_counts_as_duplicate(executor: ThreadPoolExecutor) -> None:
    """A publish stored by the server whose PubAck was lost is retried with the same Msg-Id: stored once."""

    class LosesFirstAck(FakePublisher):
        lost = False

        async def publish(
            self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any
        ) -> asyncio.Future[PubAck]:
            future = await super().publish(subject, payload, headers)
            if not self.lost:
                self.lost = True
                return asyncio.get_running_loop().create_future()  # never resolves
            return future

    publisher = LosesFirstAck()
    h = harness(executor, publisher=publisher, settings=Settings(publish=FAST_PUBLISH))
    msg = message()
    engine = await h.run([msg])
    assert h.published_ids == ["1000:chatdb:acme:messages:msg-1"]
    assert msg.acked == 1
    assert engine.totals == {"duplicate": 1}


async def test_held_messages_are_kept_alive(executor: ThreadPoolExecutor) -> None:
    settings = Settings(
        ingest=IngestSettings(ack_wait=0.15),  # keep-alive every 0.05 s
        publish=PublishSettings(max_hold=0.4, retry_initial=0.01, retry_max=0.05, timeout=0.2),
    )
    h = harness(executor, publisher=FakePublisher(failing=True), settings=settings)
    engine = h.build()
    await engine.start()
    msg = message()
    await engine.on_message(msg)
    # max_hold runs on the engine's clock: the hold lasts until the test moves it, however slow the machine is
    await wait_until(lambda: msg.in_progress_count >= 1, timeout=5, what="a keep-alive of the held message")
    assert msg.naked == []
    h.clock.advance(1.0)
    await wait_until(lambda: msg.naked, timeout=5, what="the hold to give up")
    await engine.drain(h.clock.monotonic() + 5)
    assert msg.naked == [1.0]


async def test_drain_deadline_hands_back_held_work_at_once(executor: ThreadPoolExecutor) -> None:
    settings = Settings(publish=PublishSettings(max_hold=60.0, retry_initial=0.01, retry_max=0.05, timeout=0.2))
    h = harness(executor, publisher=FakePublisher(failing=True), settings=settings)
    msgs = chat_messages(3)
    started = time.monotonic()
    engine = await h.run(msgs, deadline=0.3)
    assert time.monotonic() - started < 3.0
    assert all(m.naked == [None] and m.acked == 0 for m in msgs)  # no delay: another replica takes it now
    assert engine.inflight == 0


# ------------------------------------------------------------------------------------------------ bugs in our code


async def test_a_failing_batch_is_retried_and_the_loop_keeps_going(executor: ThreadPoolExecutor) -> None:
    class BrokenOnce(FakeDedupStore):
        broken = True

        def claim(self, event_ids: Sequence[str]) -> list[Claim] | None:
            if self.broken:
                self.broken = False
                raise RuntimeError("boom")
            return super().claim(event_ids)

    h = harness(executor, dedup=BrokenOnce(), settings=Settings(ingest=IngestSettings(batch_size=2)))
    msgs = chat_messages(4)
    engine = await h.run(msgs)
    assert [m.naked for m in msgs[:2]] == [[1.0], [1.0]]
    assert [m.acked for m in msgs] == [0, 0, 1, 1]
    assert h.published_ids == ["1002:chatdb:acme:messages:msg-2", "1003:chatdb:acme:messages:msg-3"]
    assert engine.totals == {"retried": 2, "published": 2}
    assert h.sample("cdc_consumer_handler_errors_total", {"exception_type": "RuntimeError"}) == 1


async def test_a_bug_in_plan_naks_only_that_message(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = EventBuilder.plan

    def plan(self: EventBuilder, subject: str, data: bytes, parser: Any) -> Outcome:
        if b"msg-1" in data:
            raise KeyError("bug")
        return original(self, subject, data, parser)

    monkeypatch.setattr(EventBuilder, "plan", plan)
    h = harness(executor)
    msgs = chat_messages(3)
    await h.run(msgs)
    assert [m.naked for m in msgs] == [[], [1.0], []]
    assert [m.acked for m in msgs] == [1, 0, 1]
    assert h.events("messages", "retried") == 1
    assert h.sample("cdc_consumer_handler_errors_total", {"exception_type": "KeyError"}) == 1


async def test_a_bug_on_the_final_attempt_is_dead_lettered(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def plan(self: EventBuilder, subject: str, data: bytes, parser: Any) -> Outcome:
        raise ValueError("bug")

    monkeypatch.setattr(EventBuilder, "plan", plan)
    h = harness(executor)
    msg = message(delivered=3, seq=5)
    await h.run([msg])
    assert (msg.termed, msg.acked, msg.naked) == (1, 0, [])
    [dead] = h.publisher.published
    assert dead.headers["Cdc-Error-Reason"] == "max_deliveries"


# ------------------------------------------------------------------------------------------------ metrics


async def test_event_metrics_match_totals(executor: ThreadPoolExecutor) -> None:
    h = harness(executor, dedup=FakeDedupStore(marked={"5:chatdb:acme:chats:chat-1"}))
    msgs = [
        *chat_messages(4),
        message("chats", seq=20, lsn=5),
        message("chats", seq=21, lsn=6),
        message("agents", seq=22),
        message("contacts", seq=23),
        message("contacts", seq=24),
        FakeMessage("cdc.acme.agents", b"{]", seq=25),
        FakeMessage("cdc.acme.messages", b"[]", seq=26),
    ]
    engine = await h.run(msgs)
    expected = {
        ("messages", "published"): 4,
        ("chats", "duplicate"): 1,
        ("chats", "published"): 1,
        ("agents", "published"): 1,
        ("<other>", "skipped"): 2,  # unrouted tables share one label
        ("agents", "dead_lettered"): 1,
        ("messages", "dead_lettered"): 1,
    }
    for (table, result), count in expected.items():
        assert h.events(table, result) == count, (table, result)
    assert h.events("messages", "retried") == 0
    assert sum(engine.totals.values()) == len(msgs)
    assert dict(engine.totals) == {"published": 6, "duplicate": 1, "skipped": 2, "dead_lettered": 2}
    assert h.sample("cdc_consumer_processing_seconds_count", {"table": "messages"}) == 4
    assert h.sample("cdc_consumer_processing_seconds_count", {"table": "<other>"}) == 2
    assert h.sample("cdc_consumer_lag_seconds_count") == 6
    assert h.sample("cdc_consumer_redeliveries_total") == 0
    assert h.sample("cdc_consumer_last_ack_timestamp_seconds") > 0


async def test_redeliveries_are_counted(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    await h.run(
        [message(seq=1, delivered=2), message("chats", seq=2, delivered=1), message("agents", seq=3, delivered=3)]
    )
    assert h.sample("cdc_consumer_redeliveries_total") == 2


async def test_nothing_to_drain(executor: ThreadPoolExecutor) -> None:
    h = harness(executor)
    engine = await h.run([])
    assert engine.inflight == 0
    assert h.publisher.published == []
    assert not engine.stalled()


async def test_a_dead_letter_too_large_for_the_server_is_cut_to_fit(executor: ThreadPoolExecutor) -> None:
    publisher = FakePublisher(max_payload=1500)
    h = harness(executor, publisher=publisher)
    poison = FakeMessage("cdc.acme.messages", b"x" * 1400, seq=3)
    await h.run([poison])
    [dead] = publisher.published
    header_bytes = 12 + sum(len(k) + len(v) + 4 for k, v in dead.headers.items())
    assert len(dead.payload) + header_bytes <= 1500
    assert dead.headers["Cdc-Body-Truncated"] == "1400"
    assert dead.payload == b"x" * len(dead.payload)
    assert poison.termed == 1


async def test_a_hold_is_not_a_stall(executor: ThreadPoolExecutor) -> None:
    publisher = FakePublisher(failing=True)
    settings = Settings(
        publish=PublishSettings(max_hold=0.5, retry_initial=0.01, retry_max=0.02, timeout=0.1),
        health=HealthSettings(stall_timeout=0.01),
    )
    h = harness(executor, publisher=publisher, settings=settings)
    engine = h.build()
    await engine.start()
    await engine.on_message(message(seq=1))
    await engine.on_message(message(seq=2, lsn=2, message_id="m2"))
    # The hold lasts max_hold on the engine's clock, which only the test moves: it cannot end before it is seen.
    await wait_until(lambda: engine.output.holds == 1, timeout=5, what="the hold to begin")
    assert engine.stalled(h.clock.monotonic() + 60) is False
    h.clock.advance(1.0)  # past max_hold: the hold gives up and naks
    await wait_until(lambda: engine.output.holds == 0, timeout=5, what="the hold to give up")
    await engine.drain(h.clock.monotonic() + 5)
    assert engine.inflight == 0


async def test_pending_work_with_no_progress_is_a_stall(executor: ThreadPoolExecutor) -> None:
    """The other side of the stall guard: work pending, no hold, nothing settled for stall_timeout."""
    publisher = Gated()
    h = harness(executor, publisher=publisher, settings=Settings(health=HealthSettings(stall_timeout=30)))
    engine = h.build()
    await engine.start()
    await engine.on_message(message())
    engine.batcher.flush()
    await wait_until(lambda: publisher.attempts == 1, timeout=5, what="the publish to be sent")
    assert engine.stalled() is False
    h.clock.advance(31)
    assert engine.stalled() is True
    publisher.release.set()
    await engine.drain(h.clock.monotonic() + 5)
    assert engine.inflight == 0 and not engine.stalled()


class Gated(FakePublisher):
    """Answers publishes only once ``release`` is set, like an output that is slow to acknowledge."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any
    ) -> asyncio.Future[PubAck]:
        answer = await super().publish(subject, payload, headers)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()

        async def later() -> None:
            await self.release.wait()
            future.set_result(answer.result())

        _pending.add(asyncio.ensure_future(later()))
        return future


_pending: set[asyncio.Future[None]] = set()


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_intake_waits_while_the_in_flight_bytes_are_at_their_bound(
    executor: ThreadPoolExecutor, mode: str
) -> None:
    """max_ack_pending bounds messages, not bytes: large rows must not run the service out of memory (issue 17)."""
    publisher = Gated()
    settings = Settings(
        ingest=IngestSettings(max_inflight_mb=1, batch_size=1),
        publish=PublishSettings(timeout=30, max_hold=30),
    )
    h = harness(executor, publisher=publisher, settings=settings)
    engine = h.build()
    await engine.start()
    big = [message(seq=i, lsn=i, message_id=f"m{i}", body={"text": "x" * 700_000}) for i in range(1, 4)]
    feed = engine.on_batch if mode == "pull" else (lambda msgs: engine.on_message(msgs[0]))
    await asyncio.wait_for(feed([big[0]]), 5)  # 0.7 MB in flight: room for more
    second = asyncio.ensure_future(feed([big[1]]))  # 1.4 MB: at the bound, intake waits
    # polling yields to the loop many times: an unbounded intake would have returned by then
    await wait_until(lambda: engine.inflight_bytes >= 1024 * 1024, what="second message in flight")
    assert not second.done()
    publisher.release.set()
    await asyncio.wait_for(second, 10)
    await asyncio.wait_for(feed([big[2]]), 10)
    await engine.drain(h.clock.monotonic() + 10)
    assert all(m.acked == 1 for m in big)
    assert engine.inflight_bytes == 0
