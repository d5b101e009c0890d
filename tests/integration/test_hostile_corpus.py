"""The whole hostile corpus (tests/corpus/hostile.py) through one service process, each bad message followed by a
good one: every case gets its documented outcome, and nothing else is disturbed."""

from __future__ import annotations

from collections import Counter

from tests.corpus.hostile import CASES, MAX_PAYLOAD_BYTES, PUBLISHED, SKIPPED
from tests.integration.helpers import (
    DLQ,
    INPUT,
    OUTPUT,
    consumer_settled,
    ensure_input,
    feed,
    payloads,
    read_all,
    wait_count,
    wait_until,
)
from tests.sequin import body

GOOD_SUBJECT = "cdc.acme.messages"
# Known service bugs (xfail in the unit corpus) would be retried until max_deliveries: fed by the unit test only.
WIRE = [case for case in CASES if case.wire and not case.xfail]


async def test_hostile_corpus_interleaved_with_good_messages(js, start_service) -> None:
    assert len(WIRE) >= 30
    await ensure_input(js, ["cdc.>"])
    svc = start_service(**{"ingest.subjects": ["cdc.>"], "ingest.max_payload_bytes": MAX_PAYLOAD_BYTES})

    by_seq = {}
    good_ids = []
    for i, case in enumerate(WIRE):
        by_seq[await feed(js, case.subject, case.data)] = case
        await feed(js, GOOD_SUBJECT, body("messages", message_id=f"good-{i}"))
        good_ids.append(f"1000:chatdb:acme:messages:good-{i}")

    dead = [case for case in WIRE if case.expected not in (SKIPPED, PUBLISHED)]
    published = [case.event_id for case in WIRE if case.expected == PUBLISHED]
    expected_ids = good_ids + published

    assert await wait_count(js, OUTPUT, len(expected_ids)) >= len(expected_ids), svc.output()[-3000:]
    assert await wait_count(js, DLQ, len(dead)) >= len(dead), svc.output()[-3000:]
    info = await consumer_settled(js)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == 2 * len(WIRE)

    # Every good event, and every published hostile case, exactly once.
    events = payloads(await read_all(js, OUTPUT))
    assert Counter(e["event_id"] for e in events) == Counter(expected_ids)

    # The dead-letter stream holds exactly the dead-letter cases, each with its reason and its original bytes.
    letters = await read_all(js, DLQ)
    assert len(letters) == len(dead)
    seen = set()
    for letter in letters:
        headers = letter.headers or {}
        seq = int(headers["Cdc-Source-Seq"])
        case = by_seq[seq]
        seen.add(case.name)
        assert headers.get("Cdc-Error-Reason") == case.expected, (case.name, headers)
        assert headers.get("Cdc-Source-Stream") == INPUT
        assert headers.get("Cdc-Source-Subject") == case.subject, case.name
        assert headers.get("Cdc-Delivered") == "1", case.name
        assert "Cdc-Body-Truncated" not in headers, case.name
        assert letter.subject == f"dlq.{case.subject}"
        assert (letter.data or b"") == case.data, case.name  # nats-py reads an empty body as None
    assert seen == {case.name for case in dead}

    reasons = Counter(case.expected for case in dead)
    await wait_until(
        lambda: all(svc.metric("cdc_consumer_dead_letters_total", {"reason": r}) == n for r, n in reasons.items()),
        what=f"cdc_consumer_dead_letters_total per reason == {dict(reasons)}",
    )
    assert svc.metric("cdc_consumer_dead_letters_total") == len(dead)
    assert svc.metric("cdc_consumer_events_total", {"result": "dead_lettered"}) == len(dead)
    assert svc.metric("cdc_consumer_events_total", {"result": "skipped"}) == sum(c.expected == SKIPPED for c in WIRE)
    assert svc.metric("cdc_consumer_events_total", {"result": "published"}) == len(expected_ids)
    assert svc.metric("cdc_consumer_events_total", {"result": "retried"}) == 0
    assert svc.metric("cdc_consumer_handler_errors_total") == 0
    assert svc.alive()
    assert svc.get("/readyz")[0] == 200
