"""FlightTable: events in flight here, how they land, when they are forgotten, and their Redis claims."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from cdc_service.core.outcomes import Publish
from cdc_service.metrics import Metrics
from cdc_service.pipeline.flights import FlightTable
from cdc_service.testing import FakeDedupStore, ManualClock


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-flights")
    yield pool
    pool.shutdown(wait=True)


class Table:
    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.dedup = FakeDedupStore()
        self.clock = ManualClock()
        self.registry = CollectorRegistry()
        self.dispatched = 0
        self.queued: set[str] = set()
        self.table = FlightTable(
            self.dedup,
            executor,
            Metrics(self.registry),
            self.clock,
            dispatched=lambda: self.dispatched,
            claimed_in_queue=lambda: self.queued,
        )

    async def released(self) -> list[str]:
        if self.table.releases:
            await asyncio.wait(set(self.table.releases), timeout=5)
        return self.dedup.released


def event(event_id: str = "e1", *, claimed: bool = True) -> Publish:
    return Publish("messages", event_id, "wa.x", b"{}", None, claimed=claimed)


async def test_a_stored_flight_tells_its_copies_and_stays_until_walked_past(executor: ThreadPoolExecutor) -> None:
    t = Table(executor)
    flight = t.table.take_off(event())
    assert t.table.get("e1") is flight and not flight.result.done()
    t.table.land([event()], stored=True)
    assert flight.result.result() is True
    t.dispatched = 7
    t.table.marked(["e1"])
    assert flight.marked_at == 7
    t.table.forget(7)  # batch 7 was looked up before the marker ended: it may still hold a copy
    assert t.table.get("e1") is flight
    t.table.forget(8)
    assert t.table.get("e1") is None and len(t.table) == 0


async def test_a_failed_flight_leaves_at_once_and_releases_its_claim(executor: ThreadPoolExecutor) -> None:
    t = Table(executor)
    t.dedup.claims["e1"] = t.dedup.token
    flight = t.table.take_off(event())
    t.table.land([event()], stored=False)
    assert flight.result.result() is False and t.table.get("e1") is None
    assert await t.released() == ["e1"]


@pytest.mark.parametrize("kept_by", ["a waiting copy", "a queued copy"])
async def test_a_failed_claim_is_kept_for_a_copy_here(executor: ThreadPoolExecutor, kept_by: str) -> None:
    t = Table(executor)
    t.dedup.claims["e1"] = t.dedup.token
    flight = t.table.take_off(event())
    if kept_by == "a waiting copy":
        flight.waiters = 1
    else:
        t.queued = {"e1"}
    t.table.land([event()], stored=False)
    assert await t.released() == []


async def test_an_unclaimed_publish_is_counted_and_never_released(executor: ThreadPoolExecutor) -> None:
    t = Table(executor)
    t.table.take_off(event(claimed=False))
    t.table.land([event(claimed=False)], stored=False)
    assert await t.released() == []
    assert t.registry.get_sample_value("cdc_consumer_unclaimed_publishes_total") == 1


async def test_claims_of_pending_flights_are_renewed_once_a_period(executor: ThreadPoolExecutor) -> None:
    t = Table(executor)
    t.table.take_off(event("pending"))
    t.table.take_off(event("unclaimed", claimed=False))
    t.table.take_off(event("done"))
    t.table.land([event("done")], stored=True)
    assert t.table.due_for_renewal(10) == []  # taken just now
    t.clock.advance(11)
    assert t.table.due_for_renewal(10) == ["pending"]
    assert t.table.due_for_renewal(10) == []  # renewed: not due again until another period passes
    t.clock.advance(11)
    assert t.table.due_for_renewal(10) == ["pending"]
