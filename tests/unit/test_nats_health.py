"""The NATS connection watches with stand-in connections: a stopped read loop (nats-py ends it on an unexpected
exception but still says it is connected), a frozen server that does not answer pings, and the connection
callbacks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cdc_service import health
from cdc_service.metrics import Metrics
from cdc_service.nats_health import ConnectionEvents, PingWatch, ReadLoopWatch

log = logging.getLogger("cdc_service.service")


class FakeReadTask:
    def __init__(self) -> None:
        self.ended = False

    def done(self) -> bool:
        return self.ended


def test_a_stopped_read_loop_reconnects_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    """The watch must notice, reconnect once, and say since when the read loop is down: readiness fails at once,
    liveness only if the reconnect does not help."""
    task = FakeReadTask()
    nc: Any = SimpleNamespace(is_connected=True, _reading_task=task)
    now = [100.0]
    restarts: list[Any] = []

    async def restart(client: Any) -> None:
        restarts.append(client)

    watch = ReadLoopWatch(nc, log, clock=lambda: now[0], restart=restart)

    async def tick(*, stopping: bool = False) -> None:
        watch.check(stopping=stopping)
        await asyncio.sleep(0)  # lets a restart task run

    asyncio.run(tick())
    assert watch.stopped_at is None and restarts == []
    task.ended = True
    with caplog.at_level("ERROR", logger=log.name):
        asyncio.run(tick())
        now[0] = 103.0
        asyncio.run(tick())
    assert restarts == [nc]  # one reconnect per episode
    assert [r.getMessage() for r in caplog.records] == ["the NATS read loop stopped; reconnecting"]
    assert watch.stopped_at == 100.0
    facts = health.HealthFacts(nats_created=True, nats_connected=True, started=True, intake_active=True)
    down = dataclasses.replace(facts, read_loop_stopped_for=now[0] - watch.stopped_at)
    assert health.readiness(down) == (False, {"redis": "ok", "reason": "NATS read loop stopped"})
    assert health.liveness(down)[0]  # the reconnect gets its chance first
    task.ended = False  # a new read loop after the reconnect
    asyncio.run(tick())
    assert watch.stopped_at is None
    task.ended = True
    asyncio.run(tick(stopping=True))  # nothing is restarted while the service stops
    assert watch.stopped_at is None and len(restarts) == 1


class FakeNc:
    def __init__(self) -> None:
        self.is_connected = True
        self.answers = True
        self.flushes: list[float] = []

    async def flush(self, timeout: float) -> None:
        self.flushes.append(timeout)
        if not self.answers:
            raise TimeoutError


def test_a_quiet_connection_is_pinged_and_no_answer_is_a_problem_until_one_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nc = FakeNc()
    engine = SimpleNamespace(last_received=0.0, last_settled=0.0, inflight=2)
    now = [4.0]
    metrics = Metrics(CollectorRegistry())
    watch = PingWatch(nc, engine, metrics, log, 5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    asyncio.run(watch.check())
    assert nc.flushes == [] and watch.problem is None  # something moved within the timeout: no ping
    now[0], nc.answers = 7.0, False
    with caplog.at_level("INFO", logger=log.name):
        asyncio.run(watch.check())
        asyncio.run(watch.check())
        assert nc.flushes == [5, 5]
        assert watch.problem == "nats-server did not answer a ping within 5s; nothing received or acked for 7s"
        assert metrics.nats_connected._value.get() == 0
        nc.answers = True
        asyncio.run(watch.check())
    assert watch.problem is None and metrics.nats_connected._value.get() == 1
    assert [r.getMessage() for r in caplog.records] == [
        "nats-server does not answer pings; not ready",
        "nats-server answers pings again",
    ]
    nc.answers, nc.is_connected = False, False
    asyncio.run(watch.check())  # readiness reports the disconnection itself
    assert watch.problem is None and len(nc.flushes) == 3


def test_connection_events(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(CollectorRegistry())
    stopping, lost = [False], []
    events = ConnectionEvents(metrics, log, lambda: stopping[0], lambda: lost.append(True))
    with caplog.at_level("INFO", logger=log.name):
        asyncio.run(events.disconnected())
        assert metrics.nats_connected._value.get() == 0
        asyncio.run(events.reconnected())
        assert (metrics.nats_connected._value.get(), metrics.nats_reconnects._value.get()) == (1, 1)
        asyncio.run(events.closed())
        assert lost == [True]
        stopping[0] = True
        asyncio.run(events.disconnected())
        asyncio.run(events.closed())
    assert lost == [True]  # closing while stopping is the normal end
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "disconnected from NATS, reconnecting"),
        ("INFO", "reconnected to NATS"),
        ("CRITICAL", "NATS connection closed for good; exiting"),
    ]
