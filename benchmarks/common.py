"""Pieces shared by the end-to-end benchmark, the bare relays and the producer: payloads, JetStream API calls that
nats-py does not expose (server timestamps), and small helpers."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tests.sequin import body

IN_STREAM = "cdc_events_stream"
IN_SUBJECTS = ["cdc.*.*"]
OUT_STREAM = "wa_stream"
OUT_SUBJECTS = ["wa.>"]
DLQ_STREAM = "cdc_dlq_stream"
PUSH_DURABLE = "cdc_consumers"
PULL_DURABLE = "cdc_pull"
DELIVER_SUBJECT = "deliver.cdc_consumers"
QUEUE_GROUP = "cdc_consumers"
MAX_ACK_PENDING = 5000
TABLES = ("messages", "chats", "agents")
COMPANIES = 8
TARGET_BYTES = 600


def _ids(table: str, i: int) -> dict[str, Any]:
    """Record overrides for event ``i`` of ``table``: its company, agent, chat and message ids."""
    ids: dict[str, Any] = {"company_id": f"co{i % COMPANIES}", "agent_id": f"a{i % 50}"}
    if table in ("messages", "chats"):
        ids["chat_id"] = f"c{i % 500}"
    if table == "messages":
        ids["message_id"] = f"m{i}"
    return ids


def _padded(table: str, i: int) -> bytes:
    doc = body(table, lsn=i + 1, **_ids(table, i))
    data = orjson.dumps(doc)
    short = TARGET_BYTES - len(data)
    if short > 0:
        record = doc["record"]
        if table == "chats":
            record["last_message"] = {"text": record["last_message"]["text"] + " " + "x" * (short - 1)}
        elif table == "agents":
            record["agent_name"] = record["agent_name"] + " " + "x" * (short - 1)
        data = orjson.dumps(doc)
    return data


def make_events(count: int) -> list[tuple[str, bytes]]:
    """``count`` Sequin insert bodies with ``commit_lsn`` 1..count, tables and 8 companies in rotation.

    Messages keep the seed's ~625 B; chats and agents are padded to ~600 B. Every event id is distinct.
    """
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        table = TABLES[i % len(TABLES)]
        out.append((f"cdc.co{i % COMPANIES}.{table}", _padded(table, i)))
    return out


def lsn_of_body(data: bytes) -> int:
    return int(orjson.loads(data)["metadata"]["commit_lsn"])


def lsn_of_event_id(event_id: str) -> int:
    """``<lsn>[.<idx>]:<database>:<company>:<table>:<pk>`` → lsn."""
    return int(event_id.split(":", 1)[0].split(".", 1)[0])


# ------------------------------------------------------------------------------------------------ server timestamps


def reply_timestamp_ns(reply: str) -> int:
    """The server's store time (ns since the epoch) from a JetStream delivery's ack subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[7])
    return int(tokens[Msg.Ack.Timestamp])


def rfc3339_ns(text: str) -> int:
    """``2026-11-27T05:07:23.123456789Z`` (what nats-server writes) → ns since the epoch."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1]
        offset = "+00:00"
    else:
        text, offset = text[:-6], text[-6:]
    whole, _, frac = text.partition(".")
    seconds = datetime.datetime.fromisoformat(whole + offset).timestamp()
    return int(seconds) * 1_000_000_000 + int((frac + "000000000")[:9])


# ------------------------------------------------------------------------------------------------ JetStream API


class JsApiError(RuntimeError):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (code {code})")
        self.code = code


async def js_api(nc: Client, call: str, payload: dict[str, Any] | None = None, wait: float = 5.0) -> dict[str, Any]:
    """One raw ``$JS.API.<call>`` request; the JSON answer (nats-py's dataclasses drop e.g. ``last_active``)."""
    msg = await nc.request(f"$JS.API.{call}", orjson.dumps(payload) if payload else b"", timeout=wait)
    answer: dict[str, Any] = orjson.loads(msg.data)
    error = answer.get("error")
    if error:
        raise JsApiError(int(error.get("code", 0)), str(error.get("description", "error")))
    return answer


async def consumer_info(nc: Client, stream: str, consumer: str) -> dict[str, Any] | None:
    try:
        return await js_api(nc, f"CONSUMER.INFO.{stream}.{consumer}")
    except JsApiError as exc:
        if exc.code == 404:
            return None
        raise


async def stream_state(nc: Client, stream: str) -> dict[str, Any] | None:
    try:
        info = await js_api(nc, f"STREAM.INFO.{stream}")
    except JsApiError as exc:
        if exc.code == 404:
            return None
        raise
    state: dict[str, Any] = info["state"]
    return state


async def stream_count(nc: Client, stream: str) -> int:
    state = await stream_state(nc, stream)
    return 0 if state is None else int(state.get("messages", 0))


async def delete_stream(nc: Client, stream: str) -> None:
    try:
        await js_api(nc, f"STREAM.DELETE.{stream}")
    except JsApiError as exc:
        if exc.code != 404:
            raise


async def preload(
    js: JetStreamContext,
    events: Sequence[tuple[str, bytes]],
    window: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Store ``events`` in the input stream with bounded windows of ``publish_async``; every PubAck is checked."""
    for start in range(0, len(events), window):
        chunk = events[start : start + window]
        futures = [await js.publish_async(subject, data) for subject, data in chunk]
        acks = await asyncio.wait_for(asyncio.gather(*futures), 30)
        if any(ack.duplicate for ack in acks):
            raise RuntimeError("preload: the input stream reported a duplicate")
        if progress is not None:
            progress(len(chunk))


async def read_stream(
    js: JetStreamContext,
    stream: str,
    subject: str,
    count: int,
    key: Callable[[Msg], int],
    within: float,
    progress: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """Read the first ``count`` messages of ``stream`` with an ordered consumer: ``key(msg)`` → server store time (ns).

    Raises ``RuntimeError`` on a repeated key (a duplicate in the stream) or when ``count`` do not arrive in time.
    """
    stamps: dict[int, int] = {}
    seen = 0
    repeated: list[int] = []
    done = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        k = key(msg)
        if k in stamps:
            repeated.append(k)
        stamps[k] = reply_timestamp_ns(msg.reply)
        if progress is not None and seen % 1000 == 0:
            progress(1000)
        if seen >= count:
            done.set()

    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=on_message,
        ordered_consumer=True,
        pending_msgs_limit=count + 1024,
        pending_bytes_limit=1024 * 1024 * 1024,
    )
    try:
        await asyncio.wait_for(done.wait(), within)
    except TimeoutError:
        raise RuntimeError(f"read {seen} of {count} messages from {stream} within {within:.0f}s") from None
    finally:
        await sub.unsubscribe()
    if repeated:
        raise RuntimeError(f"{stream} holds {len(repeated)} repeated events, e.g. lsn {repeated[:5]}")
    return stamps


# ------------------------------------------------------------------------------------------------ misc


def write_json(path: str | Path, doc: Any) -> None:
    """Write atomically (tmp + rename) so a reader polling for the file never sees half of it."""
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(target)


def now_ns() -> int:
    return time.time_ns()
