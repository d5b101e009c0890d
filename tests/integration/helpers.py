"""Test-side JetStream helpers: feed the input stream, read what the service wrote. Polls with deadlines."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.sequin import encode
from tools.polling import wait_for_async

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
    """The number of messages in ``stream`` once it reaches ``expected``, or at the deadline (the caller asserts)."""

    async def reached() -> bool:
        return await count(js, stream) >= expected

    with contextlib.suppress(TimeoutError):
        await wait_for_async(reached, timeout, what=f"{expected} messages in {stream}", retry_on=())
    return await count(js, stream)


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
    """Wait until the durable has nothing pending and nothing unacked; returns its info then, or at the deadline
    (the caller asserts on it)."""

    async def settled() -> bool:
        info = await js.consumer_info(INPUT, consumer)
        return info.num_pending == 0 and info.num_ack_pending == 0

    with contextlib.suppress(TimeoutError):
        await wait_for_async(settled, timeout, what=f"{consumer} settled", retry_on=())
    return await js.consumer_info(INPUT, consumer)


async def wait_until(check: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll a sync or async ``check`` until truthy (``tools.polling.wait_for_async``); an error it raises ends the
    wait at once."""
    return await wait_for_async(check, timeout, what=what, retry_on=())


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
