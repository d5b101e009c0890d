"""Hostile subjects at the edges of the protocol, against real servers (issue: one hostile message must never crash,
deafen or silently drop anything): a subject near the server's control-line limit, a subject that is not UTF-8,
and a subject with a literal wildcard token. Each is followed by good events, which must all be published, while
the bad one is dead-lettered with its reason and the service stays alive and ready."""

from __future__ import annotations

from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cdc_service.core.subjects import MAX_OUTBOUND_SUBJECT_BYTES
from tests.integration.helpers import (
    DLQ,
    INPUT,
    OUTPUT,
    consumer_settled,
    ensure_input,
    feed,
    payloads,
    raw_publish,
    read_all,
    wait_count,
)
from tests.sequin import body, encode

GOOD = "cdc.acme.messages"


async def _feed_good(js: Any, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        await feed(js, GOOD, body("messages", message_id=f"{tag}-{i}"))
        ids.append(f"{tag}-{i}")
    return ids


async def _assert_all_published_and_one_dead_letter(js: Any, svc: Any, good: list[str], reason: str) -> Any:
    assert await wait_count(js, OUTPUT, len(good), timeout=15) >= len(good), svc.output()[-3000:]
    assert await wait_count(js, DLQ, 1, timeout=15) >= 1, svc.output()[-3000:]
    info = await consumer_settled(js)
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert info.num_redelivered == 0
    events = payloads(await read_all(js, OUTPUT))
    assert sorted(e["row_data"]["message_id"] for e in events) == sorted(good)
    letters = await read_all(js, DLQ)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.headers["Cdc-Error-Reason"] == reason, letter.headers
    assert len(letter.subject.encode()) <= MAX_OUTBOUND_SUBJECT_BYTES
    assert svc.alive()
    assert svc.get("/readyz")[0] == 200
    assert svc.get("/healthz")[0] == 200
    return letter


async def test_subject_at_the_control_line_limit_is_dead_lettered_without_a_crash(js, nats_server, start_service):
    await ensure_input(js)
    svc = start_service()
    subject = "cdc." + "C" * 4040 + ".messages"
    raw_publish(nats_server.url, subject.encode(), b'{"record": null}')
    good = await _feed_good(js, 5, "after-long")
    letter = await _assert_all_published_and_one_dead_letter(js, svc, good, "missing_field")
    assert letter.headers["Cdc-Source-Subject"] == subject
    assert letter.data == b'{"record": null}'
    assert svc.metric("cdc_consumer_nats_reconnects_total") == 0
    assert "closed for good" not in svc.output()


async def test_subject_that_is_not_utf8_is_dead_lettered_and_intake_keeps_running(js, nats_server, start_service):
    await ensure_input(js)
    svc = start_service()
    data = encode(body("messages", message_id="bad-subject", company_id=None))
    raw_publish(nats_server.url, b"cdc.\xff\xfe.messages", data)
    good = await _feed_good(js, 5, "after-utf8")
    letter = await _assert_all_published_and_one_dead_letter(js, svc, good, "invalid_subject_token")
    assert letter.headers["Cdc-Source-Subject"] == "cdc.\\xff\\xfe.messages"
    assert letter.headers["Cdc-Source-Subject-Escaped"] == "true"
    assert letter.data == data
    assert svc.metric("cdc_consumer_nats_reconnects_total") == 0


async def test_subject_with_wildcard_tokens_is_delivered_and_dead_lettered(js, start_service):
    await ensure_input(js)
    svc = start_service()
    good = []
    for subject in ("cdc.>.messages", "cdc.*.messages", "cdc.acme.>"):
        await feed(js, subject, body("messages", message_id="wild", company_id=None))
        good += await _feed_good(js, 1, f"after-{subject}")
    assert await wait_count(js, OUTPUT, len(good)) >= len(good), svc.output()[-3000:]
    assert await wait_count(js, DLQ, 2) >= 2, svc.output()[-3000:]
    info = await consumer_settled(js)
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert info.delivered.consumer_seq == 6  # nothing skipped by the consumer's filter
    assert svc.metric("cdc_consumer_events_total", {"result": "skipped"}) == 1  # table ">" has no route
    letters = await read_all(js, DLQ)
    assert sorted(m.headers["Cdc-Source-Subject"] for m in letters) == ["cdc.*.messages", "cdc.>.messages"]
    for letter in letters:
        assert letter.headers["Cdc-Error-Reason"] == "invalid_subject_token"
        assert not {"*", ">"} & set(letter.subject.split(".")), letter.subject
    assert svc.metric("cdc_consumer_dead_letters_total") == 2


async def test_existing_filtered_durable_is_updated_to_receive_every_stored_message(js, start_service):
    """A deployment from before this change has a durable filtered on the stream's own subjects; it is updated in
    place (same name, same position) and then receives wildcard-token subjects too."""
    await ensure_input(js)
    old = ConsumerConfig(
        durable_name="cdc_consumers",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject="cdc.*.*",
        deliver_subject="deliver.cdc_consumers",
        deliver_group="cdc_consumers",
        max_deliver=3,
    )
    await js.add_consumer(INPUT, old)
    svc = start_service()
    info = await js.consumer_info(INPUT, "cdc_consumers")
    assert info.config.filter_subject == "cdc.>"
    await feed(js, "cdc.>.messages", body("messages", message_id="wild", company_id=None))
    good = await _feed_good(js, 2, "after-update")
    assert await wait_count(js, OUTPUT, len(good)) >= len(good), repr(await js.consumer_info(INPUT, "cdc_consumers"))
    assert await wait_count(js, DLQ, 1) >= 1, svc.output()[-3000:]


async def test_restart_reading_brings_a_dead_read_loop_back(nats_server) -> None:
    """The recovery the service runs when nats-py's read loop has ended: against a real server, a read loop killed by
    an unexpected exception is seen as stopped, and after restart_reading the subscription receives again."""
    from cdc_service.adapters.nats_jetstream import connect, read_loop_stopped, restart_reading
    from cdc_service.config import NatsSettings
    from tests.integration.helpers import wait_until

    async def nothing() -> None:
        return None

    nc = await connect(
        NatsSettings(url=(nats_server.url,)),
        on_disconnected=nothing,
        on_reconnected=nothing,
        on_closed=nothing,
    )
    try:
        received: list[bytes] = []

        async def on_msg(msg: Any) -> None:
            received.append(msg.data)

        await nc.subscribe("edge.test", cb=on_msg)
        parse = nc._ps.parse

        async def broken(data: bytes = b"") -> None:
            nc._ps.parse = parse  # fail once
            raise RuntimeError("injected")

        nc._ps.parse = broken
        await nc.publish("edge.test", b"lost")
        await wait_until(lambda: read_loop_stopped(nc), what="read loop stopped")
        await restart_reading(nc)
        await wait_until(lambda: nc.is_connected and not read_loop_stopped(nc), what="reconnected")
        await nc.publish("edge.test", b"after")
        await wait_until(lambda: b"after" in received, what="message after the restart")
    finally:
        await nc.close()


async def test_changes_that_differ_only_in_pk_whitespace_tenant_or_database_are_all_published(
    js, start_service, redis_client
):
    """Two different changes never share a de-duplication key: primary keys that differ by trailing whitespace
    (nats-py strips header values), two tenants, and two databases with the same LSN and primary key."""
    await ensure_input(js, ["cdc.>"])
    svc = start_service(**{"ingest.subjects": ["cdc.>"]})
    sent = [
        ("cdc.acme.messages", body("messages", lsn=40000, message_id="k1")),
        ("cdc.acme.messages", body("messages", lsn=40000, message_id="k1 ")),
        ("cdc.globex.messages", body("messages", lsn=40000, message_id="k1", company_id="globex")),
    ]
    other_db = body("messages", lsn=40000, message_id="k1", company_id="initech")
    other_db["metadata"]["database_name"] = "archive"
    sent += [
        ("cdc.initech.messages", body("messages", lsn=40000, message_id="k1", company_id="initech")),
        ("cdc.initech.messages", other_db),
    ]
    for subject, doc in sent:
        await feed(js, subject, doc)
    assert await wait_count(js, OUTPUT, len(sent)) >= len(sent), svc.output()[-3000:]
    info = await consumer_settled(js)
    assert info.num_pending == 0 and info.num_ack_pending == 0
    events = payloads(await read_all(js, OUTPUT))
    assert len(events) == len(sent)
    assert len({e["event_id"] for e in events}) == len(sent)
    assert sorted((e["company_id"], e["message_id"]) for e in events) == sorted(
        (doc["record"]["company_id"], doc["record"]["message_id"]) for _, doc in sent
    )
    assert svc.metric("cdc_consumer_events_total", {"result": "duplicate"}) == 0
    # Each has its own Redis marker, spelled exactly like its Nats-Msg-Id.
    for event in events:
        assert redis_client.exists(f"dedup:{event['event_id']}") == 1


async def test_unrouted_table_names_do_not_grow_the_metrics(js, start_service):
    """Label values never come from input: many distinct unrouted tables share one ``table`` label."""
    await ensure_input(js)
    svc = start_service()
    for i in range(60):
        await feed(js, f"cdc.acme.unrouted_{i}", b"{}")
    await feed(js, "cdc.acme.messages", body("messages", message_id="routed"))
    assert await wait_count(js, OUTPUT, 1) >= 1
    await consumer_settled(js)
    _, text = svc.get("/metrics")
    assert b"unrouted_" not in text
    assert svc.metric("cdc_consumer_events_total", {"table": "<other>", "result": "skipped"}) == 60
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 1


async def test_dead_letter_headers_and_logs_quote_no_body_text(js, start_service):
    await ensure_input(js)
    svc = start_service()
    canary = "s3cr3t-canary"
    bad_action = body("messages", message_id="a1")
    bad_action["action"] = canary
    bad_table = body("messages", message_id="a2")
    bad_table["metadata"]["table_name"] = canary
    for doc in (bad_action, bad_table):
        await feed(js, GOOD, doc)
    assert await wait_count(js, DLQ, 2) >= 2, svc.output()[-3000:]
    await consumer_settled(js)
    for letter in await read_all(js, DLQ):
        headers = {k: v for k, v in letter.headers.items() if k != "Cdc-Source-Subject"}
        assert canary not in repr(headers), headers
        assert letter.data is not None and canary.encode() in letter.data  # the original bytes are kept
    assert canary not in svc.output()


async def test_row_data_numbers_arrive_byte_for_byte(js, start_service):
    await ensure_input(js)
    svc = start_service()
    data = encode(body("messages", message_id="numeric")).replace(
        b'"id": 1', b'"id": 1, "amount": 123456789012345678901234567890.5, "rate": 1E2, "zero": -0'
    )
    await feed(js, GOOD, data)
    assert await wait_count(js, OUTPUT, 1) >= 1, svc.output()[-3000:]
    [event] = await read_all(js, OUTPUT)
    assert b'"amount":123456789012345678901234567890.5,"rate":1E2,"zero":-0,' in event.data


def _delete_with_pk_only(message_id: str, lsn: int) -> dict[str, Any]:
    """A Sequin delete of a table without REPLICA IDENTITY FULL: only the primary key, every other column null."""
    doc = body("messages", lsn=lsn, action="delete", message_id=message_id)
    doc["record"] = {k: (v if k == "message_id" else None) for k, v in doc["record"].items()}
    return doc


async def test_deletes_without_routing_fields_are_routed_from_the_routing_cache(js, start_service, redis_client):
    await ensure_input(js)
    svc = start_service(**{"routes.messages.routing_cache": True})
    await feed(js, GOOD, body("messages", lsn=10, message_id="m1", agent_id="agent-7", chat_id="chat-9"))
    assert await wait_count(js, OUTPUT, 1) >= 1, svc.output()[-3000:]
    await consumer_settled(js)
    await feed(js, GOOD, _delete_with_pk_only("m1", 11))
    # Inserted and deleted back to back (one batch): routed from the fields seen moments before.
    await feed(js, GOOD, body("messages", lsn=12, message_id="m3", agent_id="agent-8", chat_id="chat-3"))
    await feed(js, GOOD, _delete_with_pk_only("m3", 13))
    await feed(js, GOOD, _delete_with_pk_only("never-seen", 14))
    assert await wait_count(js, OUTPUT, 4) >= 4, svc.output()[-3000:]
    assert await wait_count(js, DLQ, 1) >= 1, svc.output()[-3000:]
    await consumer_settled(js)
    events = await read_all(js, OUTPUT)
    by_id = {(m.subject, payloads([m])[0]["action"]) for m in events}
    assert ("wa.acme.agent-7.messages.chat-9", "delete") in by_id
    assert ("wa.acme.agent-8.messages.chat-3", "delete") in by_id
    [letter] = await read_all(js, DLQ)
    assert letter.headers["Cdc-Error-Reason"] == "missing_field"
    assert redis_client.ttl("route:chatdb:acme:messages:m1") > 80_000  # dedup.routing_ttl, 1 day by default


async def test_without_the_routing_cache_a_delete_lacking_routing_fields_is_dead_lettered(js, start_service):
    await ensure_input(js)
    svc = start_service(**{"routes.messages.routing_cache": False})
    await feed(js, GOOD, body("messages", lsn=10, message_id="m1"))
    await feed(js, GOOD, _delete_with_pk_only("m1", 11))
    assert await wait_count(js, DLQ, 1) >= 1, svc.output()[-3000:]
    assert await wait_count(js, OUTPUT, 1) >= 1
    [letter] = await read_all(js, DLQ)
    assert letter.headers["Cdc-Error-Reason"] == "missing_field"


async def test_an_input_stream_made_with_a_wider_subject_is_used_as_it_is(js, start_service):
    """An input stream made with ``cdc.>`` (a common Sequin set-up) already captures the default ``cdc.*.*``:
    provisioning adds nothing. Adding it would overlap, JetStream would refuse the update, and start-up would stop."""
    await ensure_input(js, ["cdc.>"])
    start_service()
    await feed(js, "cdc.acme.messages", body("messages", lsn=7, message_id="m7"))
    assert await wait_count(js, OUTPUT, 1) == 1
    assert (await js.stream_info(INPUT)).config.subjects == ["cdc.>"]
