"""Delivery guarantees against real servers: provisioning, routing, dedup, holding on publish failure, Redis loss,
ordering and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from tests.integration.helpers import (
    INPUT,
    OUTPUT,
    consumer_settled,
    count,
    ensure_input,
    feed,
    payloads,
    read_all,
    wait_count,
    wait_until,
)
from tests.sequin import body, record

SEQUIN_LAYOUT = {
    "ingest.subject_layout": "sequin.changes.{database}.{schema}.{table}.{action}",
    "ingest.subjects": ["sequin.changes.>"],
}


@dataclass(frozen=True)
class Mode:
    """An intake mode: the settings that select it and the durable the helpers inspect."""

    name: str
    consumer: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {**self.overrides, **extra}


MODES = {
    "push": Mode("push", "cdc_consumers"),
    # A durable that exists as push cannot become pull, so pull mode uses a durable of its own.
    "pull": Mode("pull", "cdc_pull", {"ingest.mode": "pull", "ingest.durable": "cdc_pull"}),
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> Mode:
    return MODES[request.param]


# Push only: the drift being corrected is the push durable's (deliver subject, queue group); a pull durable has
# neither, and a push durable cannot be turned into a pull one.
async def test_streams_and_consumer_are_created_and_drift_is_corrected(js, start_service) -> None:
    await js.add_stream(StreamConfig(name=OUTPUT, subjects=["wa.>"], duplicate_window=30))
    await ensure_input(js)
    await js.add_consumer(
        INPUT,
        ConsumerConfig(
            durable_name="cdc_consumers",
            deliver_subject="deliver.cdc_consumers",
            deliver_group="cdc_consumers",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=10,
            max_ack_pending=100,
            filter_subject="cdc.*.*",
        ),
    )
    start_service()
    consumer = await js.consumer_info(INPUT, "cdc_consumers")
    assert consumer.config.max_ack_pending == 5000
    assert consumer.config.ack_wait == 30
    assert consumer.config.max_deliver == 3
    assert consumer.config.deliver_subject == "deliver.cdc_consumers"
    assert (await js.stream_info(OUTPUT)).config.duplicate_window == 120
    assert (await js.stream_info("cdc_dlq_stream")).config.subjects == ["dlq.>"]


async def test_existing_streams_keep_what_the_operator_set(js, start_service) -> None:
    await js.add_stream(StreamConfig(name=INPUT, subjects=["legacy.>"], max_age=3600))
    await js.add_stream(StreamConfig(name=OUTPUT, subjects=["wa.>"], duplicate_window=600, max_msgs=1_000_000))
    start_service()
    source = (await js.stream_info(INPUT)).config
    assert source.subjects == ["legacy.>", "cdc.*.*"]  # ours added, theirs kept
    assert source.max_age == 3600
    output = (await js.stream_info(OUTPUT)).config
    assert output.duplicate_window == 600  # a longer window is never shortened
    assert output.max_msgs == 1_000_000
    created = (await js.stream_info("cdc_dlq_stream")).config
    assert created.max_age == 14 * 86400


# Push only: this guards the deliver-subject race of concurrent start-ups (each replica moving the consumer to its
# own inbox); pull replicas fetch by durable name and have no deliver subject to race on. The load spread of both
# modes is covered by test_three_replicas_share_the_load_and_publish_each_event_once.
async def test_two_replicas_started_together_both_receive(js, start_service) -> None:
    first = start_service(wait=False, name="a")
    second = start_service(wait=False, name="b")
    first.wait_ready()
    second.wait_ready()
    for i in range(400):
        await feed(js, f"cdc.acme{i % 4}.messages", body(lsn=i + 1, message_id=f"m{i}", company_id=f"acme{i % 4}"))
    assert await wait_count(js, OUTPUT, 400) == 400
    await consumer_settled(js)
    got_a = first.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"})
    got_b = second.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"})
    assert got_a + got_b == 400
    assert got_a > 0
    assert got_b > 0


@pytest.mark.parametrize(
    ("table", "expected_subject", "ids"),
    [
        (
            "messages",
            "wa.acme.agent-1.messages.chat-1",
            {"agent_id": "agent-1", "message_id": "msg-1", "chat_id": "chat-1"},
        ),
        ("chats", "wa.acme.agent-1.chats", {"agent_id": "agent-1", "chat_id": "chat-1"}),
        ("agents", "wa.acme.agent-1.agents", {"agent_id": "agent-1"}),
    ],
)
@pytest.mark.parametrize("layout", ["cdc", "sequin"])
async def test_each_table_is_published_once_with_msg_id(
    js, start_service, mode, table, expected_subject, ids, layout
) -> None:
    if layout == "cdc":
        await ensure_input(js)
        start_service(**mode.settings())
        subject = f"cdc.acme.{table}"
    else:
        await ensure_input(js, ["sequin.changes.>"])
        start_service(**mode.settings(**SEQUIN_LAYOUT))
        subject = f"sequin.changes.chatdb.public.{table}.insert"
    doc = body(table, lsn=1632321)
    await feed(js, subject, doc)
    assert await wait_count(js, OUTPUT, 1) == 1
    [msg] = await read_all(js, OUTPUT)
    event = orjson.loads(msg.data)
    pk = {"messages": "msg-1", "chats": "chat-1", "agents": "agent-1"}[table]
    assert msg.subject == expected_subject
    assert event["event_id"] == f"1632321:chatdb:acme:{table}:{pk}"
    assert msg.headers["Nats-Msg-Id"] == event["event_id"]
    assert event["company_id"] == "acme"
    assert {k: event[k] for k in ("agent_id", "message_id", "chat_id") if k in event} == ids
    assert event["row_data"] == record(table)
    assert list(event["row_data"]) == list(record(table))
    assert event["action"] == "insert"
    assert event["event_time"] == doc["metadata"]["commit_timestamp"]
    info = await consumer_settled(js, mode.consumer)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    if mode.name == "pull":
        assert info.config.deliver_subject is None


async def test_same_change_twice_is_published_once_and_both_acked(js, start_service, mode) -> None:
    await ensure_input(js)
    svc = start_service(**mode.settings())
    doc = body(lsn=77)
    await feed(js, "cdc.acme.messages", doc)
    await feed(js, "cdc.acme.messages", doc)
    # Two changes to one row in one transaction: same commit_lsn, different commit_idx.
    await feed(js, "cdc.acme.messages", body(lsn=88, idx=0))
    await feed(js, "cdc.acme.messages", body(lsn=88, idx=1, status="read"))
    await wait_until(
        lambda: svc.metric("cdc_consumer_events_total", {"table": "messages"}) >= 4, what="all four handled"
    )
    info = await consumer_settled(js, mode.consumer)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    ids = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
    assert ids == [
        "77:chatdb:acme:messages:msg-1",
        "88.0:chatdb:acme:messages:msg-1",
        "88.1:chatdb:acme:messages:msg-1",
    ]
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "duplicate"}) == 1


async def test_redis_marker_drops_a_replay_older_than_the_window(js, start_service, redis_client, mode) -> None:
    await ensure_input(js)
    redis_client.set("dedup:5:chatdb:acme:messages:msg-1", "")
    svc = start_service(**mode.settings())
    await feed(js, "cdc.acme.messages", body(lsn=5))
    await feed(js, "cdc.acme.messages", body(lsn=6))
    assert await wait_count(js, OUTPUT, 1) == 1
    await consumer_settled(js, mode.consumer)
    assert [p["event_id"] for p in payloads(await read_all(js, OUTPUT))] == ["6:chatdb:acme:messages:msg-1"]
    assert svc.metric("cdc_consumer_dedup_lookups_total", {"result": "hit"}) == 1
    assert redis_client.ttl("dedup:6:chatdb:acme:messages:msg-1") > 250


async def test_publish_failure_holds_the_message_then_publishes_exactly_once(
    js, start_service, redis_client, mode
) -> None:
    await ensure_input(js)
    svc = start_service(
        **mode.settings(
            **{
                "ingest.ack_wait": 2,
                "publish.timeout": 0.5,
                "dedup.claim_ttl": 1,
                "publish.retry_max": 0.3,
                "publish.max_hold": 30,
            }
        )
    )
    await js.delete_stream(OUTPUT)  # the output is gone: every publish gets "no responders"
    seq = await feed(js, "cdc.acme.messages", body(lsn=42))
    await wait_until(lambda: svc.metric("cdc_consumer_publish_errors_total") >= 3, what="publish retries")
    # The point is a duration: for 2.5 x AckWait the message stays held by this replica, never redelivered,
    # because in_progress keeps extending its AckWait (in pull mode just the same: a fetched message has an AckWait).
    held_until = time.monotonic() + 5.0
    while time.monotonic() < held_until:
        info = await js.consumer_info(INPUT, mode.consumer)
        assert info.num_ack_pending == 1
        assert info.num_redelivered == 0
        await asyncio.sleep(0.25)  # sampling interval of an invariant check, not a wait for an event
    # No marker before the PubAck; the key holds at most this replica's "in progress" claim, renewed while held.
    assert (redis_client.get("dedup:42:chatdb:acme:messages:msg-1") or b"claim:").startswith(b"claim:")
    await js.add_stream(StreamConfig(name=OUTPUT, subjects=["wa.>"], duplicate_window=120))
    assert await wait_count(js, OUTPUT, 1) == 1
    info = await consumer_settled(js, mode.consumer)
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
    await wait_until(
        lambda: redis_client.exists("dedup:42:chatdb:acme:messages:msg-1") == 1, what="marker after PubAck"
    )
    [msg] = await read_all(js, OUTPUT)
    assert orjson.loads(msg.data)["event_id"] == "42:chatdb:acme:messages:msg-1"
    assert seq == 1


async def test_publish_failure_beyond_max_hold_naks_and_redelivery_publishes_once(js, start_service, mode) -> None:
    await ensure_input(js)
    svc = start_service(
        **mode.settings(
            **{"ingest.max_deliver": 5, "publish.timeout": 0.3, "publish.retry_max": 0.1, "publish.max_hold": 0.5}
        )
    )
    await js.delete_stream(OUTPUT)
    await feed(js, "cdc.acme.messages", body(lsn=9))
    await wait_until(
        lambda: svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "retried"}) >= 1,
        what="a nak after max_hold",
    )
    await js.add_stream(StreamConfig(name=OUTPUT, subjects=["wa.>"]))
    info = await consumer_settled(js, mode.consumer, timeout=30)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    assert await count(js, OUTPUT) == 1
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 1


async def test_redis_outage_fails_open_and_recovers(js, start_service, redis_server, redis_client, mode) -> None:
    await ensure_input(js)
    svc = start_service(**mode.settings())
    try:
        redis_server.stop()
        for i in range(20):
            await feed(js, "cdc.acme.messages", body(lsn=100 + i, message_id=f"m{i}"))
        assert await wait_count(js, OUTPUT, 20) == 20
        await consumer_settled(js, mode.consumer)
        assert svc.metric("cdc_consumer_dedup_lookups_total", {"result": "error"}) >= 1

        def degraded() -> bool:
            status, raw = svc.get("/readyz")
            return status == 200 and orjson.loads(raw)["redis"] == "degraded"

        await wait_until(degraded, what="readyz reporting redis degraded")
    finally:
        redis_server.start()
    await wait_until(lambda: orjson.loads(svc.get("/readyz")[1])["redis"] == "ok", what="redis ok again")
    await feed(js, "cdc.acme.messages", body(lsn=500, message_id="after"))
    assert await wait_count(js, OUTPUT, 21) == 21
    await wait_until(
        lambda: redis_client.exists("dedup:500:chatdb:acme:messages:after") == 1, what="markers written again"
    )


async def test_events_of_one_chat_keep_their_order(js, start_service, mode) -> None:
    await ensure_input(js)
    svc = start_service(**mode.settings(**{"ingest.batch_size": 16}))
    for i in range(600):
        await feed(js, "cdc.acme.messages", body(lsn=1000 + i, message_id=f"m{i}"))
    assert await wait_count(js, OUTPUT, 600) == 600
    lsns = [int(p["event_id"].split(":")[0]) for p in payloads(await read_all(js, OUTPUT))]
    assert lsns == list(range(1000, 1600))
    info = await consumer_settled(js, mode.consumer)
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 600


async def test_sigterm_finishes_in_flight_work_and_exits_zero(js, start_service, mode) -> None:
    await ensure_input(js)
    svc = start_service(**mode.settings())
    for i in range(3000):
        await js.publish("cdc.acme.messages", orjson.dumps(body(lsn=i + 1, message_id=f"m{i}")))
    await wait_until(lambda: count(js, OUTPUT), what="publishing started")
    svc.signal(signal.SIGTERM)
    started = time.monotonic()
    code = await asyncio.get_running_loop().run_in_executor(None, svc.wait, 25)
    assert code == 0
    assert time.monotonic() - started < 15
    info = await js.consumer_info(INPUT, mode.consumer)
    assert info.num_ack_pending == 0  # nothing left waiting for AckWait: finished, or handed back at once
    published = await count(js, OUTPUT)
    assert published + info.num_pending == 3000
    assert any(line.get("message") == "stopped" for line in svc.logs())


async def test_three_replicas_share_the_load_and_publish_each_event_once(js, start_service, mode) -> None:
    await ensure_input(js)
    # Default batch_size (256): with events arriving while all three replicas wait, pull fetches spread them
    # evenly (about 1,000 each in trials), so no smaller batch is needed to keep a replica from starving the others.
    replicas = [start_service(wait=False, name=f"r{i}", **mode.settings()) for i in range(3)]
    for replica in replicas:
        replica.wait_ready()
    tables = ("messages", "chats", "agents")
    total = 3000
    for i in range(total):
        table, company = tables[i % 3], f"co{i % 5}"
        await js.publish(f"cdc.{company}.{table}", orjson.dumps(body(table, lsn=i + 1, company_id=company)))
    assert await wait_count(js, OUTPUT, total, timeout=30) == total
    info = await consumer_settled(js, mode.consumer)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    ids = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
    assert len(ids) == total
    assert len(set(ids)) == total
    assert {int(i.split(":")[0]) for i in ids} == set(range(1, total + 1))
    shares = [
        sum(r.metric("cdc_consumer_events_total", {"table": t, "result": "published"}) for t in tables)
        for r in replicas
    ]
    assert sum(shares) == total
    assert all(share > total / 10 for share in shares), shares
