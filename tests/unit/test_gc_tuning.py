"""Once started, the service keeps the collector off what start-up made and collects young objects less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from cdc_service.service import GC_YOUNG_THRESHOLD, tune_garbage_collection


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_the_young_threshold_raised() -> None:
    gc.unfreeze()
    middle, oldest = gc.get_threshold()[1:]
    kept_at_start = [object() for _ in range(10)]
    tune_garbage_collection()
    assert gc.get_freeze_count() > len(kept_at_start)
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, oldest)  # the older generations keep their ratios
    assert GC_YOUNG_THRESHOLD > 700  # Python's default, which collected every few dozen events
