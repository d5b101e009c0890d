"""The output: publishes and their PubAcks, and the holds that keep failed publishes alive while retrying them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter
from tenacity.stop import stop_base

from cdc_service.config import PublishSettings
from cdc_service.core.outcomes import DeadLetter, is_permanent_rejection
from cdc_service.metrics import Metrics
from cdc_service.pipeline.clock import Clock
from cdc_service.pipeline.common import Send
from cdc_service.ports import PubAck, Publisher

log = logging.getLogger("cdc_service.engine")


class _StillFailing(Exception):
    pass


class _HoldOver(stop_base):
    """Stop a hold's retries once ``max_hold`` has passed on ``clock`` since its first attempt, or at shutdown."""

    def __init__(self, output: Output, clock: Clock, max_hold: float) -> None:
        self._output = output
        self._clock = clock
        self._until = clock.monotonic() + max_hold

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._output.stopping or self._clock.monotonic() >= self._until


class Output:
    """Sends publishes and collects their PubAcks; holds what fails.

    The gate (``wait_open``) is closed while any event hold is pending, so no new batch overtakes held events;
    dead letters are held beside it (``hold_dead_letter``) because they need no order with events. ``stop``
    makes every hold give up at its next attempt and opens the gate for good.
    """

    def __init__(self, publish: PublishSettings, publisher: Publisher, metrics: Metrics, clock: Clock) -> None:
        self._settings = publish
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._gate = asyncio.Event()
        self._gate.set()
        self._hold_lock = asyncio.Lock()
        self._last_give_up = 0.0
        self.holds = 0  # event holds pending (running or queued)
        self.dead_letters_held = 0  # dead letters waiting for the dead-letter stream
        self.stopping = False

    @property
    def max_payload(self) -> int:
        return self._publisher.max_payload

    def sweep(self) -> None:
        """Forget abandoned publish futures."""
        self._publisher.sweep()

    def stop(self) -> None:
        self.stopping = True
        self._gate.set()

    async def wait_open(self) -> None:
        """Wait while an event hold is pending."""
        await self._gate.wait()

    async def send(self, send: Send) -> None:
        """Put ``send`` on the wire; its PubAck arrives in ``send.future``."""
        await self.send_all((send,))

    async def send_all(self, sends: Iterable[Send]) -> None:
        """``send`` each of ``sends``, in order: one coroutine for a whole batch instead of one per event."""
        publish = self._publisher.publish
        for send in sends:
            if type(send.outcome) is DeadLetter:
                # Its PubAck is read in full: the dead-letter sequence goes into the `dead letter stored` line.
                send.future = await publish(send.subject, send.payload, send.headers, detailed=True)
            else:
                send.future = await publish(send.subject, send.payload, send.headers)

    async def await_acks(self, sends: list[Send]) -> list[Send]:
        """Wait (bounded) for every PubAck; return the sends that failed or got no answer."""
        await _all_done([s.future for s in sends if s.future is not None], self._settings.timeout)
        failed: list[Send] = []
        for send in sends:
            if not _record_answer(send):
                failed.append(send)
        if failed:
            self._metrics.publish_errors.inc(len(failed))
        return failed

    async def hold(self, failed: list[Send]) -> list[Send]:
        """Retry failed publishes with backoff while the engine keeps their messages alive (``in_progress``).

        Holds run one at a time, in the order the failures were seen, and no new batch is sent while any is
        pending: so once the output recovers, held events still reach it in the order they were received.
        Retries reuse each event's ``Nats-Msg-Id``, so a publish whose PubAck was merely lost is not stored twice.
        Returns what still fails after ``publish.max_hold`` or at shutdown; a hold that was queued behind one that
        gave up returns at once instead of starting a new clock against an output that is still down.
        """
        self.holds += 1
        self._gate.clear()
        queued_at = self._clock.monotonic()
        try:
            async with self._hold_lock:
                if self.stopping or self._last_give_up > queued_at:
                    return failed
                return await self._retry(failed)
        finally:
            self.holds -= 1
            if self.holds == 0:
                self._gate.set()

    async def _retry(self, failed: list[Send]) -> list[Send]:
        publish = self._settings
        log.warning(
            "publish failed, holding and retrying",
            extra={
                "count": len(failed),
                "error": failed[0].error[:300],
                "max_hold": publish.max_hold,
                "first_event_id": failed[0].outcome.event_id or None,
            },
        )
        remaining = failed
        refused: list[Send] = []
        try:
            async for attempt in AsyncRetrying(
                stop=_HoldOver(self, self._clock, publish.max_hold),
                wait=wait_exponential_jitter(
                    multiplier=publish.retry_initial, max=publish.retry_max, jitter=publish.retry_initial
                ),
                retry=retry_if_exception_type(_StillFailing),
                reraise=True,
            ):
                with attempt:
                    await self.send_all(remaining)
                    remaining = await self.await_acks(remaining)
                    # A permanent refusal leaves the hold at once: waiting cannot fix it.
                    refused.extend(s for s in remaining if s.exc is not None and is_permanent_rejection(s.exc))
                    remaining = [s for s in remaining if s not in refused]
                    if remaining:
                        raise _StillFailing()
        except _StillFailing:
            self._last_give_up = self._clock.monotonic()
            log.warning("giving up the hold; nak'ing with a delay", extra={"count": len(remaining)})
        else:
            log.info("publishing works again", extra={"count": len(failed)})
        return refused + remaining

    async def hold_dead_letter(self, send: Send) -> bool:
        """Retry one dead letter with backoff until its stream takes it (True) or the engine stops (False).

        Runs beside the gate, not through it: while the dead-letter stream is full or missing, events keep flowing
        and only this message waits (kept alive by the engine, so it spends no delivery attempt).
        """
        publish = self._settings
        self.dead_letters_held += 1
        delay = publish.retry_initial
        try:
            while send.error and not self.stopping:
                await asyncio.sleep(delay)  # back-off between attempts against a failing stream
                delay = min(publish.retry_max, delay * 2)
                await self.send(send)
                await self.await_acks([send])
        finally:
            self.dead_letters_held -= 1
        return not send.error


async def _all_done(futures: list[asyncio.Future[PubAck]], seconds: float) -> None:
    """Wait until every one of ``futures`` is done, at most ``seconds``.

    Waits on the last one still pending, then looks again: the stream answers a connection's publishes in order,
    so this wakes about once a batch, and an answered future costs a ``done()``. ``asyncio.wait`` on all of them
    would put a callback on each (a loop handle per answer) and take them all off again. Answers out of order only
    mean another wake."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while futures := [f for f in futures if not f.done()]:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.wait((futures[-1],), timeout=remaining)


def _record_answer(send: Send) -> bool:
    """Copy the answer of ``send``'s publish onto it; True when the stream stored it."""
    future = send.future
    if future is None or not future.done():
        if future is not None:
            future.cancel()
        send.error = "no PubAck within publish.timeout"
        send.exc = None
        return False
    exc = future.exception()
    if exc is not None:
        send.exc = exc
        send.error = str(exc)
        return False
    send.error = ""
    send.exc = None
    answer: PubAck = future.result()
    send.duplicate = answer.duplicate
    return True
