"""Start-up's ``ensure_partition_consumer`` against a real nats-server, in the states other replicas leave behind.

A takeover deletes a partition's durable and creates it again. When another replica creates the same durable while
the server is still deleting it (its puller answered 503, or its own start-up), nats-server removes the consumer from
the stream and then its store directory: the new durable lives on in memory with no directory, and every update of
it fails with code 10012 ("open .../meta.inf.tmp: no such file or directory"). The tests make that state on demand
by removing the directory of a live durable, which is what the race leaves.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from cdc_service.adapters.nats_jetstream import ProvisioningError
from cdc_service.adapters.nats_partitions import (
    _api,
    consumer_request,
    create_partition_consumer,
    durable_name,
    ensure_partition_consumer,
    ensure_partitioned_stream,
)
from cdc_service.config import IngestSettings, Settings, settings_from_mapping
from tests.integration.helpers import ensure_input, feed, wait_count
from tests.sequin import body
from tests.servers import NatsServer

pytestmark = pytest.mark.integration


def partitioned(**ingest: Any) -> Settings:
    return settings_from_mapping({"ingest": {"ordering": "partitioned", "partitions": 2, "member_ttl": 1.5, **ingest}})


async def info(nc: Client, ingest: IngestSettings, partition: int = 0) -> dict[str, Any]:
    return await _api(nc, f"$JS.API.CONSUMER.INFO.{ingest.partition_stream}.{durable_name(ingest, partition)}")


async def create(nc: Client, ingest: IngestSettings, partition: int, start: int | None, **config: Any) -> None:
    request = consumer_request(ingest, partition, start)
    request["config"].update(config)
    await _api(nc, f"$JS.API.CONSUMER.CREATE.{ingest.partition_stream}.{durable_name(ingest, partition)}", request)


def remove_store(server: NatsServer, ingest: IngestSettings, partition: int = 0) -> None:
    """What the delete/create race leaves: the durable is live in the server, its store directory is gone."""
    directory = server.store / "jetstream" / "$G" / "streams" / ingest.partition_stream / "obs"
    target = Path(directory) / durable_name(ingest, partition)
    assert target.is_dir()
    shutil.rmtree(target)


@pytest.fixture
async def stream(nc: Client, js: JetStreamContext) -> Settings:
    settings = partitioned()
    await ensure_input(js)
    await ensure_partitioned_stream(js, settings)
    return settings


async def test_a_durable_left_without_its_store_by_a_takeover_race_does_not_stop_start_up(
    nc: Client, nats_server: NatsServer, stream: Settings
) -> None:
    ingest = stream.ingest
    await create(nc, ingest, 0, 7)
    before = await info(nc, ingest)
    remove_store(nats_server, ingest)

    await ensure_partition_consumer(nc, ingest, 0)

    after = await info(nc, ingest)
    assert after["created"] == before["created"], "a durable already as configured is left alone"
    assert after["config"]["opt_start_seq"] == 7


async def test_changed_settings_on_a_durable_without_its_store_recreate_it_from_its_ack_floor(
    nc: Client, js: JetStreamContext, nats_server: NatsServer, stream: Settings
) -> None:
    ingest = stream.ingest
    for i in range(12):  # companies c0..c11: partition 0 gets some
        await feed(js, f"cdc.c{i}.messages", body(lsn=i + 1, message_id=f"m{i}"))
    await wait_count(js, ingest.partition_stream, 12)
    await create(nc, ingest, 0, None, ack_wait=int(5e9))
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)  # a delivery carries the message's subject: nc.request would not match it
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{ingest.partition_stream}.{durable_name(ingest, 0)}",
        b'{"batch": 1, "expires": 2000000000, "group": "cdc"}',
        reply=inbox,
    )
    pulled = await sub.next_msg(timeout=5)
    await sub.unsubscribe()
    await pulled.ack_sync()  # the ack floor moves to this message
    floor = int((await info(nc, ingest))["ack_floor"]["stream_seq"])
    assert floor > 0
    remove_store(nats_server, ingest)

    await ensure_partition_consumer(nc, ingest, 0)  # ack_wait 30 s in the settings, 5 s on the durable

    after = await info(nc, ingest)
    assert after["config"]["ack_wait"] == int(ingest.ack_wait * 1e9)
    assert after["config"]["opt_start_seq"] == floor + 1, "recreated after its ack floor, as a takeover does"
    await ensure_partition_consumer(nc, partitioned(ack_wait=20).ingest, 0)  # its store is whole again


async def test_concurrent_start_ups_and_a_takeover_of_one_partition_all_succeed(nc: Client, stream: Settings) -> None:
    changed = partitioned(max_ack_pending=77).ingest
    await create(nc, changed, 0, 3, max_ack_pending=5000)

    async def take_over() -> None:  # as PartitionPuller._take_over does
        await _api(nc, f"$JS.API.CONSUMER.DELETE.{changed.partition_stream}.{durable_name(changed, 0)}")
        await create_partition_consumer(nc, changed, 0, 5)

    await asyncio.gather(
        ensure_partition_consumer(nc, changed, 0), ensure_partition_consumer(nc, changed, 0), take_over()
    )
    after = await info(nc, changed)
    assert after["config"]["max_ack_pending"] == 77
    # 3 or 5, never from the start: a start-up that finds the durable missing between the takeover's delete and
    # create waits before creating it, and a takeover whose create meets one from an earlier start replaces it.
    assert after["config"].get("opt_start_seq") in (3, 5)


async def test_a_durable_that_cannot_be_updated_stops_start_up_at_once_naming_the_field(
    nc: Client, stream: Settings
) -> None:
    ingest = stream.ingest
    await create(nc, ingest, 1, None, max_waiting=16)
    started = time.monotonic()
    with pytest.raises(ProvisioningError) as raised:
        await ensure_partition_consumer(nc, ingest, 1)
    assert time.monotonic() - started < ingest.member_ttl, "a wrong configuration is not retried"
    message = str(raised.value)
    assert "\n" not in message
    assert "cdc_consumers_p1" in message and "max_waiting" in message
