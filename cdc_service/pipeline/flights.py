"""The in-flight table: events this replica is publishing, so a later copy of one waits instead of publishing too;
and the Redis claims those events hold, renewed while they are pending and released when they fail."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor

from cdc_service.core.outcomes import Publish
from cdc_service.metrics import Metrics
from cdc_service.pipeline.clock import Clock
from cdc_service.ports import DedupStore


class Flight:
    """An event this replica is publishing. ``stored`` is None while it is pending, True once the stream holds the
    event (later copies are acked as duplicates), False when the attempt failed for good (then one of them
    publishes). A copy that has to wait awaits ``result``, a future made on first use: most flights are never
    waited on, and a future per event is not free.

    A failed flight leaves the table at once. A published one stays until every batch that was looked up in Redis
    before its marker write ended has been walked (``marked_at``, a dispatch number): such a batch may have missed
    the marker, and only this entry tells it that its copy is a duplicate.
    """

    __slots__ = ("_result", "claimed", "claimed_at", "marked_at", "stored", "waiters")

    def __init__(self, claimed: bool = False, claimed_at: float = 0.0) -> None:
        self.stored: bool | None = None
        self._result: asyncio.Future[bool] | None = None
        self.claimed = claimed  # this replica's Redis claim covers it: renewed while it is pending
        self.claimed_at = claimed_at  # monotonic time the claim was taken or last renewed
        self.waiters = 0
        self.marked_at = 0  # batches dispatched when the marker write ended; 0 until then

    @property
    def result(self) -> asyncio.Future[bool]:
        """The outcome as a future (made now if no copy asked before), done once the flight has landed."""
        if self._result is None:
            self._result = asyncio.get_running_loop().create_future()
            if self.stored is not None:
                self._result.set_result(self.stored)
        return self._result

    def end(self, stored: bool) -> None:
        self.stored = stored
        if self._result is not None and not self._result.done():
            self._result.set_result(stored)


class FlightTable:
    """Loop thread only. ``dispatched`` reads the batcher's dispatch count; ``claimed_in_queue`` the claimed events
    of batches prepared but not walked yet (a copy there may hold our claim already, so it is not released)."""

    def __init__(
        self,
        dedup: DedupStore,
        executor: Executor,
        metrics: Metrics,
        clock: Clock,
        *,
        dispatched: Callable[[], int],
        claimed_in_queue: Callable[[], set[str]],
    ) -> None:
        self._dedup = dedup
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._dispatched = dispatched
        self._claimed_in_queue = claimed_in_queue
        self._flights: dict[str, Flight] = {}
        # The flight of an event id, or None. The dict's own get: the walk asks once per event, and a Python-level
        # method around it would add a call to every publish.
        self.get: Callable[[str], Flight | None] = self._flights.get
        self._marked_flights: deque[tuple[int, str, Flight]] = deque()
        self.releases: set[asyncio.Future[None]] = set()  # release calls still running (drain waits for them)
        self._unclaimed = 0  # unclaimed take-offs not counted yet

    def __len__(self) -> int:
        return len(self._flights)

    def take_off(self, event: Publish) -> Flight:
        """Enter ``event`` in the table; the caller publishes it next, before awaiting anything else."""
        flight = Flight(event.claimed, self._clock.monotonic())
        self._flights[event.event_id] = flight
        if not event.claimed:
            self._unclaimed += 1  # counted by count_unclaimed, once a batch: a counter's inc takes a lock
        return flight

    def count_unclaimed(self) -> None:
        """Add the events taken off without a claim since the last call to their counter (after each walk and
        each landing)."""
        if self._unclaimed:
            self._metrics.unclaimed_publishes.inc(self._unclaimed)
            self._unclaimed = 0

    def land(self, events: Iterable[Publish], stored: bool) -> None:
        """Tell the copies waiting on these publishes how they ended; a failed claim is released for other
        replicas unless a copy here takes it over (the claim is this replica's, not the message's)."""
        self.count_unclaimed()
        release = []
        for event in events:
            flight = self._flights.get(event.event_id)
            if flight is None or flight.stored is not None:
                continue
            flight.end(stored)
            if not stored:
                del self._flights[event.event_id]
                if event.claimed and flight.waiters == 0:
                    release.append(event.event_id)
        if release:
            queued = self._claimed_in_queue()
            release = [event_id for event_id in release if event_id not in queued]
        if release:
            self.release(release)

    def marked(self, event_ids: list[str]) -> None:
        """The marker write of these published events ended (either way): batches dispatched from now on look
        them up after it, so the table keeps them only until the walk passes today's dispatch number."""
        dispatched = self._dispatched()
        for event_id in event_ids:
            flight = self._flights.get(event_id)
            if flight is not None and flight.marked_at == 0:
                flight.marked_at = dispatched
                self._marked_flights.append((dispatched, event_id, flight))

    def forget(self, number: int) -> None:
        """The walk reached batch ``number``: forget published flights whose marker it cannot have missed."""
        marked = self._marked_flights
        while marked and marked[0][0] < number:
            _, event_id, flight = marked.popleft()
            if self._flights.get(event_id) is flight:
                del self._flights[event_id]

    def release(self, event_ids: list[str]) -> None:
        """Give up these claims in Redis. Not awaited (drain waits for what is left): release never raises, and a
        claim left behind only expires."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._dedup.release, event_ids)
        self.releases.add(future)
        future.add_done_callback(self.releases.discard)

    def due_for_renewal(self, period: float) -> list[str]:
        """Claimed events still pending whose claim was last taken more than ``period`` ago; marks them renewed."""
        now = self._clock.monotonic()
        due = now - period
        renew = []
        for event_id, flight in self._flights.items():
            if flight.claimed and flight.stored is None and flight.claimed_at < due:
                flight.claimed_at = now
                renew.append(event_id)
        return renew

    async def renew_claims(self, ttl: float) -> None:
        """Keep the claims of events still in flight (a slow PubAck, a hold) from expiring under them, so a copy at
        another replica keeps waiting instead of publishing too. Renewing is the lookup-and-claim call itself: our
        own claim gets its TTL back; one that expired is taken again unless someone else has it by now."""
        period = ttl / 3.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            renew = self.due_for_renewal(period)
            if renew:
                await loop.run_in_executor(self._executor, self._dedup.claim, renew)
