"""Fast-ingest batch publishing (``publish.fast_batch``) against real nats-server: the adapter's contract (one future
per event, resolved from batch answers), its composition with ``Nats-Msg-Id`` and the engine's hold-and-retry rule
(a failed event is retried with the same id, in order), faults (restart mid-batch, a refusing stream, lost answers),
and the fall back to one-by-one publishing where the server or stream cannot take batches."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig

from cdc_service.adapters.nats_fast_batch import FastBatchPublisher, choose_publisher, enable_fast_batch
from cdc_service.adapters.nats_jetstream import PipelinedPublisher
from cdc_service.config import Settings
from cdc_service.core.outcomes import is_permanent_rejection
from cdc_service.ports import PubAck, PublishRejected
from tests.integration.helpers import (
    DLQ,
    OUTPUT,
    consumer_settled,
    count,
    ensure_input,
    feed,
    payloads,
    read_all,
    wait_until,
)
from tests.sequin import body
from tests.servers import NatsServer, free_port

pytestmark = pytest.mark.integration

Event = tuple[str, bytes, dict[str, str]]


def events(first: int, last: int) -> list[Event]:
    return [
        (f"wa.acme.{i % 3}", f'{{"n":{i}}}'.encode(), {"Nats-Msg-Id": f"e{i}", "Nats-Expected-Stream": OUTPUT})
        for i in range(first, last + 1)
    ]


async def output_stream(js: JetStreamContext, **config: Any) -> None:
    await js.add_stream(StreamConfig(name=OUTPUT, subjects=["wa.>"], duplicate_window=120, **config))


async def publish_all(publisher: Any, batch: Sequence[Event]) -> list[asyncio.Future[PubAck]]:
    """Publish back to back without yielding, like the engine's send loop for one batch."""
    return [await publisher.publish(subject, data, headers) for subject, data, headers in batch]


async def settle(futures: list[asyncio.Future[PubAck]], timeout: float = 5.0) -> list[PubAck | BaseException | None]:
    """Each future's result, exception, or None if it had no answer within ``timeout`` (as publish.timeout)."""
    await asyncio.wait(futures, timeout=timeout)
    return [(f.exception() or f.result()) if f.done() else None for f in futures]


async def stored_ids(js: JetStreamContext) -> list[str]:
    return [m.headers["Nats-Msg-Id"] for m in await read_all(js, OUTPUT)]


async def retry_until_stored(publisher: Any, batch: list[Event], rounds: int = 20) -> None:
    """The engine's hold: publish what failed again, in order, with the same ids, until every event is confirmed."""
    for _ in range(rounds):
        results = await settle(await publish_all(publisher, batch), timeout=2.0)
        batch = [e for e, r in zip(batch, results, strict=True) if not isinstance(r, PubAck)]
        if not batch:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(batch)} events still failing")


@pytest.fixture
async def publisher(nc: Client, js: JetStreamContext) -> AsyncIterator[FastBatchPublisher]:
    await output_stream(js)
    assert await enable_fast_batch(nc, js, OUTPUT) == ""
    publisher = FastBatchPublisher(nc)
    await publisher.start()
    yield publisher


async def test_a_backlog_is_stored_once_in_order_with_one_answer_per_many_events(publisher, js) -> None:
    replies = 0
    answer = publisher._on_reply

    async def counting(msg: Any) -> None:
        nonlocal replies
        replies += 1
        await answer(msg)

    publisher._sub._cb = counting
    batch = events(1, 600)
    results = await settle(await publish_all(publisher, batch))
    assert all(isinstance(r, PubAck) for r in results), [r for r in results if not isinstance(r, PubAck)][:3]
    assert await stored_ids(js) == [f"e{i}" for i in range(1, 601)]
    assert replies <= 10  # instead of 600 PubAcks: flow acks and one PubAck per batch of up to 1024
    assert (await js.stream_info(OUTPUT)).config.allow_batched


async def test_a_repeated_msg_id_inside_a_batch_is_dropped_by_the_stream_and_confirms_its_event(publisher, js) -> None:
    batch = events(1, 5)
    batch.insert(3, batch[1])  # e2 again, between e3 and e4
    results = await settle(await publish_all(publisher, batch))
    assert all(isinstance(r, PubAck) for r in results)
    assert await stored_ids(js) == ["e1", "e2", "e3", "e4", "e5"]
    # Repeats of events stored by earlier batches: the whole batch is confirmed, nothing stored again.
    results = await settle(await publish_all(publisher, events(3, 8)))
    assert all(isinstance(r, PubAck) for r in results)
    assert await stored_ids(js) == [f"e{i}" for i in range(1, 9)]


async def test_a_refusing_stream_stores_a_prefix_and_the_retry_keeps_the_order(nc, js) -> None:
    # wa_stream takes 4 messages, then refuses (max_msgs, discard new): an outage of the output, not poison.
    await output_stream(js, max_msgs=4, discard=DiscardPolicy.NEW)
    assert await enable_fast_batch(nc, js, OUTPUT) == ""
    publisher = FastBatchPublisher(nc)
    await publisher.start()
    batch = events(1, 10)
    results = await settle(await publish_all(publisher, batch))
    assert all(isinstance(r, PubAck) for r in results[:4])
    refused = results[4]
    assert isinstance(refused, PublishRejected) and refused.code == 10077, refused
    assert not is_permanent_rejection(refused)  # held and retried by the engine, not dead-lettered
    # Nothing after the refused event was stored: a later event never overtakes a held one.
    assert all(isinstance(r, PublishRejected) and not is_permanent_rejection(r) for r in results[5:])
    assert await stored_ids(js) == ["e1", "e2", "e3", "e4"]
    config = (await js.stream_info(OUTPUT)).config
    config.max_msgs = -1
    await js.update_stream(config)
    await retry_until_stored(publisher, batch[4:])
    assert await stored_ids(js) == [f"e{i}" for i in range(1, 11)]


async def test_a_refusal_of_the_first_event_ends_the_batch(nc, js) -> None:
    await output_stream(js, max_msgs=2, discard=DiscardPolicy.NEW)
    assert await enable_fast_batch(nc, js, OUTPUT) == ""
    publisher = FastBatchPublisher(nc)
    await publisher.start()
    assert all(isinstance(r, PubAck) for r in await settle(await publish_all(publisher, events(1, 2))))
    results = await settle(await publish_all(publisher, events(3, 6)))
    assert all(isinstance(r, PublishRejected) for r in results), results
    assert results[0].code == 10077  # type: ignore[union-attr]
    assert await count(js, OUTPUT) == 2


async def test_lost_answers_time_out_and_the_retry_with_the_same_ids_stores_nothing_twice(publisher, js) -> None:
    answer = publisher._on_reply
    dropping = True

    async def lossy(msg: Any) -> None:  # every flow ack and PubAck of the first attempt is lost on the way
        if not dropping:
            await answer(msg)

    publisher._sub._cb = lossy
    batch = events(1, 300)
    results = await settle(await publish_all(publisher, batch), timeout=1.0)
    assert results == [None] * 300  # no answer: the engine's publish.timeout ends the wait, then it holds
    await wait_until(lambda: stored(js, 300), timeout=5, what="stored all the same")
    publisher.sweep()
    dropping = False
    await retry_until_stored(publisher, batch)
    assert await stored_ids(js) == [f"e{i}" for i in range(1, 301)]


async def test_allow_batched_switched_off_falls_back_to_one_by_one(publisher, js) -> None:
    assert all(isinstance(r, PubAck) for r in await settle(await publish_all(publisher, events(1, 3))))
    config = (await js.stream_info(OUTPUT)).config
    config.allow_batched = False
    await js.update_stream(config)
    results = await settle(await publish_all(publisher, events(4, 6)))
    assert all(isinstance(r, PublishRejected) and not is_permanent_rejection(r) for r in results)
    assert publisher.disabled
    await retry_until_stored(publisher, events(4, 6))
    assert await stored_ids(js) == [f"e{i}" for i in range(1, 7)]


# ------------------------------------------------------------------------------------------------ own servers


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path, port=free_port())
    server.start()
    yield server
    server.stop()


async def connect(url: str) -> Client:
    return await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, connect_timeout=2)


async def test_a_server_restart_mid_batch_loses_nothing_and_stores_nothing_twice(own_server) -> None:
    nc = await connect(own_server.url)
    try:
        js = nc.jetstream()
        await output_stream(js)
        assert await enable_fast_batch(nc, js, OUTPUT) == ""
        publisher = FastBatchPublisher(nc)
        await publisher.start()

        async def keep_open(batch: Any) -> None:  # the batch stays open across the restart
            return None

        publisher._commit_after_yield = keep_open  # type: ignore[method-assign]
        first = events(1, 50)
        futures = await publish_all(publisher, first)
        await wait_until(lambda: stored(js, 50), timeout=5, what="the first half stored")
        own_server.stop()
        own_server.start()
        await wait_until(lambda: nc.is_connected, timeout=10, what="reconnected")
        second = events(51, 100)
        futures += await publish_all(publisher, second)
        await publisher._commit(publisher._open)  # type: ignore[arg-type]
        results = await settle(futures)
        failed = [e for e, r in zip(first + second, results, strict=True) if not isinstance(r, PubAck)]
        # The server forgot the batch: nothing after the restart is confirmed by it (some of the first half may be).
        assert [e[2]["Nats-Msg-Id"] for e in failed][-50:] == [f"e{i}" for i in range(51, 101)]
        publisher._commit_after_yield = FastBatchPublisher._commit_after_yield.__get__(publisher)  # type: ignore[method-assign]
        await retry_until_stored(publisher, failed)
        assert await stored_ids(js) == [f"e{i}" for i in range(1, 101)]
    finally:
        await nc.close()


async def stored(js: JetStreamContext, expected: int) -> bool:
    return await count(js, OUTPUT) == expected


@pytest.mark.skipif(shutil.which("nats-server", path="/usr/sbin:/usr/bin") is None, reason="no system nats-server")
async def test_a_server_older_than_2_14_is_not_asked_and_the_publisher_falls_back(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, program=shutil.which("nats-server", path="/usr/sbin:/usr/bin"))
    server.start()
    try:
        nc = await connect(server.url)
        try:
            version = str(nc._server_info.get("version"))
            if not version.startswith("2.") or int(version.split(".")[1]) >= 14:
                pytest.skip(f"the system nats-server is {version}, not older than 2.14")
            js = nc.jetstream()
            await output_stream(js)
            reason = await enable_fast_batch(nc, js, OUTPUT)
            assert "2.14 or newer" in reason and version in reason
            assert not (await js.stream_info(OUTPUT)).config.allow_batched
            settings = Settings()
            settings = replace(settings, publish=replace(settings.publish, fast_batch=True))
            assert isinstance(await choose_publisher(nc, js, settings), PipelinedPublisher)
        finally:
            await nc.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ the service


def _event(i: int, chat: str = "") -> dict[str, Any]:
    return body(lsn=i + 1, message_id=f"m{i}", chat_id=chat or f"c{i}")


async def test_the_service_with_fast_batch_publishes_every_event_once_in_receipt_order(js, start_service) -> None:
    await ensure_input(js)
    for i in range(300):
        await feed(js, "cdc.acme.messages", _event(i))
    service = start_service(**{"publish.fast_batch": True})
    await wait_until(lambda: stored(js, 300), timeout=20, what="300 events published")
    info = await consumer_settled(js)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    assert [p["row_data"]["message_id"] for p in payloads(await read_all(js, OUTPUT))] == [f"m{i}" for i in range(300)]
    assert any(line.get("message") == "publishing in fast batches" for line in service.logs())
    assert service.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 300
    assert (await js.stream_info(OUTPUT)).config.allow_batched


async def test_an_event_the_output_refuses_for_good_is_dead_lettered_and_the_rest_of_its_batch_published(
    js, start_service
) -> None:
    await ensure_input(js)
    # One message per subject, a second is refused (10077, permanent): it ends its fast batch, so the events after
    # it in that batch fail too (transient) and are held and retried while the refused one is dead-lettered. They can
    # land behind events of a later batch that was already on the wire (the ordering caveat of publish.fast_batch in
    # docs/performance.md); each is stored exactly once.
    await js.add_stream(
        StreamConfig(
            name=OUTPUT,
            subjects=["wa.>"],
            max_msgs_per_subject=1,
            discard="new",
            discard_new_per_subject=True,
            duplicate_window=120,
        )
    )
    service = start_service(**{"publish.fast_batch": True, "publish.max_hold": 30})
    for i in range(2):
        await feed(js, "cdc.acme.messages", _event(i, chat="same-chat"))
    for i in range(2, 30):
        await feed(js, "cdc.acme.messages", _event(i))

    async def settled() -> bool:
        return await count(js, OUTPUT) >= 29 and await count(js, DLQ) >= 1

    await wait_until(settled, timeout=10, what="refused event dead-lettered and the rest published")
    [dead] = await read_all(js, DLQ)
    assert dead.headers["Cdc-Error-Reason"] == "output_rejected"
    published = [p["row_data"]["message_id"] for p in payloads(await read_all(js, OUTPUT))]
    assert published[0] == "m0" and len(published) == len(set(published)) == 29
    assert sorted(published, key=lambda m: int(m[1:])) == ["m0", *(f"m{i}" for i in range(2, 30))]
    assert service.metric("cdc_consumer_dead_letters_total", {"reason": "output_rejected"}) == 1
    info = await consumer_settled(js)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_publish_to_another_stream_goes_one_by_one_and_keeps_batching_on(publisher, js) -> None:
    # The advisory watcher publishes dead letters without asking for details: they must not enter a batch, which
    # the dead-letter stream (no allow_batched) would refuse, turning batching off for good.
    await js.add_stream(StreamConfig(name=DLQ, subjects=["dlq.>"]))
    future = await publisher.publish("dlq.cdc.acme.messages", b"{}", {"Cdc-Error-Reason": "max_deliveries"})
    [dead] = await settle([future])
    assert isinstance(dead, PubAck)
    assert not publisher.disabled and await count(js, DLQ) == 1
    assert all(isinstance(r, PubAck) for r in await settle(await publish_all(publisher, events(1, 3))))
