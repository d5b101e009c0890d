"""``python -m cdc_service dlq list`` and ``dlq replay`` end to end: poison is dead-lettered by the real service, the
tools run as subprocesses against the same servers."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

import orjson
from nats.js.api import StreamConfig

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
    wait_count,
    wait_until,
)
from tests.sequin import body, encode
from tests.servers import REPO, free_port, service_env

SUBJECT = "cdc.acme.messages"
INVALID_JSON = b'{"record": {"message_id": "m1",\n\t'
TENANT_MISMATCH = encode(body("messages", company_id="globex"))
SMALL_LIMIT = {"ingest.max_payload_bytes": 3000}


def _big(table: str, lsn: int) -> bytes:
    """A good event whose body is over ``SMALL_LIMIT``: payload_too_large there, fine with the default limit."""
    return encode(body(table, lsn=lsn, padding="x" * 4096))


async def cli(nats_server: Any, redis_server: Any, *args: str) -> tuple[int, str, str]:
    env = service_env(nats_server.url, redis_server.url, free_port())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cdc_service",
        "dlq",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def dead_letter(js: Any, subject: str, data: bytes) -> None:
    """Feed one message and wait until the service dead-lettered it (one at a time keeps the DLQ order known)."""
    before = await count(js, DLQ)
    await feed(js, subject, data)
    assert await wait_count(js, DLQ, before + 1) == before + 1


async def reasons_in_dlq(js: Any) -> list[str]:
    return [(m.headers or {}).get("Cdc-Error-Reason", "") for m in await read_all(js, DLQ)]


def table_rows(stdout: str) -> list[list[str]]:
    """Rows of the ``list`` table, split at the header's column offsets into (seq, age, reason, subject, detail,
    preview)."""
    lines = stdout.splitlines()
    header = lines[0]
    assert header.split() == ["SEQ", "AGE", "REASON", "SUBJECT", "DETAIL", "PREVIEW"], stdout
    assert re.fullmatch(r"\d+ shown, \d+ in cdc_dlq_stream", lines[-1]), stdout
    starts = [header.index(name) for name in header.split()]
    ends = [*starts[1:], None]
    return [[line[a:b].strip() for a, b in zip(starts, ends, strict=True)] for line in lines[1:-1]]


async def test_list_shows_reason_subject_age_and_preview_without_consuming(
    js, start_service, nats_server, redis_server
) -> None:
    await ensure_input(js)
    svc = start_service(**SMALL_LIMIT)
    await dead_letter(js, SUBJECT, INVALID_JSON)
    await dead_letter(js, SUBJECT, TENANT_MISMATCH)
    await dead_letter(js, "cdc.acme.chats", _big("chats", 2002))
    assert svc.alive()

    code, out, err = await cli(nats_server, redis_server, "list")
    assert code == 0, err
    rows = table_rows(out)
    assert [r[2] for r in rows] == ["invalid_json", "tenant_mismatch", "payload_too_large"]
    assert [r[3] for r in rows] == [SUBJECT, SUBJECT, "cdc.acme.chats"]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for row in rows:
        assert re.fullmatch(r"\d+s", row[1]), row  # seconds old
    assert rows[0][5] == '{"record": {"message_id": "m1",\\n\\t'  # escaped, on one line
    assert rows[1][5].startswith('{"record": {"id": 1, "message_id": "msg-1"')
    assert len(rows[1][5]) == 80
    assert rows[1][5].endswith("…")
    # The detail tells two rows of one reason apart without --json.
    assert rows[0][4].startswith("body is not valid JSON: ")
    assert rows[2][4].startswith("body is ")
    assert out.splitlines()[-1] == "3 shown, 3 in cdc_dlq_stream"

    code, out, err = await cli(nats_server, redis_server, "list", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["seq"], x["reason"], x["source_subject"]) for x in lines] == [
        (1, "invalid_json", SUBJECT),
        (2, "tenant_mismatch", SUBJECT),
        (3, "payload_too_large", "cdc.acme.chats"),
    ]
    assert lines[1]["detail"]
    assert lines[1]["source_stream"] == INPUT
    assert lines[2]["size"] == len(_big("chats", 2002))
    assert lines[2]["delivered"] == 1
    assert all(0 <= x["age_seconds"] < 60 for x in lines)

    code, out, _ = await cli(nats_server, redis_server, "list", "--reason", "tenant_mismatch")
    assert code == 0
    assert [r[2] for r in table_rows(out)] == ["tenant_mismatch"]
    assert out.splitlines()[-1] == "1 shown, 3 in cdc_dlq_stream"

    code, out, _ = await cli(nats_server, redis_server, "list", "--limit", "2")
    assert [r[2] for r in table_rows(out)] == ["invalid_json", "tenant_mismatch"]

    reasons = ["--reason", "invalid_json", "--reason", "payload_too_large"]
    code, out, _ = await cli(nats_server, redis_server, "list", "--json", *reasons, "--limit", "5")
    assert [json.loads(line)["reason"] for line in out.splitlines()] == ["invalid_json", "payload_too_large"]

    code, _, err = await cli(nats_server, redis_server, "list", "--limit", "0")
    assert code == 2
    assert "--limit" in err

    # Reading consumed nothing and left no consumer behind.
    info = await js.stream_info(DLQ)
    assert info.state.messages == 3
    assert info.state.consumer_count == 0


async def test_replay_after_the_cause_is_fixed(js, start_service, nats_server, redis_server) -> None:
    await ensure_input(js)
    small = start_service(**SMALL_LIMIT)
    await dead_letter(js, SUBJECT, INVALID_JSON)
    await dead_letter(js, SUBJECT, _big("messages", 2001))
    await dead_letter(js, SUBJECT, TENANT_MISMATCH)
    await dead_letter(js, "cdc.acme.chats", _big("chats", 2002))
    assert await count(js, OUTPUT) == 0
    assert small.stop() == 0

    # The cause goes away: a replica with the default limit (1 MiB).
    svc = start_service()
    inputs = await count(js, INPUT)

    code, out, err = await cli(nats_server, redis_server, "replay", "--reason", "payload_too_large", "--dry-run")
    assert code == 0, err
    assert out.splitlines() == [
        f"would replay seq=2 reason=payload_too_large subject={SUBJECT} ({len(_big('messages', 2001))} bytes) "
        f"to {INPUT}",
        f"would replay seq=4 reason=payload_too_large subject=cdc.acme.chats ({len(_big('chats', 2002))} bytes) "
        f"to {INPUT}",
        "dry run: would_replay=2 skipped=0; nothing published or removed",
    ]
    assert await count(js, DLQ) == 4
    assert await count(js, INPUT) == inputs

    code, out, err = await cli(nats_server, redis_server, "replay", "--reason", "payload_too_large", "--limit", "1")
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"replayed seq=2 reason=payload_too_large subject={SUBJECT} -> {INPUT}")
    assert out.splitlines()[-1] == "replayed=1 failed=0 skipped=0"
    assert await wait_count(js, OUTPUT, 1) == 1, svc.output()[-3000:]
    assert await reasons_in_dlq(js) == ["invalid_json", "tenant_mismatch", "payload_too_large"]

    code, out, err = await cli(nats_server, redis_server, "replay", "--reason", "payload_too_large")
    assert code == 0, err
    assert out.splitlines()[-1] == "replayed=1 failed=0 skipped=0"
    assert await wait_count(js, OUTPUT, 2) == 2, svc.output()[-3000:]

    # Each replayed event reached the output exactly once; the other reasons stay dead-lettered.
    await consumer_settled(js)
    events = payloads(await read_all(js, OUTPUT))
    assert sorted(e["event_id"] for e in events) == ["2001:chatdb:acme:messages:msg-1", "2002:chatdb:acme:chats:chat-1"]
    assert await reasons_in_dlq(js) == ["invalid_json", "tenant_mismatch"]
    assert [m.seq for m in await read_all(js, DLQ)] == [1, 3]
    assert await count(js, INPUT) == inputs + 2

    code, out, err = await cli(nats_server, redis_server, "replay", "--reason", "payload_too_large")
    assert code == 0, err
    assert out.splitlines() == ["replayed=0 failed=0 skipped=0"]

    # A message whose cause is still there is just dead-lettered again, under a new sequence.
    code, out, err = await cli(nats_server, redis_server, "replay", "--reason", "invalid_json")
    assert code == 0, err
    assert out.splitlines()[-1] == "replayed=1 failed=0 skipped=0"

    async def invalid_json_again() -> bool:
        return [(m.seq, (m.headers or {})["Cdc-Error-Reason"]) for m in await read_all(js, DLQ)][-1][0] > 4

    await wait_until(invalid_json_again, what="invalid_json dead-lettered again")
    messages = await read_all(js, DLQ)
    assert [(m.headers or {})["Cdc-Error-Reason"] for m in messages] == ["tenant_mismatch", "invalid_json"]
    assert messages[-1].data == INVALID_JSON
    assert await count(js, OUTPUT) == 2
    assert svc.alive()


async def test_replay_without_the_source_stream_removes_nothing(js, start_service, nats_server, redis_server) -> None:
    await ensure_input(js)
    svc = start_service(**SMALL_LIMIT)
    await dead_letter(js, SUBJECT, _big("messages", 2001))
    assert svc.stop() == 0
    await js.delete_stream(INPUT)

    code, out, err = await cli(nats_server, redis_server, "replay")
    assert code == 1
    assert err.splitlines() == [
        "cdc_service dlq replay: source stream cdc_events_stream (ingest.stream) does not exist; "
        "nothing replayed or removed"
    ]
    assert "Traceback" not in err
    assert out == ""
    assert await reasons_in_dlq(js) == ["payload_too_large"]


async def test_replay_stops_at_the_first_publish_the_source_refuses(
    js, start_service, nats_server, redis_server
) -> None:
    await ensure_input(js)
    svc = start_service(**SMALL_LIMIT)
    await dead_letter(js, SUBJECT, _big("messages", 2001))
    await dead_letter(js, "cdc.acme.chats", _big("chats", 2002))
    await dead_letter(js, "cdc.acme.agents", _big("agents", 2003))
    assert svc.stop() == 0
    # The source stream now captures only the messages subject: the chats publish gets no stream.
    await js.delete_stream(INPUT)
    await js.add_stream(StreamConfig(name=INPUT, subjects=[SUBJECT]))

    code, out, err = await cli(nats_server, redis_server, "replay")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"replayed seq=1 reason=payload_too_large subject={SUBJECT} -> {INPUT} seq 1")
    assert lines[-1] == "replayed=1 failed=1 skipped=0"
    [line] = err.splitlines()
    assert line.startswith(
        "cdc_service dlq replay: cdc_events_stream did not accept dead letter seq=2 reason=payload_too_large "
        "subject=cdc.acme.chats: "
    ), line
    assert line.endswith("stopped, it and the rest stay in cdc_dlq_stream")

    # The first went to the source and left the DLQ; the refused one and the one after it are untouched.
    [replayed] = await read_all(js, INPUT)
    assert replayed.subject == SUBJECT
    assert replayed.data == _big("messages", 2001)
    assert [m.seq for m in await read_all(js, DLQ)] == [2, 3]


async def test_replay_skips_other_streams_and_falls_back_to_the_subject(
    js, start_service, nats_server, redis_server
) -> None:
    await ensure_input(js)
    svc = start_service()  # provisions the dead-letter stream
    assert svc.stop() == 0
    agents = encode(body("agents", lsn=3001))
    await js.publish(
        "dlq.cdc.acme.messages",
        b"{}",
        headers={"Cdc-Error-Reason": "payload_too_large", "Cdc-Source-Stream": "legacy_stream"},
    )
    await js.publish("dlq.cdc.acme.agents", agents)  # no headers at all: reason unknown, subject from the prefix

    code, out, err = await cli(nats_server, redis_server, "list", "--json")
    assert code == 0, err
    assert [(x["reason"], x["source_subject"]) for x in map(orjson.loads, out.splitlines())] == [
        ("payload_too_large", SUBJECT),
        ("unknown", "cdc.acme.agents"),
    ]

    code, out, err = await cli(nats_server, redis_server, "replay")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        f"skipped seq=1 reason=payload_too_large subject={SUBJECT}: it came from stream legacy_stream, "
        f"not {INPUT} (ingest.stream)"
    )
    assert lines[1].startswith(f"replayed seq=2 reason=unknown subject=cdc.acme.agents -> {INPUT}")
    assert lines[-1] == "replayed=1 failed=0 skipped=1"
    assert [m.seq for m in await read_all(js, DLQ)] == [1]
    [replayed] = await read_all(js, INPUT)
    assert (replayed.subject, replayed.data) == ("cdc.acme.agents", agents)


async def test_a_missing_dead_letter_stream_is_one_line_and_status_1(js, nats_server, redis_server) -> None:
    assert await count(js, DLQ) == 0  # the fixture deleted every stream
    for args in (["list"], ["replay"], ["replay", "--dry-run"]):
        code, out, err = await cli(nats_server, redis_server, *args)
        assert code == 1, (args, out, err)
        assert err.splitlines() == [
            f"cdc_service dlq {args[0]}: dead-letter stream cdc_dlq_stream (dlq.stream) does not exist on this server"
        ], (args, err)
        assert out == ""
