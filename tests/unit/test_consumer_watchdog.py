"""The consumer watchdog's decisions, against a stand-in JetStream context: readiness while the durable is gone,
recreation on "consumer not found", no recreation when the stream itself is missing, restoring an edited durable,
and a failing check left for the next period."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import NotFoundError, ServiceUnavailableError
from prometheus_client import CollectorRegistry

from cdc_service import health
from cdc_service.adapters.nats_jetstream import consumer_config, consumer_drift
from cdc_service.config import IngestSettings
from cdc_service.consumer_watchdog import ConsumerWatchdog
from cdc_service.metrics import Metrics

log = logging.getLogger("cdc_service.service")
INGEST = IngestSettings()
# A running replica but for what the watchdog finds: readiness is decided by its ``problem`` alone.
RUNNING = health.HealthFacts(nats_created=True, nats_connected=True, started=True, intake_active=True)


def readiness_with(watchdog: ConsumerWatchdog) -> tuple[bool, dict[str, Any]]:
    return health.readiness(dataclasses.replace(RUNNING, consumer_problem=watchdog.problem))


class FakeJs:
    def __init__(self, error: Exception | None, *, config: Any = None, ack_floor: int = 0, pending: int = 0) -> None:
        self.error = error
        self.config = consumer_config(INGEST) if config is None else config  # as configured: no drift
        self.ack_floor, self.pending = ack_floor, pending
        self.created: list[Any] = []
        self.configs: list[Any] = []
        self.deleted: list[Any] = []
        self.watchdog: ConsumerWatchdog | None = None
        self.readiness_while_creating: tuple[bool, dict[str, Any]] | None = None

    async def consumer_info(self, stream: str, durable: str) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(
            name=durable,
            ack_floor=SimpleNamespace(stream_seq=self.ack_floor),
            num_pending=self.pending,
            config=self.config,
        )

    async def stream_info(self, stream: str) -> Any:
        return SimpleNamespace(config=SimpleNamespace(subjects=["cdc.*.*"]))

    async def add_consumer(self, stream: str, config: Any = None, **_: Any) -> Any:
        assert self.watchdog is not None
        self.configs.append(config)
        self.readiness_while_creating = readiness_with(self.watchdog)
        self.created.append((stream, config.durable_name))
        self.error = None
        self.config = config
        return SimpleNamespace(name=config.durable_name)

    async def delete_consumer(self, stream: str, durable: str) -> bool:
        self.deleted.append((stream, durable))
        self.error = NotFoundError(code=404, err_code=10014, description="consumer not found")
        return True


def watchdog_on(js: FakeJs, **kwargs: Any) -> tuple[ConsumerWatchdog, Metrics]:
    metrics = Metrics(CollectorRegistry())
    watchdog = ConsumerWatchdog(js, INGEST, metrics, log, **kwargs)  # type: ignore[arg-type]
    js.watchdog = watchdog
    return watchdog, metrics


def test_a_missing_consumer_is_recreated_and_readiness_says_so_meanwhile() -> None:
    js = FakeJs(NotFoundError(code=404, err_code=10014, description="consumer not found"))
    watchdog, metrics = watchdog_on(js)
    assert watchdog.problem is None and readiness_with(watchdog)[0]
    asyncio.run(watchdog.check())
    assert js.created == [("cdc_events_stream", "cdc_consumers")]
    # Widened to ">" so subjects with literal wildcard tokens are not skipped by the filter.
    assert js.configs[0].filter_subject == "cdc.>"
    assert js.readiness_while_creating == (False, {"redis": "ok", "reason": "consumer missing"})
    assert watchdog.problem is None and readiness_with(watchdog)[0]
    assert metrics.consumer_recreated._value.get() == 1


def test_a_recreated_consumer_resumes_after_the_last_ack_floor_seen() -> None:
    js = FakeJs(None, ack_floor=41, pending=9)
    watchdog, metrics = watchdog_on(js)
    asyncio.run(watchdog.check())
    assert (watchdog.ack_floor, watchdog.backlog) == (41, 9)
    assert (metrics.ack_floor._value.get(), metrics.backlog._value.get()) == (41, 9)
    js.error = NotFoundError(code=404, err_code=10014, description="consumer not found")
    asyncio.run(watchdog.check())
    assert js.configs[0].opt_start_seq == 42


def test_a_missing_stream_is_not_recreated_and_keeps_the_service_unready() -> None:
    js = FakeJs(NotFoundError(code=404, err_code=10059, description="stream not found"))
    watchdog, _ = watchdog_on(js)
    asyncio.run(watchdog.check())
    assert js.created == []
    assert readiness_with(watchdog) == (False, {"redis": "ok", "reason": "input stream missing"})
    js.error = None  # the operator recreated the stream (and with it, at the next check, the consumer exists)
    asyncio.run(watchdog.check())
    assert readiness_with(watchdog)[0]


def test_an_edited_filter_recreates_the_durable_and_other_edits_update_it(caplog: pytest.LogCaptureFixture) -> None:
    narrowed = dataclasses.replace(consumer_config(INGEST), filter_subject="cdc.acme.*")
    js = FakeJs(None, config=narrowed)
    watchdog, metrics = watchdog_on(js)
    with caplog.at_level("CRITICAL", logger=log.name):
        asyncio.run(watchdog.check())
    assert js.deleted == [("cdc_events_stream", "cdc_consumers")] and len(js.created) == 1
    assert metrics.consumer_drift.labels("filter_subjects")._value.get() == 1
    assert [r.levelname for r in caplog.records] == ["CRITICAL"]
    js.config = dataclasses.replace(consumer_config(INGEST), ack_wait=1.0)
    asyncio.run(watchdog.check())
    assert len(js.deleted) == 1 and len(js.created) == 2  # updated in place: the delivery state is kept
    assert metrics.consumer_drift.labels("ack_wait")._value.get() == 1


class Stop(Exception):
    pass


def test_other_errors_are_left_for_the_next_period(caplog: pytest.LogCaptureFixture) -> None:
    js = FakeJs(ServiceUnavailableError(code=503, description="JetStream not available"))
    periods: list[float] = []

    async def sleep(seconds: float) -> None:
        periods.append(seconds)
        if len(periods) > 2:
            raise Stop  # ends run() after two checks

    watchdog, _ = watchdog_on(js, sleep=sleep)
    with pytest.raises(ServiceUnavailableError):  # one check: the caller decides
        asyncio.run(watchdog.check())
    with caplog.at_level("DEBUG", logger=log.name), pytest.raises(Stop):
        asyncio.run(watchdog.run())
    assert periods == [INGEST.consumer_check_interval] * 3
    failed = [r for r in caplog.records if r.message == "consumer check failed"]
    assert [r.levelname for r in failed] == ["DEBUG", "DEBUG"]
    assert js.created == []
    assert watchdog.problem is None and readiness_with(watchdog)[0]


@pytest.mark.parametrize(
    ("edit", "fields"),
    [
        ({}, []),
        ({"filter_subject": "cdc.acme.*"}, ["filter_subjects"]),
        ({"filter_subject": None, "filter_subjects": ["cdc.*.*"]}, []),  # the same filter, spelled as a list
        ({"filter_subject": "cdc.>"}, []),  # widened by provisioning to take literal-wildcard subjects too
        ({"ack_wait": 1.0}, ["ack_wait"]),
        ({"max_deliver": 10, "max_ack_pending": 1}, ["max_deliver", "max_ack_pending"]),
        ({"deliver_subject": "elsewhere"}, ["deliver_subject"]),
        ({"deliver_group": "other"}, ["deliver_subject"]),
    ],
)
def test_consumer_drift_names_the_edited_fields(edit: dict[str, Any], fields: list[str]) -> None:
    expected = consumer_config(IngestSettings())
    actual = dataclasses.replace(expected, **edit)
    assert consumer_drift(expected, actual) == fields
