"""Partitioned mode exports the backlog and ack-floor gauges over the durables a replica pulls (real nats-server).

The intake runs in-process so that the test can hold a batch unacked: each partition delivers one batch and waits,
so the backlog is known and stable while the gauges are read, then everything is acked and the backlog drains.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from cdc_service.adapters.nats_partitions import PartitionedIntake, durable_name, ensure_partitioned_stream
from cdc_service.config import settings_from_mapping
from cdc_service.metrics import Metrics
from tests.integration.helpers import ensure_input, feed, wait_count, wait_until
from tests.sequin import body

PARTITIONS = 2
EVENTS = 60
BATCH = 5


async def test_partitioned_backlog_and_ack_floor_gauges(nc: Client, js: JetStreamContext) -> None:
    settings = settings_from_mapping(
        {
            "ingest": {
                "ordering": "partitioned",
                "partitions": PARTITIONS,
                "batch_size": BATCH,
                "member_ttl": 1.5,
            }
        }
    )
    ingest = settings.ingest
    await ensure_input(js)
    await ensure_partitioned_stream(js, settings)
    for i in range(EVENTS):  # 12 companies: both partitions get some
        await feed(js, f"cdc.co{i % 12}.messages", body(lsn=i + 1, message_id=f"m{i}"))
    await wait_count(js, ingest.partition_stream, EVENTS)

    registry = CollectorRegistry()
    gate = asyncio.Event()
    delivered: list[Msg] = []

    async def on_batch(msgs: list[Msg]) -> None:
        delivered.extend(msgs)
        await gate.wait()  # holds this partition's pull loop: its batch stays unacked, the rest pending
        for msg in msgs:
            await msg.ack()

    def gauge(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    async def durables() -> list[Any]:
        return [await js.consumer_info(ingest.partition_stream, durable_name(ingest, p)) for p in range(PARTITIONS)]

    intake = PartitionedIntake(nc, js, settings, Metrics(registry), "m1")
    await intake.start(on_batch)
    try:
        await wait_until(lambda: len(delivered) == PARTITIONS * BATCH, what="one batch from each partition")
        infos = await durables()
        pending = sum(int(i.num_pending or 0) for i in infos)
        assert pending == EVENTS - PARTITIONS * BATCH
        await wait_until(lambda: gauge("cdc_consumer_backlog_messages") == pending, what=f"backlog gauge {pending}")

        gate.set()

        async def drained() -> bool:
            infos = await durables()
            if any(i.num_pending or i.num_ack_pending for i in infos):
                return False
            lowest = min(int(i.ack_floor.stream_seq or 0) for i in infos)
            return gauge("cdc_consumer_backlog_messages") == 0 and gauge("cdc_consumer_ack_floor_sequence") == lowest

        await wait_until(drained, what="backlog 0 and the lowest ack floor exported")
        assert gauge("cdc_consumer_ack_floor_sequence") > 0
        assert len(delivered) == EVENTS
    finally:
        gate.set()
        await intake.stop()
