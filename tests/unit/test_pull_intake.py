"""PullIntake.stop: what nats-py already received for the pull subscription is handed on, never left to AckWait.

nats-py 2.x puts every message the server sends to a pull subscription's inbox into the subscription's pending
queue and only takes from it at the next fetch. A message that arrives after a fetch timed out (late on a loaded
machine, or for the rest of a lingering request) waits there; unsubscribing throws it away while the server counts it
as delivered. The fake below is shaped like nats-py's pull subscription (``_sub._pending_queue``, ``_sub._conn``) so
that these states can be set up exactly; the integration test of SIGTERM in pull mode covers the real client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from cdc_service.adapters.nats_jetstream import PullIntake
from cdc_service.config import IngestSettings


class FakeConnection:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.arrive_during_flush: list[Msg] = []
        self.queue: asyncio.Queue[Msg] | None = None

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        self.log.append(("publish", (subject, payload)))

    async def _send_unsubscribe(self, sid: int, limit: int = 0) -> None:
        self.log.append(("UNSUB", sid))

    async def flush(self, timeout: float = 2.0) -> None:
        # The round trip after UNSUB: what the server sent before it is read now, into the pending queue.
        assert self.queue is not None
        for msg in self.arrive_during_flush:
            self.queue.put_nowait(msg)
        self.log.append(("flush", None))


class FakeSubscription:
    def __init__(self, conn: FakeConnection) -> None:
        self._id = 7
        self._conn = conn
        self._pending_queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._pending_size = 0
        conn.queue = self._pending_queue


class FakePullSubscription:
    """Fetch returns the scripted batches, then the late messages land in the queue as a fetch times out."""

    def __init__(self, conn: FakeConnection, batches: list[list[Msg]], late: list[Msg]) -> None:
        self._sub = FakeSubscription(conn)
        self._conn = conn
        self._batches = batches
        self._late = late
        self.timed_out_with_late_arrivals = asyncio.Event()

    @property
    def pending_msgs(self) -> int:
        return self._sub._pending_queue.qsize()

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[Msg]:
        queued = []
        while not self._sub._pending_queue.empty():  # like nats-py: what is queued goes out first
            msg = self._sub._pending_queue.get_nowait()
            if not msg.headers:
                queued.append(msg)
        if queued:
            return queued
        if self._batches:
            return self._batches.pop(0)
        if not self.timed_out_with_late_arrivals.is_set():
            for msg in self._late:
                self._sub._pending_queue.put_nowait(msg)
            self.timed_out_with_late_arrivals.set()
        # The test calls stop as soon as the event is set, so the loop ends before a next fetch could take them.
        await asyncio.sleep(timeout or 0)
        raise nats.errors.TimeoutError

    async def unsubscribe(self) -> None:
        self._conn.log.append(("unsubscribe", None))


class FakeJetStream:
    def __init__(self, psub: FakePullSubscription) -> None:
        self.psub = psub

    async def pull_subscribe_bind(self, durable: str, stream: str) -> FakePullSubscription:
        return self.psub


def message(conn: FakeConnection, seq: int) -> Msg:
    return Msg(_client=conn, subject="cdc.acme.messages", reply=f"$JS.ACK.s.c.1.{seq}.{seq}.0.0", data=b"{}")  # type: ignore[arg-type]


def status(conn: FakeConnection, code: str) -> Msg:
    return Msg(_client=conn, subject="_INBOX.x", reply="", data=b"", headers={"Status": code})  # type: ignore[arg-type]


def setup(batches: int = 1) -> tuple[FakeConnection, FakePullSubscription, list[Msg], list[Msg]]:
    conn = FakeConnection()
    fetched = [message(conn, i) for i in range(1, 1 + batches)]
    late = [message(conn, 10), status(conn, "408"), message(conn, 11)]
    psub = FakePullSubscription(conn, [[m] for m in fetched], late)
    conn.arrive_during_flush = [message(conn, 12)]
    return conn, psub, fetched, late


async def test_messages_queued_after_a_fetch_timed_out_are_handed_to_on_batch_at_stop() -> None:
    conn, psub, fetched, late = setup()
    received: list[Msg] = []

    async def on_batch(msgs: list[Msg]) -> None:
        received.extend(msgs)

    intake = PullIntake(FakeJetStream(psub), IngestSettings(mode="pull", fetch_timeout_ms=5))  # type: ignore[arg-type]
    await intake.start(on_batch)
    await asyncio.wait_for(psub.timed_out_with_late_arrivals.wait(), 5)
    await intake.stop()

    late_messages = [late[0], late[2], conn.arrive_during_flush[0]]  # the 408 status is no message to process
    assert received == fetched + late_messages
    assert not [entry for entry in conn.log if entry[0] == "publish"]  # processed, not nak'ed: no attempt spent
    steps = [name for name, _ in conn.log]
    # Interest ends on the server before the queue is read, and the client drops the subscription only after.
    assert steps.index("UNSUB") < steps.index("flush") < steps.index("unsubscribe")
    assert psub.pending_msgs == 0


async def test_queued_messages_are_nakked_without_delay_when_on_batch_cannot_take_them() -> None:
    conn, psub, fetched, late = setup()
    received: list[Msg] = []

    async def on_batch(msgs: list[Msg]) -> None:
        if psub.timed_out_with_late_arrivals.is_set():
            raise RuntimeError("cannot take work now")
        received.extend(msgs)

    intake = PullIntake(FakeJetStream(psub), IngestSettings(mode="pull", fetch_timeout_ms=5))  # type: ignore[arg-type]
    await intake.start(on_batch)
    await asyncio.wait_for(psub.timed_out_with_late_arrivals.wait(), 5)
    await intake.stop()

    assert received == fetched
    naks = [args for name, args in conn.log if name == "publish"]
    late_messages = [late[0], late[2], conn.arrive_during_flush[0]]
    assert naks == [(m.reply, b"-NAK") for m in late_messages]  # plain -NAK: redelivered at once, no delay
