"""The engine's clock in production: without an injected clock it reads the real monotonic and wall time (the service
compares its own ``time.monotonic()`` with the engine's progress times, and alerts read ``last_ack`` as unix time)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from cdc_service.config import Settings
from cdc_service.engine import Engine
from cdc_service.metrics import Metrics
from cdc_service.pipeline.clock import SYSTEM_CLOCK
from cdc_service.testing import FakeDedupStore, FakePublisher


def test_the_system_clock_is_the_real_one() -> None:
    before_mono, before_wall = time.monotonic(), time.time()
    mono, wall = SYSTEM_CLOCK.monotonic(), SYSTEM_CLOCK.time()
    after_mono, after_wall = time.monotonic(), time.time()
    assert before_mono <= mono <= after_mono
    assert before_wall <= wall <= after_wall


async def test_an_engine_without_a_clock_runs_on_the_system_clock() -> None:
    registry = CollectorRegistry()
    with ThreadPoolExecutor(max_workers=1) as pool:
        before_mono, before_wall = time.monotonic(), time.time()
        engine = Engine(Settings(), lambda _: [], FakeDedupStore(), FakePublisher(), pool, Metrics(registry))
        after_mono, after_wall = time.monotonic(), time.time()
    # Until the first ack, the engine's start is its last progress, on both clocks.
    assert before_mono <= engine.last_settled <= after_mono
    assert before_mono <= engine.last_received <= after_mono
    last_ack = registry.get_sample_value("cdc_consumer_last_ack_timestamp_seconds")
    assert last_ack is not None and before_wall <= last_ack <= after_wall
    # The service asks with its own time.monotonic(): nothing pending is never a stall, however late it asks.
    assert engine.stalled(time.monotonic() + 3600) is False
