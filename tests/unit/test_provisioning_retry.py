"""Start-up provisioning on a cluster that is still electing leaders: ``Service._start`` retries JetStream API
requests that time out, find no responder or are answered 503 (one WARNING per attempt, ``/readyz`` says why) and
still stops at once on a permanent error. Against a stand-in JetStream context; the waits are recorded, not slept."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BadRequestError, NotFoundError, ServerError, ServiceUnavailableError

from cdc_service import service as service_module
from cdc_service.adapters.jetstream_retry import MAX_WAIT, ProvisioningRetry, transient
from cdc_service.adapters.nats_jetstream import ProvisioningError
from cdc_service.config import Settings
from cdc_service.service import Service


class FakeJs:
    """Streams and consumers in dicts; a call named in ``failures`` raises the next of its exceptions first."""

    def __init__(self, failures: dict[str, list[Exception]]) -> None:
        self.failures = {name: list(errors) for name, errors in failures.items()}
        self.streams: dict[str, Any] = {}
        self.consumers: dict[tuple[str, str], Any] = {}
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.failures.get(name):
            raise self.failures[name].pop(0)

    async def stream_info(self, name: str) -> Any:
        self._call("stream_info")
        if name not in self.streams:
            raise NotFoundError(code=404, err_code=10059, description="stream not found")
        return SimpleNamespace(config=self.streams[name])

    async def add_stream(self, config: Any) -> Any:
        self._call("add_stream")
        self.streams[config.name] = config
        return SimpleNamespace(config=config)

    async def update_stream(self, config: Any) -> Any:
        self._call("update_stream")
        self.streams[config.name] = config
        return SimpleNamespace(config=config)

    async def consumer_info(self, stream: str, durable: str) -> Any:
        self._call("consumer_info")
        if (stream, durable) not in self.consumers:
            raise NotFoundError(code=404, err_code=10014, description="consumer not found")
        return SimpleNamespace(config=self.consumers[stream, durable])

    async def add_consumer(self, stream: str, config: Any = None, **_: Any) -> Any:
        self._call("add_consumer")
        self.consumers[stream, config.durable_name] = config
        return SimpleNamespace(config=config)


class Reached(Exception):
    """Raised where start-up goes on after provisioning: provisioning is complete."""


class Harness:
    """Runs ``Service._start`` with ``js`` as the JetStream context, up to the publisher; the retry's waits are
    recorded (with what ``/readyz`` says during each) instead of slept."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.services: list[Service] = []
        self.waits: list[float] = []
        self.readiness: list[tuple[bool, dict[str, Any]]] = []

    async def start(self, js: FakeJs, budget: float = 60.0) -> None:
        nc = SimpleNamespace(_server_info={"version": "2.10.0"}, is_connected=True, jetstream=lambda timeout: js)

        async def connect(*_: Any, **__: Any) -> Any:
            return nc

        async def choose_publisher(*_: Any) -> Any:
            raise Reached

        self.monkeypatch.setattr(service_module, "connect", connect)
        self.monkeypatch.setattr(service_module, "choose_publisher", choose_publisher)
        service = Service(Settings())
        self.services.append(service)
        now = [0.0]

        async def sleep(seconds: float) -> None:
            self.waits.append(seconds)
            self.readiness.append(service.readiness())
            now[0] += seconds

        service._provisioning = ProvisioningRetry(budget, sleep=sleep, clock=lambda: now[0])
        await service._start()


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    harness = Harness(monkeypatch)
    yield harness
    for service in harness.services:
        service._loop.close()
        service._release()


TIMEOUT = NatsTimeoutError()
UNAVAILABLE = ServiceUnavailableError(code=503, err_code=10008, description="JetStream system temporarily unavailable")
NOT_LEADER = ServerError(code=500, err_code=10009, description="JetStream cluster can not handle request")


async def test_transient_failures_are_retried_with_one_warning_each(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    js = FakeJs(
        {
            "stream_info": [TIMEOUT],
            "add_stream": [UNAVAILABLE],
            "consumer_info": [NoRespondersError()],
            "add_consumer": [NOT_LEADER, TIMEOUT],
        }
    )
    with caplog.at_level(logging.WARNING, logger="cdc_service.nats"), pytest.raises(Reached):
        await harness.start(js)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "cdc_service.nats"]
    assert len(warnings) == 5
    assert [getattr(r, "attempt", None) for r in warnings] == [1, 2, 3, 4, 5]
    assert warnings[0].getMessage() == (
        "provisioning: js.stream_info(cdc_events_stream) failed (attempt 1, TimeoutError: nats: timeout); "
        "next attempt in 0.25s"
    )
    assert [getattr(r, "call", None) for r in warnings] == [
        "js.stream_info(cdc_events_stream)",
        "js.add_stream(cdc_events_stream)",
        "js.add_consumer(cdc_max_deliveries, cdc_consumers_max_deliveries)",
        "js.add_consumer(cdc_max_deliveries, cdc_consumers_max_deliveries)",
        "js.consumer_info(cdc_events_stream, cdc_consumers)",
    ]
    assert "ServiceUnavailableError: code=503 err_code=10008" in warnings[1].getMessage()
    # Everything was provisioned in the end: the streams and the durables.
    assert set(js.streams) == {"cdc_events_stream", "wa_stream", "cdc_dlq_stream", "cdc_max_deliveries"}
    assert ("cdc_events_stream", "cdc_consumers") in js.consumers


async def test_the_waits_grow_to_a_cap_and_the_budget_ends_start_up(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    js = FakeJs({"stream_info": [TIMEOUT] * 100})
    with caplog.at_level(logging.WARNING, logger="cdc_service.nats"), pytest.raises(ProvisioningError) as raised:
        await harness.start(js, budget=30.0)
    logged = [getattr(r, "next_attempt_in", None) for r in caplog.records if r.levelno == logging.WARNING]
    assert harness.waits[:6] == [0.25, 0.5, 1.0, 2.0, 4.0, MAX_WAIT] == logged[:6]
    assert sum(harness.waits) == pytest.approx(30.0)  # the last wait is cut to what is left of the budget
    assert "nats.provision_timeout (30s)" in str(raised.value) and "TimeoutError" in str(raised.value)


async def test_a_permanent_error_stops_start_up_at_once(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    refused = BadRequestError(code=400, err_code=10065, description="subjects overlap with an existing stream")
    js = FakeJs({"add_stream": [refused]})
    with caplog.at_level(logging.WARNING, logger="cdc_service.nats"), pytest.raises(ProvisioningError) as raised:
        await harness.start(js)
    assert "cannot create stream cdc_events_stream: subjects overlap with an existing stream" in str(raised.value)
    assert js.calls == ["stream_info", "add_stream"]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_readiness_names_the_attempt_while_waiting(harness: Harness) -> None:
    with pytest.raises(Reached):
        await harness.start(FakeJs({"stream_info": [TIMEOUT]}))
    reason = (
        "starting: provisioning streams (attempt 1: js.stream_info(cdc_events_stream): TimeoutError: nats: timeout)"
    )
    assert harness.readiness == [(False, {"redis": "ok", "reason": reason})]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (NatsTimeoutError(), True),
        (NoRespondersError(), True),
        (ServiceUnavailableError(), True),  # a bare 503 status: no responders
        (ServiceUnavailableError(code=503, err_code=10008), True),
        (ServiceUnavailableError(code=503, err_code=10076, description="JetStream not enabled"), False),
        (ServiceUnavailableError(code=503, err_code=10039), False),
        (ServerError(code=500, err_code=10009), True),
        (ServerError(code=500, err_code=10118), True),
        (ServerError(code=500, err_code=10012, description="consumer create failed"), False),
        (BadRequestError(code=400, err_code=10058), False),
        (BadRequestError(code=400, err_code=10005, description="no suitable peers for placement"), False),
        (ProvisioningError("cannot create stream x: bad"), False),
        (ValueError("bug"), False),
    ],
)
def test_transient(error: Exception, expected: bool) -> None:
    assert transient(error) is expected
