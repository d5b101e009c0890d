"""Copies of an event: one already in flight here waits for it; one whose claim another replica holds waits for
that replica. Neither is ever dropped, and neither is published while the first copy may still be stored."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from cdc_service.core.outcomes import Publish, Result
from cdc_service.metrics import Metrics
from cdc_service.pipeline.common import Batch, Tasks
from cdc_service.pipeline.finisher import Finisher
from cdc_service.pipeline.flights import Flight, FlightTable
from cdc_service.pipeline.ledger import SettleLedger
from cdc_service.pipeline.output import Output
from cdc_service.ports import Claim, DedupStore

RECHECK_FIRST = 0.005  # a claim holder normally finishes (PubAck and marker) within a few ms
RECHECK_MAX = 0.25


class Copies:
    """Settles copies of events outside the receipt-order walk, on the loop thread."""

    def __init__(
        self,
        flights: FlightTable,
        ledger: SettleLedger,
        output: Output,
        finisher: Finisher,
        dedup: DedupStore,
        executor: Executor,
        metrics: Metrics,
        tasks: Tasks,
    ) -> None:
        self._flights = flights
        self._ledger = ledger
        self._output = output
        self._finisher = finisher
        self._dedup = dedup
        self._executor = executor
        self._metrics = metrics
        self._tasks = tasks

    async def of_flight(self, batch: Batch, index: int, event: Publish) -> bool:
        """If this replica is publishing ``event`` already, settle this copy after that outcome and return True.

        Decides without awaiting when it returns False, so a caller may enter the event in the table right after.
        """
        flight = self._flights.get(event.event_id)
        if flight is None:
            return False
        self._metrics.copy_waits.labels("this_replica").inc()
        if flight.stored is not None:  # in the table and landed means stored: failed flights leave at once
            await self._ledger.settle(batch, index, Result.DUPLICATE, event.table)
        else:
            flight.waiters += 1
            self._tasks.spawn(self._follow(batch, index, event, flight))
        return True

    def claimed_elsewhere(self, batch: Batch, index: int, event: Publish) -> None:
        """Another replica holds the claim: look again after a growing pause until the event is settled here."""
        self._tasks.spawn(self.claim_and_publish(batch, index, event, wait=True))

    async def _follow(self, batch: Batch, index: int, event: Publish, flight: Flight) -> None:
        """A copy of an event in flight here: a duplicate once the first copy is stored, else published itself."""
        try:
            stored = await flight.result
        finally:
            flight.waiters -= 1
        if stored:
            await self._ledger.settle(batch, index, Result.DUPLICATE, event.table)
        else:
            await self.claim_and_publish(batch, index, event, wait=False)

    async def claim_and_publish(self, batch: Batch, index: int, event: Publish, *, wait: bool) -> None:
        """Publish a copy outside the receipt-order walk, once it holds the claim: a copy whose first copy failed
        here, or one whose claim another replica holds (``wait``: look again after a growing pause). Never drops
        it: the claim ends as a marker (ack as a duplicate), is released, or expires; at shutdown the copy is
        handed back."""
        loop = asyncio.get_running_loop()
        delay = RECHECK_FIRST
        while index in batch.open:
            if wait:
                await asyncio.sleep(delay)  # the other replica's publish is under way; it usually ends in ms
                delay = min(delay * 2, RECHECK_MAX)
            wait = True
            if self._output.stopping:
                await self._ledger.settle(batch, index, Result.RETRIED, event.table)
                return
            if await self.of_flight(batch, index, event):
                return
            states = await loop.run_in_executor(self._executor, self._dedup.claim, [event.event_id])
            if index not in batch.open:
                return
            state = None if states is None else states[0]
            if state is Claim.DONE:
                await self._ledger.settle(batch, index, Result.DUPLICATE, event.table)
                return
            if state is Claim.HELD:
                continue
            event.claimed = state is Claim.CLAIMED  # None: Redis unavailable, publish unclaimed (fail open)
            if await self._publish_claimed(batch, index, event):
                return

    async def _publish_claimed(self, batch: Batch, index: int, event: Publish) -> bool:
        """Publish a copy that holds its claim (or fails open), behind any hold; False: look again."""
        await self._output.wait_open()  # behind a hold, like every batch
        if self._output.stopping or index not in batch.open:
            return False
        if await self.of_flight(batch, index, event):
            return True
        self._flights.take_off(event)
        send = self._finisher.event_send(index, event)
        await self._output.send(send)
        self._tasks.spawn(self._finisher.finish(batch, [send]))
        return True
