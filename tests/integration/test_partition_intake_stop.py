"""PartitionedIntake's stop against a real nats-server and nats-py: what a partition's pull inbox received after its
last pull request is handed on, not left to AckWait (the same contract as PullIntake.stop,
tests/integration/test_pull_intake_stop.py).

The state is set up without timing: the partition's pull loop is held inside its batch while a pull request with the
partition's own inbox as reply (and the pin the replica holds) delivers more messages to it, then the intake stops.
"""

from __future__ import annotations

import asyncio

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from cdc_service.adapters.nats_partitions import PIN_HEADER, PartitionedIntake, durable_name, ensure_partitioned_stream
from cdc_service.config import settings_from_mapping
from cdc_service.core import partitions as core
from cdc_service.metrics import Metrics
from tests.integration.helpers import ensure_input, feed, wait_count, wait_until
from tests.sequin import body

EVENTS = 10
BATCH = 4


async def test_messages_delivered_after_the_last_pull_are_handed_on_at_stop(nc: Client, js: JetStreamContext) -> None:
    settings = settings_from_mapping(
        {"ingest": {"ordering": "partitioned", "partitions": 1, "batch_size": BATCH, "ack_wait": 120}}
    )
    ingest = settings.ingest
    durable = durable_name(ingest, 0)
    await ensure_input(js)
    await ensure_partitioned_stream(js, settings)
    for i in range(EVENTS):
        await feed(js, "cdc.acme.messages", body(lsn=i + 1, message_id=f"m{i}"))
    await wait_count(js, ingest.partition_stream, EVENTS)

    taken: list[Msg] = []
    in_first_batch = asyncio.Event()
    release = asyncio.Event()

    async def on_batch(msgs: list[Msg]) -> None:
        taken.extend(msgs)
        for msg in msgs:
            await msg.ack()
        in_first_batch.set()
        await release.wait()  # holds the pull loop here; stop's own hand-over passes once released

    intake = PartitionedIntake(nc, js, settings, Metrics(CollectorRegistry()), "m1")
    await intake.start(on_batch)
    try:
        await asyncio.wait_for(in_first_batch.wait(), 10)
        assert len(taken) == BATCH
        # A request answered while no pull is waiting for it: the rest lands in the partition's inbox unasked for.
        pin = (taken[0].headers or {})[PIN_HEADER]
        request = {"batch": EVENTS, "no_wait": True, "group": core.PRIORITY_GROUP, "id": pin}
        inbox = f"{intake._inbox}.0.late"  # the partition's pull subscription takes <inbox>.<partition>.*
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{ingest.partition_stream}.{durable}", orjson.dumps(request), reply=inbox
        )

        async def delivered_unacked() -> bool:
            info = await js.consumer_info(ingest.partition_stream, durable)
            return info.num_ack_pending == EVENTS - BATCH

        await wait_until(delivered_unacked, what="the rest delivered to the replica")
        await nc.flush()  # and read by the client: the server sent them before this PONG

        stopping = asyncio.create_task(intake.stop())
        await wait_until(lambda: not intake.owned(), what="the partition told to stop pulling")
        release.set()
        await asyncio.wait_for(stopping, 15)
    finally:
        release.set()
        await intake.stop()

    assert sorted(orjson.loads(m.data)["metadata"]["commit_lsn"] for m in taken) == list(range(1, EVENTS + 1))
    await nc.flush()
    info = await js.consumer_info(ingest.partition_stream, durable)
    assert info.num_ack_pending == 0  # before the fix: 6, until AckWait
    assert info.num_redelivered == 0  # handled on their first delivery: no attempt spent
