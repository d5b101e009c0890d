"""PullIntake.stop against a real nats-server and nats-py: what arrived after the last fetch is not left to AckWait.

The state that made the SIGTERM test flaky in pull mode (messages that reach the client after the fetch that asked for
them has ended) is set up here without timing: the loop is held inside its batch while a pull request with the
subscription's own inbox as reply puts messages into nats-py's pending queue, then stop is called.
"""

from __future__ import annotations

import asyncio
import json

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from cdc_service.adapters.nats_jetstream import PullIntake
from cdc_service.config import IngestSettings
from tests.integration.helpers import INPUT, consumer_settled, ensure_input, wait_until

DURABLE = "cdc_pull_stop"


async def test_messages_delivered_after_the_last_fetch_are_handed_on_at_stop(js) -> None:
    await ensure_input(js)
    await js.add_consumer(INPUT, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=120))
    for i in range(10):
        await js.publish("cdc.acme.messages", json.dumps({"n": i}).encode())
    taken: list[Msg] = []
    in_first_batch = asyncio.Event()
    release = asyncio.Event()

    async def on_batch(msgs: list[Msg]) -> None:
        taken.extend(msgs)
        for msg in msgs:
            await msg.ack()
        in_first_batch.set()
        await release.wait()  # holds the fetch loop here; stop's own hand-over passes once released

    intake = PullIntake(js, IngestSettings(mode="pull", durable=DURABLE, batch_size=4))
    await intake.start(on_batch)
    await asyncio.wait_for(in_first_batch.wait(), 10)
    assert len(taken) == 4
    # A request whose answer arrives when no fetch is waiting for it: nats-py queues the 6 messages.
    psub = intake._psub
    await js._nc.publish(psub._nms, json.dumps({"batch": 6, "no_wait": True}).encode(), reply=psub._deliver)
    await wait_until(lambda: psub.pending_msgs >= 6, what="six messages queued in the client")

    stopping = asyncio.create_task(intake.stop())
    await wait_until(lambda: not intake.active, what="fetch loop told to stop")
    release.set()
    await asyncio.wait_for(stopping, 10)

    assert sorted(json.loads(m.data)["n"] for m in taken) == list(range(10))
    await js._nc.flush()
    info = await consumer_settled(js, DURABLE, timeout=5)
    assert info.num_ack_pending == 0  # on the old stop: 6, until AckWait
    assert info.num_redelivered == 0  # processed on their first delivery: no attempt spent
