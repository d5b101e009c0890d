"""The hand-built protocol commands of the NATS adapter are byte for byte what nats-py would send."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError

from cdc_service.adapters.nats_jetstream import _Client, _command, send_publish


class Capturing(_Client):
    """A client that is never connected and keeps the commands it would write."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self._flush_queue = None
        self._max_pending_size = 1024 * 1024  # what nats-py sets at connect (pending_size)

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)


HEADERS: list[dict[str, str]] = [
    {"Nats-Msg-Id": "7c4e1b0a", "Nats-Expected-Stream": "wa_stream", "X-Request-ID": "req-1"},
    {"Nats-Msg-Id": "x", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    {"Cdc-Error-Detail": "  spaces around, unicode é ü  ", "Cdc-Source-Seq": "12"},
    {"Cdc-Error-Detail": ""},
]


@pytest.mark.parametrize("headers", HEADERS)
async def test_a_publish_is_the_command_nats_py_builds(headers: dict[str, str]) -> None:
    ours, theirs = Capturing(), Capturing()
    await send_publish(ours, "wa.acme.a.messages.c", "_CDC_PUBACK.abc.7", b'{"x":1}', headers)
    await Client.publish(theirs, "wa.acme.a.messages.c", b'{"x":1}', reply="_CDC_PUBACK.abc.7", headers=headers)
    assert ours.sent == theirs.sent
    assert _command("wa.x", "r", b"", headers) is not None  # the fast path, not nats-py's


@pytest.mark.parametrize(
    "headers", [{"Bad Key": "v"}, {"Nats-Msg-Id": "line\r\nInjected: yes"}, {"Nats-Msg-Id": "a\nb"}, {"": "v"}]
)
async def test_what_nats_py_rewrites_or_refuses_is_left_to_nats_py(headers: dict[str, str]) -> None:
    assert _command("wa.x", "r", b"", headers) is None
    ours, theirs = Capturing(), Capturing()
    outcomes: list[Any] = []
    for client, send in ((ours, send_publish), (theirs, None)):
        try:
            if send is None:
                await Client.publish(client, "wa.x", b"d", reply="r", headers=headers)
            else:
                await send(client, "wa.x", "r", b"d", headers)
            outcomes.append(client.sent)
        except Exception as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]


async def test_a_jetstream_ack_is_the_command_nats_py_sends_and_only_once() -> None:
    reply = b"$JS.ACK.cdc_events_stream.cdc_consumers.1.42.42.1764600000000000000.0"
    ours, theirs = Capturing(), Capturing()
    msg = ours._build_message(1, b"cdc.acme.messages", reply, b"{}", None)
    plain = Msg(_client=theirs, subject="cdc.acme.messages", reply=reply.decode(), data=b"{}")
    await msg.ack()
    await plain.ack()
    # nats-py writes "PUB <reply>  0" (an empty reply field); the server reads both the same way.
    assert ours.sent == [b"PUB " + reply + b" 0\r\n\r\n"]
    assert theirs.sent[0].split() == ours.sent[0].split()
    assert msg.is_acked and msg.reply == reply.decode() and msg.data == b"{}"
    with pytest.raises(MsgAlreadyAckdError):
        await msg.ack()
    assert len(ours.sent) == 1


async def test_a_message_that_is_not_a_jetstream_delivery_is_nats_py_s_own() -> None:
    client = Capturing()
    msg = client._build_message(1, b"_CDC_PUBACK.x.1", b"", b"{}", None)
    assert type(msg) is Msg
