"""When the environment misbehaves (issue 17): real nats-server, real Redis, the real service process.

A frozen replica (SIGSTOP) burns a message's deliveries; an edited durable skips events; a missing dead-letter
stream or a per-subject limit must not stall valid traffic; Redis refusing writes and a frozen nats-server must show
in the probes. Faults are fitted into seconds with short ack_wait / max_deliver settings; waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig

from tests.integration.helpers import (
    DLQ,
    INPUT,
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

pytestmark = pytest.mark.integration

ADVISORIES = "cdc_max_deliveries"
# Redis claims must live shorter than AckWait and longer than publish.timeout; these tests shorten one or lengthen
# the other to fit faults into seconds, so they run without claims.
NO_CLAIMS = {"dedup.claim_ttl": 0}


def _event(i: int, company: str = "acme") -> dict[str, Any]:
    return body(lsn=i + 1, message_id=f"m{i}", chat_id=f"c{i}", company_id=company)


async def _accounted(js: JetStreamContext) -> tuple[list[str], dict[str, str]]:
    """Event ids in ``wa_stream`` and ``{source seq: reason}`` of the dead letters."""
    published = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
    dead = {m.headers["Cdc-Source-Seq"]: m.headers["Cdc-Error-Reason"] for m in await read_all(js, DLQ)}
    return published, dead


# ------------------------------------------------------------------------------------------------ items 1 and 2


async def test_deliveries_burnt_by_a_frozen_replica_are_dead_lettered(js, start_service) -> None:
    """A replica frozen while it holds messages: they run out of deliveries without anyone seeing the last one.

    Before issue 17 they were skipped for good (only a MAX_DELIVERIES advisory); now the successor reads the
    captured advisories and dead-letters each with reason ``max_deliveries``: nothing is left behind.
    """
    await ensure_input(js)
    settings = {"ingest.ack_wait": 1, "ingest.max_deliver": 2, "shutdown.grace_seconds": 2, **NO_CLAIMS}
    # Its own session: nothing but this test may resume it (see ServiceProcess); resumed, it would publish what the
    # successor dead-letters.
    frozen = start_service(name="frozen", new_session=True, **settings)
    frozen.signal(signal.SIGSTOP)
    try:
        seqs = [await feed(js, "cdc.acme.messages", _event(i)) for i in range(30)]

        async def exhausted() -> bool:
            # every message was delivered max_deliver times to the frozen replica and the server gave up on it
            return await count(js, ADVISORIES) >= len(seqs)

        await wait_until(exhausted, timeout=30, what="deliveries exhausted on the frozen replica")
        info = await js.consumer_info(INPUT, "cdc_consumers")
        assert info.num_pending == 0 and info.num_ack_pending == 0, info  # the server will not deliver them again
    finally:
        frozen.kill()  # the way kubelet ends a pod that stopped answering its probes
    successor = start_service(name="successor", **settings)

    async def all_dead_lettered() -> bool:
        return await count(js, DLQ) >= len(seqs)

    await wait_until(all_dead_lettered, timeout=30, what="every skipped message dead-lettered")
    published, dead = await _accounted(js)
    assert published == []
    assert dead == {str(s): "max_deliveries" for s in seqs}
    assert successor.metric("cdc_consumer_max_delivery_advisories_total", {"result": "dead_lettered"}) == len(seqs)
    assert successor.metric("cdc_consumer_dead_letters_total", {"reason": "max_deliveries"}) == len(seqs)
    # the dead letters carry the original bytes, replayable with `python -m cdc_service dlq replay`
    dlq = await read_all(js, DLQ)
    assert {m.headers["Cdc-Source-Subject"] for m in dlq} == {"cdc.acme.messages"}
    assert json.loads(dlq[0].data)["record"]["message_id"] in {f"m{i}" for i in range(30)}


async def test_an_advisory_handled_twice_dead_letters_once(js, start_service, redis_client) -> None:
    """Two replicas, the same advisory delivered again (a replica died before acking it): one dead letter."""
    await ensure_input(js)
    settings = {"ingest.ack_wait": 1, "ingest.max_deliver": 1, **NO_CLAIMS}
    frozen = start_service(name="frozen", new_session=True, **settings)  # see the test above
    frozen.signal(signal.SIGSTOP)
    try:
        await feed(js, "cdc.acme.messages", _event(1))

        async def exhausted() -> bool:
            return await count(js, ADVISORIES) >= 1

        await wait_until(exhausted, timeout=20, what="deliveries exhausted")
    finally:
        frozen.kill()
    first = start_service(name="first", **settings)
    await wait_until(lambda: count(js, DLQ), timeout=20, what="dead letter")
    # replay the advisory as if its first handler had died before the ack: a second replica handles it again
    advisory = await js.get_msg(ADVISORIES, 1)
    second = start_service(name="second", **settings)
    await js.publish(advisory.subject, advisory.data)

    async def handled_twice() -> bool:
        results = [first, second]
        return sum(s.metric("cdc_consumer_max_delivery_advisories_total") for s in results) >= 2

    await wait_until(handled_twice, timeout=20, what="advisory handled again")
    assert await count(js, DLQ) == 1
    total = first.metric("cdc_consumer_max_delivery_advisories_total", {"result": "already_dead_lettered"})
    total += second.metric("cdc_consumer_max_delivery_advisories_total", {"result": "already_dead_lettered"})
    assert total == 1


# ------------------------------------------------------------------------------------------------ item 3


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_an_edited_durable_is_restored_and_the_skipped_range_resumed(js, start_service, mode) -> None:
    """Someone narrows the durable's filter to one tenant and shortens its ack_wait. The watchdog restores both,
    says so (critical log line, metric), and resumes from the ack floor: the other tenants' events are not lost."""
    durable = "cdc_consumers" if mode == "push" else "cdc_pull"
    await ensure_input(js)
    service = start_service(**{"ingest.mode": mode, "ingest.durable": durable, "ingest.consumer_check_interval": 0.5})
    await feed(js, "cdc.acme.messages", _event(0))
    await wait_until(lambda: service.metric("cdc_consumer_ack_floor_sequence") >= 1, what="ack floor seen")

    config: ConsumerConfig = (await js.consumer_info(INPUT, durable)).config
    config.filter_subject = "cdc.acme.*"
    config.ack_wait = 1.0
    await js.add_consumer(INPUT, config)  # an update: the server keeps the delivery state
    for i in range(1, 21):
        await feed(js, "cdc.other.messages" if i % 2 else "cdc.acme.messages", _event(i, "other" if i % 2 else "acme"))

    await wait_until(
        lambda: service.metric("cdc_consumer_consumer_drift_total", {"field": "filter_subjects"}) >= 1,
        timeout=20,
        what="filter drift restored",
    )

    async def all_published() -> bool:
        return await count(js, OUTPUT) >= 21

    await wait_until(all_published, timeout=30, what="every tenant's events published")
    info = await consumer_settled(js, durable)
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert info.config.filter_subject in ("cdc.*.*", "cdc.>")  # cdc.> is cdc.*.* as provisioning widens it
    assert info.config.ack_wait == 30.0
    ids = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
    assert len(ids) == len(set(ids)) == 21
    assert service.metric("cdc_consumer_consumer_drift_total", {"field": "ack_wait"}) >= 1
    critical = [r for r in service.logs() if r.get("level") == "CRITICAL" and "durable" in r.get("message", "")]
    assert critical, "no critical log line about the edited durable"


# ------------------------------------------------------------------------------------------------ items 4 and 5


async def test_poison_does_not_stall_valid_traffic_while_the_dead_letter_stream_is_missing(js, start_service) -> None:
    await ensure_input(js)
    start_service(**{"publish.max_hold": 5, "ingest.ack_wait": 2, "ingest.max_deliver": 3, **NO_CLAIMS})
    await js.delete_stream(DLQ)
    await feed(js, "cdc.acme.messages", b"{not json")
    for i in range(50):
        await feed(js, "cdc.acme.messages", _event(i))

    async def all_published() -> bool:
        return await count(js, OUTPUT) >= 50

    # before issue 17 the poison's hold closed the output gate for publish.max_hold (5 s) per attempt, repeatedly
    await wait_until(all_published, timeout=4, what="valid events published past the held dead letter")
    assert await count(js, DLQ) == 0

    async def only_the_poison_pending() -> bool:
        info = await js.consumer_info(INPUT, "cdc_consumers")
        return info.num_ack_pending == 1 and info.num_pending == 0

    await wait_until(only_the_poison_pending, timeout=5, what="only the poison held")
    await js.add_stream(StreamConfig(name=DLQ, subjects=["dlq.>"]))
    await wait_until(lambda: count(js, DLQ), timeout=15, what="the held dead letter stored once the stream is back")
    [dead] = await read_all(js, DLQ)
    assert dead.headers["Cdc-Error-Reason"] == "invalid_json"
    info = await consumer_settled(js)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_per_subject_limit_is_dead_lettered_at_once_not_held(js, start_service) -> None:
    await ensure_input(js)
    # wa_stream keeps one message per subject and refuses a second (error 10077): permanent for that event
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
    service = start_service(**{"publish.max_hold": 30})
    for i in range(2):
        await feed(js, "cdc.acme.messages", body(lsn=i + 1, message_id=f"m{i}", chat_id="same-chat"))
    for i in range(2, 30):
        await feed(js, "cdc.acme.messages", _event(i))

    async def settled() -> bool:
        return await count(js, OUTPUT) >= 29 and await count(js, DLQ) >= 1

    # held as an outage, the refused event would close the gate for publish.max_hold (30 s)
    await wait_until(settled, timeout=8, what="refused event dead-lettered and the rest published")
    [dead] = await read_all(js, DLQ)
    assert dead.headers["Cdc-Error-Reason"] == "output_rejected"
    assert "per subject" in dead.headers["Cdc-Error-Detail"]
    assert service.metric("cdc_consumer_dead_letters_total", {"reason": "output_rejected"}) == 1


# ------------------------------------------------------------------------------------------------ items 7 and 8


async def test_redis_refusing_writes_is_degraded_until_a_write_succeeds(js, start_service, redis_client) -> None:
    await ensure_input(js)
    service = start_service(**{"redis.retry_interval": 0.2})
    redis_client.config_set("maxmemory", "1")  # every write: OOM command not allowed (noeviction)
    redis_client.config_set("maxmemory-policy", "noeviction")
    try:
        for i in range(5):
            await feed(js, "cdc.acme.messages", _event(i))

        async def published() -> bool:
            return await count(js, OUTPUT) >= 5

        await wait_until(published, what="published with Redis refusing writes")

        def degraded() -> dict[str, Any] | None:
            detail = json.loads(service.get("/readyz")[1])
            return detail if detail.get("redis") == "degraded" else None

        detail = await wait_until(degraded, what="readiness reports Redis degraded")
        assert "OOM" in detail["redis_detail"]
        await wait_until(lambda: service.metric("cdc_consumer_redis_up") == 0, what="redis_up 0 (the probe writes)")
        await wait_until(lambda: service.metric("cdc_consumer_dedup_mark_errors_total") >= 1, what="mark errors")
        # reads work all along (lookups succeed), and still Redis stays degraded
        await asyncio.to_thread(redis_client.get, "anything")
        assert json.loads(service.get("/readyz")[1])["redis"] == "degraded"
    finally:
        redis_client.config_set("maxmemory", "0")
    await wait_until(lambda: json.loads(service.get("/readyz")[1])["redis"] == "ok", what="ok after a write")
    await wait_until(lambda: service.metric("cdc_consumer_redis_up") == 1, what="redis_up 1 again")


async def test_readiness_fails_while_nats_server_is_frozen(nats_server, js, start_service) -> None:
    await ensure_input(js)
    service = start_service(**{"health.nats_ping_timeout": 1, "publish.timeout": 30, **NO_CLAIMS})
    await feed(js, "cdc.acme.messages", _event(0))
    await wait_until(lambda: count(js, OUTPUT), what="first event")
    await feed(js, "cdc.acme.messages", _event(1))  # work pending when the server freezes (maybe not yet received)
    nats_server.signal(signal.SIGSTOP)
    try:

        def not_ready() -> dict[str, Any] | None:
            status, raw = service.get("/readyz")
            return json.loads(raw) if status == 503 else None

        detail = await wait_until(not_ready, timeout=10, what="readiness fails while nats-server is frozen")
        assert "ping" in detail["reason"]
    finally:
        nats_server.signal(signal.SIGCONT)
    await asyncio.to_thread(service.wait_ready, 20)

    async def second_published() -> bool:
        return await count(js, OUTPUT) >= 2

    await wait_until(second_published, timeout=20, what="second event after the freeze")


async def test_deliveries_a_partition_owner_never_finished_are_dead_lettered(nc, js, start_service) -> None:
    """Partitioned mode: a partition's owner took messages on their final delivery and died with them (here the
    test pulls them as that owner and never acks). Each partition durable's MAX_DELIVERIES advisory is captured, and
    the next replica dead-letters every one of them with reason ``max_deliveries``, under its original subject."""
    await ensure_input(js)
    settings = {
        "ingest.ordering": "partitioned",
        "ingest.partitions": 2,
        "ingest.member_ttl": 1.5,
        "ingest.ack_wait": 1,
        "ingest.max_deliver": 1,
        **NO_CLAIMS,
    }
    first = start_service(name="provisions", **settings)
    first.stop()  # leaves: its pins are released, its durables and the advisory capture stay
    seqs = [await feed(js, "cdc.acme.messages", _event(i)) for i in range(5)]
    partitioned = "cdc_events_partitioned"

    async def stored() -> bool:
        return await count(js, partitioned) >= len(seqs)

    await wait_until(stored, timeout=15, what="events in the partitioned stream")
    [token] = {m.subject.split(".")[0] for m in await read_all(js, partitioned)}  # one company: one partition
    taken = []
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{partitioned}.cdc_consumers_p{token}",
        b'{"batch": 10, "expires": 2000000000, "group": "cdc"}',
        reply=inbox,
    )
    while len(taken) < len(seqs):
        msg = await sub.next_msg(timeout=5)
        if msg.reply:
            taken.append(msg.metadata.sequence.stream)
    await sub.unsubscribe()

    async def exhausted() -> bool:
        return await count(js, ADVISORIES) >= len(seqs)

    await wait_until(exhausted, timeout=30, what="the partition durable's max-deliveries advisories captured")
    successor = start_service(name="successor", **settings)

    async def all_dead_lettered() -> bool:
        return await count(js, DLQ) >= len(seqs)

    await wait_until(all_dead_lettered, timeout=30, what="every message the dead owner took dead-lettered")
    published, dead = await _accounted(js)
    assert published == []
    assert dead == {str(s): "max_deliveries" for s in taken}
    assert successor.metric("cdc_consumer_max_delivery_advisories_total", {"result": "dead_lettered"}) == len(seqs)
    dlq = await read_all(js, DLQ)
    assert {m.headers["Cdc-Source-Subject"] for m in dlq} == {"cdc.acme.messages"}
    assert {m.headers["Cdc-Source-Stream"] for m in dlq} == {partitioned}
