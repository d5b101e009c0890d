"""Bare relays from ``cdc_events_stream`` to ``wa_stream``: no parsing, no Redis. They bound what the service could
reach with nats-py on this machine.

    python -m benchmarks.relays naive|ceiling --url nats://... --count N --result out.json

Both bind the same durable push queue consumer as the service (fixed deliver subject and deliver group, explicit
ack, max_ack_pending 5000), publish each message to ``wa.<rest of the subject>`` with ``Nats-Msg-Id: <stream seq>``
and ack it after its PubAck. They exit once ``count`` messages are acked and write what they measured to ``result``.

- naive: one task per message, ``await js.publish(...)`` then ``await msg.ack()``; the default asyncio loop.
- ceiling: batches of up to 256 messages or 2 ms, every publish through ``js.publish_async``, one bounded wait per
  batch (``wait_for(gather(...), 5)``), then the acks; uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Coroutine
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from benchmarks.common import (
    DELIVER_SUBJECT,
    IN_STREAM,
    IN_SUBJECTS,
    MAX_ACK_PENDING,
    PUSH_DURABLE,
    QUEUE_GROUP,
    write_json,
)


class Relay:
    """Shared bookkeeping: counts acks, remembers the first receipt and the last ack, stops at ``count``."""

    def __init__(self, js: JetStreamContext, count: int) -> None:
        self.js = js
        self.count = count
        self.received = 0
        self.acked = 0
        self.errors = 0
        self.first_received = 0.0
        self.last_acked = 0.0
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def on_message(self, msg: Msg) -> None:
        raise NotImplementedError

    def note_received(self) -> None:
        if not self.received:
            self.first_received = time.time()
        self.received += 1

    async def ack(self, msg: Msg) -> None:
        await msg.ack()
        self.acked += 1
        if self.acked >= self.count:
            self.last_acked = time.time()
            self.done.set()

    @staticmethod
    def out_subject(msg: Msg) -> str:
        return "wa." + msg.subject[4:]  # cdc.<company>.<table> → wa.<company>.<table>

    @staticmethod
    def msg_id(msg: Msg) -> dict[str, str]:
        return {"Nats-Msg-Id": str(msg.metadata.sequence.stream)}


class NaiveRelay(Relay):
    async def on_message(self, msg: Msg) -> None:
        self.note_received()
        self.spawn(self._relay(msg))

    async def _relay(self, msg: Msg) -> None:
        try:
            await self.js.publish(self.out_subject(msg), msg.data, headers=self.msg_id(msg))
        except Exception:
            self.errors += 1  # not acked: redelivered after AckWait, and the benchmark's checks fail loudly
            return
        await self.ack(msg)


class CeilingRelay(Relay):
    def __init__(self, js: JetStreamContext, count: int, batch_size: int = 256, batch_wait: float = 0.002) -> None:
        super().__init__(js, count)
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.buffer: list[Msg] = []
        self.timer: asyncio.TimerHandle | None = None

    async def on_message(self, msg: Msg) -> None:
        self.note_received()
        self.buffer.append(msg)
        if len(self.buffer) >= self.batch_size:
            self._flush()
        elif len(self.buffer) == 1:
            self.timer = asyncio.get_running_loop().call_later(self.batch_wait, self._flush)

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.spawn(self._relay(batch))

    async def _relay(self, batch: list[Msg]) -> None:
        futures = [
            await self.js.publish_async(self.out_subject(msg), msg.data, headers=self.msg_id(msg)) for msg in batch
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*futures), 5)
        except Exception:
            self.errors += len(batch)  # no acks: redelivered, and the benchmark's checks fail loudly
            return
        for msg in batch:
            await self.ack(msg)


def consumer_config() -> ConsumerConfig:
    """The service's push consumer (see cdc_service.adapters.nats_jetstream.consumer_config)."""
    return ConsumerConfig(
        durable_name=PUSH_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=3,
        max_ack_pending=MAX_ACK_PENDING,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=IN_SUBJECTS[0],
        deliver_subject=DELIVER_SUBJECT,
        deliver_group=QUEUE_GROUP,
    )


async def run(mode: str, url: str, count: int, within: float) -> dict[str, Any]:
    nc = await nats.connect(url, name=f"bench-relay-{mode}")
    # publish_async's semaphore above max_ack_pending, so it never stalls the ceiling relay
    js = nc.jetstream(publish_async_max_pending=MAX_ACK_PENDING * 2)
    relay: Relay = NaiveRelay(js, count) if mode == "naive" else CeilingRelay(js, count)
    config = consumer_config()
    await js.add_consumer(IN_STREAM, config)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    sub = await js.subscribe_bind(
        stream=IN_STREAM,
        consumer=PUSH_DURABLE,
        config=config,
        cb=relay.on_message,
        manual_ack=True,
        pending_msgs_limit=65536,
        pending_bytes_limit=512 * 1024 * 1024,
    )
    try:
        await asyncio.wait_for(relay.done.wait(), within)
    except TimeoutError:
        pass
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    await sub.unsubscribe()
    await nc.flush()
    await nc.close()
    seconds = max(relay.last_acked - relay.first_received, 1e-9) if relay.last_acked else 0.0
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "mode": mode,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "count": count,
        "received": relay.received,
        "acked": relay.acked,
        "errors": relay.errors,
        "first_received": relay.first_received,
        "last_acked": relay.last_acked,
        "seconds": seconds,
        "events_per_s": count / seconds if seconds else 0.0,
        "cpu_seconds": cpu,
        "pid": os.getpid(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("naive", "ceiling"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True, help="exit after this many acks")
    parser.add_argument("--result", required=True, help="write the JSON result here")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--loop", choices=("default", "asyncio", "uvloop"), default="default")
    args = parser.parse_args(argv)
    loop = args.loop if args.loop != "default" else ("uvloop" if args.mode == "ceiling" else "asyncio")
    coro = run(args.mode, args.url, args.count, args.timeout)
    if loop == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    write_json(args.result, result)
    return 0 if result["acked"] >= args.count and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
