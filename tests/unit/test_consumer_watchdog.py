"""The consumer watchdog's decisions, against a stand-in JetStream context: readiness while the durable is gone,
recreation on "consumer not found", and no recreation when the stream itself is missing."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import NotFoundError, ServiceUnavailableError

from cdc_service.adapters.nats_jetstream import consumer_config, consumer_drift
from cdc_service.config import HttpSettings, IngestSettings, Settings
from cdc_service.service import Service


class FakeJs:
    def __init__(self, service: Service, error: Exception | None) -> None:
        self.service = service
        self.error = error
        self.created: list[Any] = []
        self.configs: list[Any] = []
        self.readiness_while_creating: tuple[bool, dict[str, Any]] | None = None

    async def consumer_info(self, stream: str, durable: str) -> Any:
        if self.error is not None:
            raise self.error
        return SimpleNamespace(
            name=durable,
            ack_floor=SimpleNamespace(stream_seq=0),
            num_pending=0,
            config=consumer_config(self.service.settings.ingest),  # as configured: no drift
        )

    async def stream_info(self, stream: str) -> Any:
        return SimpleNamespace(config=SimpleNamespace(subjects=["cdc.*.*"]))

    async def add_consumer(self, stream: str, config: Any) -> Any:
        self.configs.append(config)
        self.readiness_while_creating = self.service.readiness()
        self.created.append((stream, config.durable_name))
        self.error = None
        return SimpleNamespace(name=config.durable_name)


@pytest.fixture(autouse=True)
def _close_services() -> Iterator[None]:
    yield
    for service in _made:
        service.http.stop()  # bound in the constructor, never served
        service._executor.shutdown(wait=False)
        service._loop.close()
        service.dedup.close()
    _made.clear()


_made: list[Service] = []


def running_service(error: Exception | None) -> tuple[Service, FakeJs]:
    service = Service(dataclasses.replace(Settings(), http=HttpSettings(host="127.0.0.1", port=0)))
    _made.append(service)
    service._nc = SimpleNamespace(is_connected=True)  # type: ignore[assignment]
    service._intake = SimpleNamespace(active=True)  # type: ignore[assignment]
    service._ready = True
    js = FakeJs(service, error)
    service._js = js  # type: ignore[assignment]
    return service, js


def test_a_missing_consumer_is_recreated_and_readiness_says_so_meanwhile() -> None:
    service, js = running_service(NotFoundError(code=404, err_code=10014, description="consumer not found"))
    assert service.readiness()[0]
    asyncio.run(service._check_consumer())
    assert js.created == [("cdc_events_stream", "cdc_consumers")]
    # Widened to ">" so subjects with literal wildcard tokens are not skipped by the filter.
    assert js.configs[0].filter_subject == "cdc.>"
    assert js.readiness_while_creating == (False, {"redis": "ok", "reason": "consumer missing"})
    assert service.readiness()[0]
    assert service.metrics.consumer_recreated._value.get() == 1


def test_a_missing_stream_is_not_recreated_and_keeps_the_service_unready() -> None:
    service, js = running_service(NotFoundError(code=404, err_code=10059, description="stream not found"))
    asyncio.run(service._check_consumer())
    assert js.created == []
    assert service.readiness() == (False, {"redis": "ok", "reason": "input stream missing"})
    js.error = None  # the operator recreated the stream (and with it, at the next check, the consumer exists)
    asyncio.run(service._check_consumer())
    assert service.readiness()[0]


def test_other_errors_are_left_for_the_next_period() -> None:
    service, js = running_service(ServiceUnavailableError(code=503, description="JetStream not available"))
    with pytest.raises(ServiceUnavailableError):  # _watch_consumer logs it at debug and asks again next period
        asyncio.run(service._check_consumer())
    assert js.created == []
    assert service.readiness()[0]


def test_a_stall_fails_liveness_and_is_logged_critically_once(caplog: pytest.LogCaptureFixture) -> None:
    service, _ = running_service(None)
    stuck = True
    service.engine = SimpleNamespace(  # type: ignore[assignment]
        stalled=lambda now: stuck, inflight=3, last_settled=time.monotonic() - 200
    )
    with caplog.at_level("CRITICAL", logger="cdc_service.service"):
        first, second = service.liveness(), service.liveness()
    assert first[0] is False and second[0] is False
    assert "3 messages pending" in first[1]["reason"]
    assert [r.levelname for r in caplog.records].count("CRITICAL") == 1
    stuck = False
    assert service.liveness() == (True, {})


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


class FakeReadTask:
    def __init__(self) -> None:
        self.ended = False

    def done(self) -> bool:
        return self.ended


def test_a_stopped_read_loop_reconnects_fails_readiness_and_then_liveness(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py ends its read loop on an unexpected exception but still says it is connected: the service must notice,
    reconnect, and never report ready (nor, if the reconnect does not help, alive) meanwhile."""
    service, _ = running_service(None)
    task = FakeReadTask()
    service._nc = SimpleNamespace(is_connected=True, _reading_task=task)  # type: ignore[assignment]
    restarts: list[Any] = []

    async def restart(nc: Any) -> None:
        restarts.append(nc)

    monkeypatch.setattr("cdc_service.service.restart_reading", restart)

    async def tick() -> None:
        service._check_read_loop()
        await asyncio.sleep(0)

    asyncio.run(tick())
    assert service.readiness()[0] and service.liveness()[0] and restarts == []
    task.ended = True
    with caplog.at_level("ERROR", logger="cdc_service.service"):
        asyncio.run(tick())
        asyncio.run(tick())
    assert len(restarts) == 1  # one reconnect per episode
    assert any("read loop stopped" in r.message for r in caplog.records)
    assert service.readiness() == (False, {"redis": "ok", "reason": "NATS read loop stopped"})
    assert service.liveness()[0]  # the reconnect gets its chance first
    service._read_loop_stopped_at = time.monotonic() - 60
    alive, detail = service.liveness()
    assert not alive and "read loop stopped" in detail["reason"]
    task.ended = False  # a new read loop after the reconnect
    asyncio.run(tick())
    assert service.readiness()[0] and service.liveness()[0]
