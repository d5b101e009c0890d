"""Output: PubAcks, the event hold (ordered, gated, max_hold on the engine's clock) and the dead-letter hold."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from cdc_service.config import PublishSettings
from cdc_service.core.outcomes import DeadLetter, Publish, Reason
from cdc_service.metrics import Metrics
from cdc_service.pipeline.common import Send
from cdc_service.pipeline.output import Output
from cdc_service.ports import PubAck, PublishRejected
from cdc_service.testing import FakePublisher, ManualClock
from tests.unit.pipeline_harness import wait_until

FAST = PublishSettings(max_hold=5.0, retry_initial=0.005, retry_max=0.01, timeout=0.2)


def make(publisher: FakePublisher, settings: PublishSettings = FAST) -> tuple[Output, ManualClock]:
    clock = ManualClock()
    return Output(settings, publisher, Metrics(CollectorRegistry()), clock), clock


def event(n: int) -> Send:
    outcome = Publish("messages", f"event-{n}", f"wa.acme.{n}", b"{}", None)
    return Send(n, outcome.subject, outcome.payload, {"Nats-Msg-Id": outcome.event_id}, outcome)


async def sent(output: Output, *sends: Send) -> list[Send]:
    for send in sends:
        await output.send(send)
    return await output.await_acks(list(sends))


async def test_stored_and_repeated_publishes_are_not_failures() -> None:
    output, _ = make(FakePublisher())
    first, again = event(1), event(1)
    assert await sent(output, first) == []
    assert await sent(output, again) == []
    assert (first.duplicate, again.duplicate) == (False, True)


async def test_an_unanswered_publish_fails_after_the_timeout() -> None:
    class Silent(FakePublisher):
        async def publish(self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any) -> Any:
            return asyncio.get_running_loop().create_future()

    output, _ = make(Silent(), PublishSettings(timeout=0.01))
    send = event(1)
    assert await sent(output, send) == [send]
    assert send.error == "no PubAck within publish.timeout" and send.exc is None


async def test_answers_out_of_order_are_all_waited_for_and_a_missing_one_times_out() -> None:
    """await_acks waits on the last pending PubAck and looks again: answers in any order are all read, and one
    that never comes fails after publish.timeout while the others count as stored."""
    answers: list[asyncio.Future[PubAck]] = []

    class Later(FakePublisher):
        async def publish(self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any) -> Any:
            answers.append(asyncio.get_running_loop().create_future())
            return answers[-1]

    output, _ = make(Later(), PublishSettings(timeout=0.5))
    sends = [event(n) for n in range(4)]
    for send in sends:
        await output.send(send)
    loop = asyncio.get_running_loop()
    loop.call_soon(answers[3].set_result, PubAck("s", 4))  # the last first, then the rest one by one
    loop.call_later(0.01, answers[0].set_result, PubAck("s", 1))
    loop.call_later(0.02, answers[2].set_exception, PublishRejected("refused"))
    failed = await output.await_acks(sends)  # answers[1] never comes
    assert failed == [sends[1], sends[2]]
    assert sends[1].error == "no PubAck within publish.timeout" and answers[1].cancelled()
    assert sends[2].error == "refused" and not sends[0].error and not sends[3].error


async def test_a_hold_closes_the_gate_until_the_output_recovers() -> None:
    publisher = FakePublisher(failing=True)
    output, _ = make(publisher)
    failed = await sent(output, event(1), event(2))
    hold = asyncio.ensure_future(output.hold(failed))
    await wait_until(lambda: publisher.attempts >= 4, timeout=5, what="the hold to retry")
    assert output.holds == 1
    gate = asyncio.ensure_future(output.wait_open())
    await asyncio.sleep(0)
    assert not gate.done()  # no new batch overtakes the held events
    publisher.failing = False
    assert await asyncio.wait_for(hold, 5) == []
    await asyncio.wait_for(gate, 5)
    assert [p.headers["Nats-Msg-Id"] for p in publisher.published] == ["event-1", "event-2"]


async def test_a_hold_gives_up_after_max_hold_on_the_clock() -> None:
    publisher = FakePublisher(failing=True)
    output, clock = make(publisher)
    failed = await sent(output, event(1))
    hold = asyncio.ensure_future(output.hold(failed))
    await wait_until(lambda: publisher.attempts >= 3, timeout=5, what="the hold to retry")
    later = await sent(output, event(2))
    queued = asyncio.ensure_future(output.hold(later))  # waits behind the first hold
    await wait_until(lambda: output.holds == 2, timeout=5, what="the second hold to queue")
    assert not hold.done()  # max_hold (5 s) has not passed on the engine's clock
    clock.advance(6)
    assert await asyncio.wait_for(hold, 5) == failed
    attempts = publisher.attempts
    # queued before the give-up: returns at once instead of starting a new max_hold against a failing output
    assert await asyncio.wait_for(queued, 5) == later
    assert publisher.attempts == attempts and output.holds == 0


async def test_a_permanent_refusal_leaves_the_hold_at_once() -> None:
    class Refusing(FakePublisher):
        async def publish(self, subject: str, payload: bytes, headers: Mapping[str, str], **_: Any) -> Any:
            self.attempts += 1
            future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
            future.set_exception(PublishRejected("maximum messages per subject exceeded", 10077))
            return future

    publisher = Refusing()
    output, _ = make(publisher, PublishSettings(max_hold=60, retry_initial=0.005, retry_max=0.01, timeout=0.2))
    failed = await sent(output, event(1))
    assert await asyncio.wait_for(output.hold(failed), 5) == failed
    assert publisher.attempts == 2  # the first send and one retry that showed the refusal is permanent


async def test_stop_ends_a_hold_and_opens_the_gate() -> None:
    publisher = FakePublisher(failing=True)
    output, _ = make(publisher, PublishSettings(max_hold=60, retry_initial=0.005, retry_max=0.01, timeout=0.2))
    hold = asyncio.ensure_future(output.hold(await sent(output, event(1))))
    await wait_until(lambda: output.holds == 1, timeout=5, what="the hold to begin")
    output.stop()
    assert len(await asyncio.wait_for(hold, 5)) == 1
    await asyncio.wait_for(output.wait_open(), 1)


async def test_a_dead_letter_is_held_beside_the_gate() -> None:
    class FailingDlq(FakePublisher):
        async def publish(self, subject: str, payload: bytes, headers: Mapping[str, str], **options: Any) -> Any:
            self.failing = subject.startswith("dlq.")
            return await super().publish(subject, payload, headers)

    publisher = FailingDlq()
    output, _ = make(publisher)
    dead = Send(0, "dlq.cdc.acme.messages", b"x", {}, DeadLetter("messages", Reason.INVALID_JSON, "bad"))
    assert await sent(output, dead) == [dead]
    held = asyncio.ensure_future(output.hold_dead_letter(dead))
    await wait_until(lambda: publisher.attempts >= 3, timeout=5, what="the dead letter retried")
    assert output.dead_letters_held == 1 and output.holds == 0
    await asyncio.wait_for(output.wait_open(), 1)  # events keep flowing
    assert await sent(output, event(1)) == []
    output.stop()
    assert await asyncio.wait_for(held, 5) is False
    assert output.dead_letters_held == 0
