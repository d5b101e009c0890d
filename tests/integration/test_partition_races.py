"""Races between replicas over one partition's durable, against a real nats-server.

A takeover deletes the durable and creates it again after its ack floor. Two things must not happen in between:
another replica creating the durable (its create can land while the server is still deleting, leaving a durable
without its store directory), and a durable being created from the start of the partition (everything below the
floor replayed). The membership is a real KV bucket with keys ``a`` and ``b``: partition 0 is ``a``'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from prometheus_client import CollectorRegistry

from cdc_service.adapters.nats_jetstream import ProvisioningError
from cdc_service.adapters.nats_partitions import (
    ApiError,
    PartitionedIntake,
    _api,
    consumer_request,
    create_partition_consumer,
    durable_name,
    ensure_partitioned_stream,
)
from cdc_service.config import IngestSettings, Settings, settings_from_mapping
from cdc_service.metrics import Metrics
from tests.integration.helpers import ensure_input, feed, wait_count
from tests.sequin import body
from tools.polling import wait_for_async

pytestmark = pytest.mark.integration

FLOOR = 3  # messages of partition 0 acked before the takeover


def partitioned(partitions: int = 1) -> Settings:
    # member_ttl long enough that the keys the test writes outlive it
    return settings_from_mapping({"ingest": {"ordering": "partitioned", "partitions": partitions, "member_ttl": 30}})


def subject(ingest: IngestSettings, partition: int = 0) -> str:
    return f"{ingest.partition_stream}.{durable_name(ingest, partition)}"


async def info(nc: Client, ingest: IngestSettings, partition: int = 0) -> dict[str, Any] | None:
    try:
        return await _api(nc, f"$JS.API.CONSUMER.INFO.{subject(ingest, partition)}")
    except ApiError as exc:
        if exc.code == 10014:
            return None
        raise


def resumes_at(consumer: dict[str, Any]) -> int:
    """The first sequence the durable would deliver again: after its ack floor, not before its start."""
    start = int(consumer["config"].get("opt_start_seq") or 1)
    return max(start, int(consumer.get("ack_floor", {}).get("stream_seq") or 0) + 1)


async def create(nc: Client, ingest: IngestSettings, start: int | None) -> None:
    """A plain create of partition 0's durable, as another replica's start-up or recreate sends it."""
    request = consumer_request(ingest, 0, start)
    request["action"] = "create"
    await _api(nc, f"$JS.API.CONSUMER.CREATE.{subject(ingest)}", request)


async def membership(js: JetStreamContext, ingest: IngestSettings, *members: str) -> None:
    config = KeyValueConfig(bucket=ingest.member_bucket, ttl=ingest.member_ttl, history=1)
    config.replicas = ingest.stream_replicas
    kv = await js.create_key_value(config)
    for member in members:
        await kv.put(member, b"1")


async def acked_durable(nc: Client, js: JetStreamContext, settings: Settings) -> None:
    """Partition 0's durable with 6 messages, the first ``FLOOR`` acked (ack floor ``FLOOR``)."""
    ingest = settings.ingest
    await ensure_input(js)
    await ensure_partitioned_stream(js, settings)
    for i in range(6):
        await feed(js, f"cdc.c{i}.messages", body(lsn=i + 1, message_id=f"m{i}"))
    assert await wait_count(js, ingest.partition_stream, 6) == 6
    await create(nc, ingest, None)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{subject(ingest)}",
        b'{"batch": %d, "expires": 2000000000, "group": "cdc"}' % FLOOR,
        reply=inbox,
    )
    for _ in range(FLOOR):
        await (await sub.next_msg(timeout=5)).ack_sync()
    await sub.unsubscribe()
    now = await info(nc, ingest)
    assert now is not None and int(now["ack_floor"]["stream_seq"]) == FLOOR


class AfterDelete:
    """A connection whose request, once a CONSUMER.DELETE is answered, first runs ``then``: another replica's request
    landing between a takeover's delete and its create."""

    def __init__(self, nc: Client, then: Callable[[], Awaitable[None]]) -> None:
        self._nc = nc
        self._then: Callable[[], Awaitable[None]] | None = then

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0) -> Any:
        reply = await self._nc.request(subject, payload, timeout=timeout)
        if subject.startswith("$JS.API.CONSUMER.DELETE.") and self._then is not None:
            then, self._then = self._then, None
            await then()
        return reply


async def test_a_takeover_whose_create_meets_a_create_from_the_start_resumes_after_the_ack_floor(
    nc: Client, js: JetStreamContext
) -> None:
    settings = partitioned()
    ingest = settings.ingest
    await acked_durable(nc, js, settings)
    await membership(js, ingest, "a", "b")
    intruded: list[bool] = []

    async def start_up_of_another_replica() -> None:  # found the durable missing: created it with no start
        await create(nc, ingest, None)
        intruded.append(True)

    owner = PartitionedIntake(
        AfterDelete(nc, start_up_of_another_replica), js, settings, Metrics(CollectorRegistry()), "a"
    )  # type: ignore[arg-type]

    await owner._partitions[0]._take_over(1)

    assert intruded, "the other replica's create landed between the takeover's delete and its create"
    after = await info(nc, ingest)
    assert after is not None
    assert resumes_at(after) == FLOOR + 1, f"the partition would be replayed from {resumes_at(after)}"


async def test_a_puller_that_no_longer_owns_its_partition_does_not_create_the_durable_a_takeover_deleted(
    nc: Client, js: JetStreamContext
) -> None:
    settings = partitioned()
    ingest = settings.ingest
    await acked_durable(nc, js, settings)
    await membership(js, ingest, "a", "b")
    await _api(nc, f"$JS.API.CONSUMER.DELETE.{subject(ingest)}")  # a's takeover: deleted, its create not sent yet
    received: list[Msg] = []

    async def on_batch(msgs: list[Msg]) -> None:
        received.extend(msgs)

    stale = PartitionedIntake(nc, js, settings, Metrics(CollectorRegistry()), "b")  # has not seen a's key yet
    puller = stale._partitions[0]
    puller.start(on_batch)
    try:

        async def reacted() -> bool:  # stopped pulling (not its partition), or recreated the durable
            return puller.idle or await info(nc, ingest) is not None

        await wait_for_async(reacted, 15.0, what="the puller to react to the missing durable")
        await create_partition_consumer(nc, ingest, 0, FLOOR + 1)  # a's takeover completes

        after = await info(nc, ingest)
        assert after is not None
        assert resumes_at(after) == FLOOR + 1, "the stale puller created the durable in the takeover's stead"
        assert puller.idle and not puller.running
        assert received == []
    finally:
        puller.running = False
        if puller.task is not None:
            await puller.task


async def test_start_up_creates_only_the_durables_of_the_partitions_it_owns(nc: Client, js: JetStreamContext) -> None:
    settings = partitioned(partitions=2)
    ingest = settings.ingest
    await ensure_input(js)
    await ensure_partitioned_stream(js, settings)
    await membership(js, ingest, "a")  # with b: partition 0 is a's, 1 is b's
    intake = PartitionedIntake(nc, js, settings, Metrics(CollectorRegistry()), "b")

    async def on_batch(msgs: list[Msg]) -> None:
        raise AssertionError("nothing to pull")

    await intake.start(on_batch)
    try:
        assert await info(nc, ingest, 1) is not None
        assert await info(nc, ingest, 0) is None, "b created a's durable"
        assert intake.owned() == [1]
    finally:
        await intake.stop()


async def test_a_start_up_that_cannot_provision_gives_its_membership_back(nc: Client, js: JetStreamContext) -> None:
    """Start-up joins the membership before it checks the durables; one it cannot use stops it, and its key goes at
    once, so the others do not leave it a share until the key expires."""
    settings = partitioned(partitions=2)
    ingest = settings.ingest
    await ensure_input(js)
    await ensure_partitioned_stream(js, settings)
    request = consumer_request(ingest, 1, None)
    request["config"]["max_waiting"] = 16  # fixed at creation: the service cannot use it
    await _api(nc, f"$JS.API.CONSUMER.CREATE.{subject(ingest, 1)}", request)
    await membership(js, ingest, "a")
    intake = PartitionedIntake(nc, js, settings, Metrics(CollectorRegistry()), "b")

    async def on_batch(msgs: list[Msg]) -> None:
        raise AssertionError("nothing to pull")

    with pytest.raises(ProvisioningError, match="max_waiting"):
        await intake.start(on_batch)
    assert await intake.live_members() == ["a"]
