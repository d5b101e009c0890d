"""The receive side of ``adapters/nats_wire``: the parser's routes read exactly what nats-py's parser reads, a
delivery taken by a route behaves as nats-py's ``Msg`` does, and push intake keeps arrival order under back-pressure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError, ProtocolError
from nats.protocol.parser import Parser

from cdc_service.adapters.nats_jetstream import NoStreamResponse, PipelinedPublisher, PushIntake, _Client, send_publish
from cdc_service.adapters.nats_wire import Delivery, WireParser, headers_of
from cdc_service.config import IngestSettings
from cdc_service.ports import PublishRejected

ACK = b"$JS.ACK.cdc_events_stream.cdc_consumers.1.42.42.1764600000000000000.0"
HEADERS = b"NATS/1.0\r\nNats-Msg-Id: abc\r\ntraceparent: 00-x\r\n\r\n"

# What nats-server writes, one protocol operation after another.
OPERATIONS = [
    b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    b"MSG cdc.acme.messages 1 " + ACK + b' 7\r\n{"a":1}\r\n',
    b"+OK\r\n",
    b"HMSG cdc.acme.chats 1 " + ACK + b" %d %d\r\n" % (len(HEADERS), len(HEADERS) + 2) + HEADERS + b"{}\r\n",
    b"PING\r\n",
    b'MSG _CDC_PUBACK.x.1 2 30\r\n{"stream":"wa_stream","seq":1}\r\n',
    b"MSG   spaced.subject\t2   3\r\nabc\r\n",  # nats-py's regex takes any whitespace between fields
    b"HMSG _CDC_PUBACK.x.2 2 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
    b"MSG empty 9 0\r\n\r\n",
    b"PONG\r\n",
    b"MSG cdc.\xff.messages 1 " + ACK + b" 2\r\n{}\r\n",  # not UTF-8: bytes pass through as they are
    b"HMSG cdc.acme.agents 3 " + b"%d %d\r\n" % (len(HEADERS), len(HEADERS) + 5) + HEADERS + b"hello\r\n",
]
WIRE = b"".join(OPERATIONS)


class Recorder:
    """Stands in for the client behind a parser: records what the parser hands over."""

    def __init__(self, routes: dict[int, Any] | None = None) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.routes = routes or {}
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self._subs: dict[int, Any] = {}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers and bytes(headers)))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", info["server_id"]))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


class RecordingWireParser(WireParser):
    """A WireParser whose nats-py fallback for declined messages records instead of dispatching."""


def _chunks(data: bytes, *cuts: int) -> Iterator[bytes]:
    start = 0
    for cut in cuts:
        yield data[start:cut]
        start = cut
    yield data[start:]


async def _parse(parser: Parser, chunks: Iterator[bytes]) -> None:
    for chunk in chunks:
        await parser.parse(chunk)


@pytest.fixture(autouse=True)
def _declined_to_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    # WireParser hands a message no route takes to nats-py's Client._process_msg; here that is the recorder's.
    async def process(nc: Any, *args: Any) -> None:
        await nc._process_msg(*args)

    monkeypatch.setattr(Client, "_process_msg", process)


async def _reference(*cuts: int) -> list[tuple[Any, ...]]:
    recorder = Recorder()
    await _parse(Parser(recorder), _chunks(WIRE, *cuts))
    return recorder.seen


@pytest.mark.parametrize("step", [1, 7, 13, 64])
async def test_every_split_of_the_wire_is_read_as_nats_py_reads_it(step: int) -> None:
    expected = await _reference()
    assert len([e for e in expected if e[0] == "msg"]) == 8
    for first in range(1, len(WIRE), step):
        for second in (first + 1, first + 5, first + 40):
            recorder = Recorder()
            await _parse(WireParser(recorder), _chunks(WIRE, first, min(second, len(WIRE))))
            assert recorder.seen == expected, (first, second)


async def test_routed_messages_skip_nats_py_and_count_in_its_stats() -> None:
    routed: list[tuple[bytes, bytes, bytes, bytes | None]] = []

    def take(subject: bytes, reply: bytes, data: bytes, block: bytes | None) -> bool:
        routed.append((subject, reply, data, block))
        return reply != b""  # declines what has no reply subject

    recorder = Recorder({1: take})
    await _parse(WireParser(recorder), _chunks(WIRE, 100, 101, 250))
    assert [r[0] for r in routed] == [b"cdc.acme.messages", b"cdc.acme.chats", b"cdc.\xff.messages"]
    assert routed[1][3] == HEADERS and routed[1][2] == b"{}"
    assert recorder.stats == {"in_msgs": 3, "in_bytes": 7 + 2 + 2}
    assert [e[1] for e in recorder.seen if e[0] == "msg"] == [2, 2, 2, 9, 3]  # the rest went nats-py's way


@pytest.mark.parametrize(
    "line", [b"MSG a b 3\r\nabc\r\n", b"MSG a 1 x\r\n", b"HMSG a 1 r 2\r\n", b"MSG a\r\n", b"HMSG a 1 r x 9\r\n"]
)
async def test_a_malformed_message_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        await WireParser(Recorder()).parse(line)


@pytest.mark.parametrize(
    "block",
    [
        None,
        b"",
        HEADERS,
        b"NATS/1.0 503\r\n\r\n",
        b"NATS/1.0 404 No Messages\r\n\r\n",
        b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\nNats-Pending-Bytes: 0\r\n\r\n",
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
        b"NATS/1.0\r\nName:Value\r\nOther:\tx\r\nno colon\r\n\r\n",
        b"NATS/1.0\r\nK\xc3\xa9y: v\r\nValue: caf\xc3\xa9 \xff\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n",
        b"NATS/1.0 abc\r\nX: y\r\n\r\n",
    ],
)
async def test_headers_are_read_as_nats_py_reads_them(block: bytes | None) -> None:
    assert headers_of(block) == await Client()._process_headers(block)


class Capturing(_Client):
    """A client that is never connected and keeps the commands it would write."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self._flush_queue = None
        self._max_pending_size = 1024 * 1024

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)


async def test_a_delivery_settles_with_the_commands_of_nats_py() -> None:
    for settle, args in (("ack", {}), ("nak", {}), ("nak", {"delay": 2.5}), ("term", {}), ("in_progress", {})):
        ours, theirs = Capturing(), Capturing()
        delivery = Delivery(ours, 1, b"cdc.acme.messages", ACK, b"{}", HEADERS)
        plain = Msg(_client=theirs, subject="cdc.acme.messages", reply=ACK.decode(), data=b"{}")
        await getattr(delivery, settle)(**args)
        await getattr(plain, settle)(**args)
        # nats-py writes "PUB <reply>  0" (an empty reply field) for an ack; the server reads both the same way.
        assert [c.split() for c in ours.sent] == [c.split() for c in theirs.sent], settle
        if settle == "in_progress":
            await delivery.ack()  # working on it is not settling it
        else:
            with pytest.raises(MsgAlreadyAckdError):
                await delivery.ack()


async def test_a_delivery_reads_like_a_nats_py_msg() -> None:
    delivery = Delivery(Capturing(), 1, b"cdc.\xff.messages", ACK, b"{}", HEADERS)
    plain = Msg(_client=None, subject="x", reply=ACK.decode(), data=b"{}")
    assert delivery.subject == "cdc.\udcff.messages"  # surrogateescape, as _Client reads subjects
    assert delivery.reply == ACK.decode() and delivery.data == b"{}"
    assert delivery.headers == {"Nats-Msg-Id": "abc", "traceparent": "00-x"}
    assert delivery.metadata == plain.metadata
    assert Delivery(Capturing(), 1, b"s", ACK, b"", None).headers is None


async def _resolved_raw(data: bytes, block: bytes | None, *, detailed: bool = False) -> asyncio.Future[Any]:
    publisher = PipelinedPublisher(nc=None)  # type: ignore[arg-type]
    future = asyncio.get_running_loop().create_future()
    publisher._futures["7"] = future
    if detailed:
        publisher._detailed.add("7")
    assert publisher._on_raw_reply((publisher._prefix + "7").encode(), b"", data, block)
    assert future.done() and publisher.pending == 0
    return future


@pytest.mark.parametrize(
    ("data", "block", "outcome"),
    [
        (b'{"stream":"wa_stream", "seq":1}', None, False),
        (b'{"stream":"wa_stream", "seq":1,"duplicate": true}', None, True),
        (b'{"seq":1,"stream":"wa_stream","duplicate":true}', None, True),
        (b'{"error":{"code":400,"err_code":10060,"description":"no"},"stream":"x"}', None, PublishRejected),
        (b"", b"NATS/1.0 503\r\n\r\n", NoStreamResponse),
        (b"not json", None, PublishRejected),
    ],
)
async def test_a_raw_puback_resolves_like_a_parsed_one(data: bytes, block: bytes | None, outcome: Any) -> None:
    future = await _resolved_raw(data, block)
    if isinstance(outcome, bool):
        assert future.result().duplicate is outcome
    else:
        assert isinstance(future.exception(), outcome)


@pytest.mark.parametrize("data", [b'{"stream":"wa_stream","seq":"x"}', b'{"stream":"wa_stream","seq":[1]}'])
async def test_an_unreadable_detailed_puback_is_a_rejection_not_an_error_in_the_read_loop(data: bytes) -> None:
    assert isinstance((await _resolved_raw(data, None, detailed=True)).exception(), PublishRejected)
    assert (await _resolved_raw(b'{"stream":"wa_stream","seq":5}', None, detailed=True)).result().seq == 5


class Sink:
    """A push sink with room for ``room`` messages at a time."""

    def __init__(self, room: int) -> None:
        self.taken: list[Any] = []
        self.room = room
        self.freed = asyncio.Event()

    def take(self, msg: Any) -> bool:
        self.taken.append(msg)
        return len(self.taken) % self.room != 0

    async def wait_for_room(self) -> None:
        await self.freed.wait()
        self.freed.clear()


def _intake(sink: Sink, limit_mb: int = 64) -> PushIntake:
    settings = IngestSettings(max_inflight_mb=limit_mb)
    intake = PushIntake(js=None, settings=settings, config=None)  # type: ignore[arg-type]
    intake._sink = sink
    intake._nc, intake._sid = Capturing(), 1
    return intake


def _offer(intake: PushIntake, n: int, start: int = 0, size: int = 10) -> None:
    for i in range(start, start + n):
        assert intake._on_raw(b"cdc.a.messages", ACK + b".%d" % i, b"x" * size, None)


async def test_push_intake_holds_arrivals_in_order_while_there_is_no_room() -> None:
    sink = Sink(room=3)
    intake = _intake(sink)
    _offer(intake, 8)
    assert [m.reply[-1] for m in sink.taken] == ["0", "1", "2"]  # the third filled the room
    sink.freed.set()
    await asyncio.sleep(0)
    _offer(intake, 2, start=8)  # arrivals behind those still held
    for _ in range(10):
        sink.freed.set()
        await asyncio.sleep(0)
    assert intake._resuming is None or not intake._held
    assert [m.reply.rsplit(".", 1)[1] for m in sink.taken] == [str(i) for i in range(10)]


async def test_push_intake_drops_past_its_bound_and_the_rest_keeps_its_order() -> None:
    sink = Sink(room=1)
    intake = _intake(sink, limit_mb=64)
    big = 30 * 1024 * 1024
    _offer(intake, 1)
    _offer(intake, 3, start=1, size=big)  # two fit in 64 MiB while waiting, the third is dropped (redelivered)
    assert intake._dropped == 1
    while intake._resuming is not None:
        sink.freed.set()
        await asyncio.sleep(0)
    assert [m.reply.rsplit(".", 1)[1] for m in sink.taken] == ["0", "1", "2"]


async def test_a_delivery_without_an_ack_subject_is_left_to_nats_py() -> None:
    intake = _intake(Sink(room=10))
    assert not intake._on_raw(b"cdc.a.messages", b"", b"{}", None)
    assert not intake._on_raw(b"cdc.a.messages", b"_INBOX.x", b"{}", None)


class Connected(_Client):
    """A client that counts as connected and keeps what it would write in nats-py's own pending list."""

    def __init__(self, max_pending: int = 1024 * 1024) -> None:
        super().__init__()
        self._status = Client.CONNECTED
        self._flush_queue = asyncio.Queue()
        self._max_pending_size = max_pending
        self._max_payload = 1024 * 1024
        self.kicks: list[bool] = []

    async def _flush_pending(self, force_flush: bool = False) -> Any:
        self.kicks.append(force_flush)


@pytest.mark.parametrize("max_pending", [1024 * 1024, 100])
async def test_a_connected_client_queues_what_nats_py_queues(max_pending: int) -> None:
    headers = {"Nats-Msg-Id": "7c4e", "Nats-Expected-Stream": "wa_stream", "X-Request-ID": "r"}
    ours, theirs = Connected(max_pending), Connected(max_pending)
    for subject in ("wa.acme.a.messages.c", "wa.acmé.a.messages.c"):  # the second is not ASCII
        await send_publish(ours, subject, "_CDC_PUBACK.x.7", b'{"x":1}', headers)
        await Client.publish(theirs, subject, b'{"x":1}', reply="_CDC_PUBACK.x.7", headers=headers)
    delivery = Delivery(ours, 1, b"cdc.acme.messages", ACK, b"{}", None)
    await delivery.ack()
    await Msg(_client=theirs, subject="cdc.acme.messages", reply=ACK.decode(), data=b"{}").ack()
    assert ours._pending[:2] == theirs._pending[:2]
    assert ours._pending[2].split() == theirs._pending[2].split()  # nats-py's ack has an empty reply field
    assert ours._pending_data_size == theirs._pending_data_size - 1
    assert ours.kicks == theirs.kicks  # the flusher woken (or forced, past max_pending) as often


async def test_a_sink_that_raises_does_not_reach_the_read_loop() -> None:
    class Broken(Sink):
        def take(self, msg: Any) -> bool:
            raise RuntimeError("bug")

    intake = _intake(Broken(room=1))
    assert intake._on_raw(b"cdc.a.messages", ACK, b"{}", None)  # logged; unacked, it comes back after AckWait
    assert intake._held is None


async def test_a_large_message_in_many_reads_is_looked_at_once_it_is_whole() -> None:
    # Re-reading the buffered bytes at every read would copy them again each time: quadratic in the message size.
    payload = b"x" * 300_000
    wire = b"MSG cdc.acme.messages 1 " + ACK + b" %d\r\n" % len(payload) + payload + b"\r\nPING\r\n"
    calls: list[int] = []

    class Counting(WireParser):
        def _dispatch(self, data: bytes, pos: int) -> Any:
            calls.append(len(data))
            return super()._dispatch(data, pos)

    recorder = Recorder({1: lambda s, r, p, h: True})
    parser = Counting(recorder)
    await _parse(parser, (wire[i : i + 1024] for i in range(0, len(wire), 1024)))
    assert recorder.stats == {"in_msgs": 1, "in_bytes": len(payload)}
    assert recorder.seen == [("ping",)]
    assert len(calls) <= 3  # the first read (its line), the read that completes it, and what follows
    parser.reset()
    assert parser._wanted == 0 and not parser.buf


async def test_push_intake_waits_for_room_even_when_nothing_else_arrived_yet() -> None:
    # The delivery that filled the room was the last of its read: the next read's must wait too, not be taken.
    sink = Sink(room=1)
    intake = _intake(sink)
    _offer(intake, 1)
    for _ in range(3):
        await asyncio.sleep(0)  # the loop runs: the resume task starts and must wait for room
    assert intake._resuming is not None
    _offer(intake, 1, start=1)
    assert len(sink.taken) == 1 and len(intake._held or ()) == 1
    while intake._resuming is not None:
        sink.freed.set()
        await asyncio.sleep(0)
    assert [m.reply.rsplit(".", 1)[1] for m in sink.taken] == ["0", "1"]
