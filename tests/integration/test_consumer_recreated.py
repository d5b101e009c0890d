"""The durable consumer deleted while the service runs: the watchdog recreates it and delivery carries on."""

from __future__ import annotations

import pytest
from nats.js.errors import NotFoundError

from tests.integration.helpers import (
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


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_deleted_consumer_is_recreated_and_delivery_carries_on(js, start_service, mode) -> None:
    durable = "cdc_consumers" if mode == "push" else "cdc_pull"
    await ensure_input(js)
    service = start_service(**{"ingest.mode": mode, "ingest.durable": durable, "ingest.consumer_check_interval": 0.2})
    await feed(js, "cdc.acme.messages", body(lsn=1, message_id="before"))
    await wait_until(lambda: count(js, OUTPUT), what="first event published")
    # The watchdog has seen the first event acked: a recreated durable resumes after it.
    await wait_until(lambda: service.metric("cdc_consumer_ack_floor_sequence") >= 1, what="ack floor seen")

    await js.delete_consumer("cdc_events_stream", durable)

    async def recreated() -> bool:
        try:
            await js.consumer_info("cdc_events_stream", durable)
        except NotFoundError:
            return False
        return service.metric("cdc_consumer_consumer_recreated_total") >= 1

    await wait_until(recreated, what="consumer recreated")
    service.wait_ready()

    for i in range(20):
        await feed(js, "cdc.acme.messages", body(lsn=100 + i, message_id=f"after-{i}"))

    async def all_published() -> bool:
        return await count(js, OUTPUT) >= 21

    await wait_until(all_published, what="events after the recreation published")
    info = await consumer_settled(js, durable)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    ids = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
    assert sorted(ids) == sorted({*ids}), "an event was published twice"
    assert len(ids) == 21
    assert service.alive()
    # The new durable resumed after the ack floor: the first event was not delivered again.
    config = (await js.consumer_info("cdc_events_stream", durable)).config
    assert config.opt_start_seq == 2
    assert service.metric("cdc_consumer_events_total", {"result": "duplicate"}) == 0
    await wait_until(lambda: service.metric("cdc_consumer_backlog_messages") == 0, what="backlog gauge at 0")
