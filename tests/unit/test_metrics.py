"""Metric helpers: ``observe_all`` gives the same histogram as one ``observe`` per value."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from cdc_service.metrics import observe_all

BOUNDS = (0.001, 0.01, 0.1, 1.0)
VALUES = [0.0, 0.001, 0.0010001, 0.005, 0.01, 0.5, 1.0, 1.5, 99.0, 0.005, 0.001]


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def histograms(labelled: bool) -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    one, bulk = CollectorRegistry(), CollectorRegistry()
    if not labelled:
        return (
            one,
            Histogram("t", "t", buckets=BOUNDS, registry=one),
            bulk,
            Histogram("t", "t", buckets=BOUNDS, registry=bulk),
        )
    by_one = Histogram("t_seconds", "t", ["table"], buckets=BOUNDS, registry=one).labels("a")
    in_bulk = Histogram("t_seconds", "t", ["table"], buckets=BOUNDS, registry=bulk).labels("a")
    return one, by_one, bulk, in_bulk


@pytest.mark.parametrize("labelled", [True, False], ids=["a labelled child", "an unlabelled histogram"])
@pytest.mark.parametrize("values", [VALUES, [0.002] * 5, [7.0], [], [0.1, math.nan, 0.2]], ids=str)
def test_observe_all_matches_one_observe_per_value(values: list[float], labelled: bool) -> None:
    one, by_one, bulk, in_bulk = histograms(labelled)
    for value in values:
        by_one.observe(value)
    observe_all(in_bulk, values)
    expected, got = samples(one), samples(bulk)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key
