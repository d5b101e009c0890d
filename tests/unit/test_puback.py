"""PubAck replies as nats-server writes them, matched to their publish futures without a server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from cdc_service.adapters.nats_jetstream import NoStreamResponse, PipelinedPublisher
from cdc_service.ports import PublishRejected


@dataclass
class Reply:
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


async def _resolve(data: bytes, headers: dict[str, str] | None = None) -> asyncio.Future:  # type: ignore[type-arg]
    publisher = PipelinedPublisher(nc=None)  # type: ignore[arg-type]
    future = asyncio.get_running_loop().create_future()
    publisher._futures["7"] = future
    await publisher._on_reply(Reply(publisher._prefix + "7", data, headers))  # type: ignore[arg-type]
    assert future.done()
    assert publisher.pending == 0
    return future


@pytest.mark.parametrize(
    ("data", "duplicate"),
    [
        (b'{"stream":"wa_stream", "seq":1}', False),
        (b'{"stream":"wa_stream", "seq":1,"duplicate": true}', True),
        (b'{"stream":"wa_stream","seq":1,"duplicate":true}', True),
        (b'{"seq":1,"stream":"wa_stream","duplicate":true}', True),  # another field order takes the parsing path
        (b'{"stream":"wa_stream","seq":9,"domain":"hub"}', False),
    ],
)
async def test_stored_and_duplicate(data: bytes, duplicate: bool) -> None:
    assert (await _resolve(data)).result().duplicate is duplicate


@pytest.mark.parametrize(
    ("data", "headers", "error"),
    [
        (
            b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"},"stream":"x"}',
            None,
            PublishRejected,
        ),
        (b"", {"Status": "503"}, NoStreamResponse),
        (b"not json", None, PublishRejected),
        (b"[1]", None, PublishRejected),
    ],
)
async def test_errors_resolve_the_future(data: bytes, headers: dict[str, str] | None, error: type) -> None:
    future = await _resolve(data, headers)
    assert isinstance(future.exception(), error)


async def test_unknown_or_late_replies_are_ignored() -> None:
    publisher = PipelinedPublisher(nc=None)  # type: ignore[arg-type]
    await publisher._on_reply(Reply(publisher._prefix + "404", b'{"stream":"x","seq":1}'))  # type: ignore[arg-type]
    assert publisher.pending == 0
