"""A table with no route is acknowledged and counted as skipped, without publishing or dead-lettering anything."""

from __future__ import annotations

import pytest

from tests.integration.helpers import (
    DLQ,
    OUTPUT,
    consumer_settled,
    count,
    ensure_input,
    feed,
    read_all,
    wait_count,
    wait_until,
)
from tests.sequin import body, encode

USERS = "cdc.acme.users"


@pytest.mark.parametrize(
    "data",
    [
        encode(body("users")),
        # F-2: an unrouted table is acked without parsing the body, so even garbage is skipped, not dead-lettered.
        b"\x00 not json at all {",
    ],
    ids=["sequin_body", "unparseable_body"],
)
async def test_unrouted_table_is_acked_and_skipped(js, start_service, data: bytes) -> None:
    await ensure_input(js)
    svc = start_service()

    await feed(js, USERS, data)
    await wait_until(
        lambda: svc.metric("cdc_consumer_events_total", {"table": "<other>", "result": "skipped"}) == 1,
        what='cdc_consumer_events_total{table="<other>",result="skipped"} == 1',
    )
    info = await consumer_settled(js)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == 1
    assert info.ack_floor.stream_seq == 1  # acked, so the ack floor moved past it

    # One replica publishes in receipt order: once a later routed event is out, the skipped one has had its chance.
    await feed(js, "cdc.acme.messages", body("messages"))
    assert await wait_count(js, OUTPUT, 1) == 1
    [only] = await read_all(js, OUTPUT)
    assert only.subject == "wa.acme.agent-1.messages.chat-1"
    assert await count(js, DLQ) == 0
    await consumer_settled(js)
    assert svc.metric("cdc_consumer_events_total", {"table": "<other>", "result": "skipped"}) == 1
    for result in ("published", "duplicate", "dead_lettered", "retried"):
        assert svc.metric("cdc_consumer_events_total", {"table": "<other>", "result": result}) == 0
    assert svc.metric("cdc_consumer_dead_letters_total") == 0
    # Skipped rows never reach Redis: the dedup lookup counts only the routed event.
    assert svc.metric("cdc_consumer_dedup_lookups_total", {"result": "miss"}) == 1
