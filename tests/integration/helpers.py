"""Test-side JetStream helpers: feed the input stream, read what the service wrote. Polls with deadlines."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.sequin import encode

INPUT = "cdc_events_stream"
OUTPUT = "wa_stream"
DLQ = "cdc_dlq_stream"


async def ensure_input(js: JetStreamContext, subjects: list[str] | None = None) -> None:
    try:
        await js.stream_info(INPUT)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=INPUT, subjects=subjects or ["cdc.*.*"]))


async def feed(js: JetStreamContext, subject: str, doc: Any) -> int:
    """Publish one Sequin message (a dict is JSON-encoded, bytes go as they are); returns its stream sequence."""
    data = doc if isinstance(doc, bytes) else encode(doc)
    ack = await js.publish(subject, data)
    return int(ack.seq)


async def count(js: JetStreamContext, stream: str) -> int:
    try:
        return int((await js.stream_info(stream)).state.messages)
    except NotFoundError:
        return 0


async def wait_count(js: JetStreamContext, stream: str, expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = await count(js, stream)
        if n >= expected or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.02)  # poll interval of a deadline loop


async def read_all(js: JetStreamContext, stream: str) -> list[Any]:
    """Every message in ``stream``, oldest first (nats-py RawStreamMsg: subject, data, headers, seq)."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return []
    if not info.state.messages:
        return []
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            out.append(await js.get_msg(stream, seq))
        except NotFoundError:
            continue
    return out


def payloads(messages: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(m.data) for m in messages]


async def consumer_settled(js: JetStreamContext, consumer: str = "cdc_consumers", timeout: float = 15.0) -> Any:
    """Wait until the durable has nothing pending and nothing unacked; returns its final info."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(INPUT, consumer)
        if (info.num_pending == 0 and info.num_ack_pending == 0) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.02)


async def wait_until(check: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll an async or sync ``check`` until truthy; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


def raw_publish(url: str, subject: bytes, data: bytes, timeout: float = 5.0) -> None:
    """Publish with a raw protocol ``PUB`` on a fresh TCP connection: subjects nats-py would refuse to encode
    (invalid UTF-8, wildcards, sizes at the control-line limit) reach the server as bytes. Waits for the server's
    ``PONG`` after the ``PUB``, so the message has been processed (and captured by a stream) when this returns."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        sock.sendall(b"PUB " + subject + b" " + str(len(data)).encode() + b"\r\n" + data + b"\r\nPING\r\n")
        while True:
            line = reader.readline()
            if not line or line.startswith(b"PONG"):
                break
            if line.startswith(b"-ERR"):
                raise RuntimeError(f"server refused the raw publish: {line!r}")
