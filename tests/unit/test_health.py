"""The probes' decisions as a table: each row is a snapshot of facts and the exact ``(ok, detail)`` that
``/readyz`` or ``/healthz`` answers for it (the HTTP server sends detail as JSON with ``status``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from cdc_service.health import FailureLog, HealthFacts, liveness, readiness

STATE = "cannot connect to NATS at nats://127.0.0.1:4222 (attempt 3: ConnectionRefusedError: refused)"
READY = HealthFacts(
    nats_state="connected to NATS at nats://127.0.0.1:4222",
    nats_created=True,
    nats_connected=True,
    started=True,
    intake_active=True,
)
STARTING = "starting: connected to NATS, provisioning streams and the consumer"
RETRYING = "starting: provisioning streams (attempt 2: js.stream_info(cdc_events_stream): TimeoutError: nats: timeout)"
PING = "nats-server did not answer a ping within 5s; nothing received or acked for 7s"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({}, (True, {"redis": "ok", "nats": "connected"})),
        ({"redis_ok": False, "redis_problem": "probe fails (ConnectionError)"},
         (True, {"redis": "degraded", "nats": "connected", "redis_detail": "probe fails (ConnectionError)"})),
        ({"redis_ok": False}, (True, {"redis": "degraded", "nats": "connected", "redis_detail": "degraded"})),
        ({"stopping": True}, (False, {"redis": "ok", "reason": "shutting down"})),
        ({"stopping": True, "nats_created": False}, (False, {"redis": "ok", "reason": "shutting down"})),
        ({"nats_created": False, "nats_connected": False, "nats_state": STATE, "started": False},
         (False, {"redis": "ok", "reason": STATE})),
        ({"nats_connected": False, "nats_state": STATE},
         (False, {"redis": "ok", "reason": f"not connected to NATS: {STATE}"})),
        ({"read_loop_stopped_for": 0.0}, (False, {"redis": "ok", "reason": "NATS read loop stopped"})),
        ({"read_loop_stopped_for": 1.0, "started": False},
         (False, {"redis": "ok", "reason": "NATS read loop stopped"})),
        ({"started": False, "intake_active": False}, (False, {"redis": "ok", "reason": STARTING})),
        ({"started": False, "intake_active": False, "starting": RETRYING},
         (False, {"redis": "ok", "reason": RETRYING})),
        ({"intake_active": False}, (False, {"redis": "ok", "reason": "not bound to the consumer"})),
        ({"consumer_problem": "consumer missing"}, (False, {"redis": "ok", "reason": "consumer missing"})),
        ({"consumer_problem": "input stream missing", "nats_problem": PING},
         (False, {"redis": "ok", "reason": "input stream missing"})),
        ({"nats_problem": PING}, (False, {"redis": "ok", "reason": PING})),
        ({"nats_problem": PING, "redis_ok": False}, (False, {"redis": "degraded", "reason": PING})),
        # Liveness facts do not decide readiness.
        ({"loop_quiet_for": 60.0, "engine_stalled": True, "inflight": 3}, (True, {"redis": "ok", "nats": "connected"})),
    ],
)  # fmt: skip
def test_readiness(edit: dict[str, Any], expected: tuple[bool, dict[str, Any]]) -> None:
    assert readiness(dataclasses.replace(READY, **edit)) == expected


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({}, (True, {})),
        ({"loop_quiet_for": 10.0}, (True, {})),
        ({"loop_quiet_for": 12.4}, (False, {"reason": "event loop has not run for 12s"})),
        ({"read_loop_stopped_for": 9.0}, (True, {})),  # the reconnect gets its chance first
        ({"read_loop_stopped_for": 60.0},
         (False, {"reason": "the NATS read loop stopped 60s ago and reconnecting has not restarted it"})),
        ({"loop_quiet_for": 30.0, "read_loop_stopped_for": 60.0},
         (False, {"reason": "event loop has not run for 30s"})),
        ({"engine_stalled": True, "inflight": 3, "unsettled_for": 200.2},
         (False, {"reason": "3 messages pending and nothing acked for 200s"})),
        ({"read_loop_stopped_for": 60.0, "engine_stalled": True},
         (False, {"reason": "the NATS read loop stopped 60s ago and reconnecting has not restarted it"})),
        # Readiness facts do not decide liveness: a replica cut off from NATS or stopping is still alive.
        ({"nats_connected": False, "nats_created": False, "stopping": True, "nats_problem": PING,
          "redis_ok": False, "started": False}, (True, {})),
    ],
)  # fmt: skip
def test_liveness(edit: dict[str, Any], expected: tuple[bool, dict[str, Any]]) -> None:
    assert liveness(dataclasses.replace(READY, **edit)) == expected


def test_a_liveness_failure_is_logged_critically_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    failures = FailureLog(logging.getLogger("cdc_service.service"))
    stalled = liveness(HealthFacts(engine_stalled=True, inflight=3, unsettled_for=200))
    with caplog.at_level("CRITICAL", logger="cdc_service.service"):
        assert failures.report(stalled) == stalled
        assert failures.report(stalled) == stalled
        assert failures.report((True, {})) == (True, {})
        failures.report(stalled)  # a new episode
    assert [r.getMessage() for r in caplog.records] == [
        "liveness failing: 3 messages pending and nothing acked for 200s"
    ] * 2
