"""The probes' decisions, as pure functions of one snapshot of facts: ``readiness`` for ``/readyz`` and ``liveness``
for ``/healthz``. ``Service`` reads the facts (from the connection, the watches, the engine, the dedup store) and
calls these; everything here is decided from the snapshot alone, so each case is a row of a table test. The one
piece with state, ``FailureLog``, only decides what to log."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

LOOP_STALE_AFTER = 10.0  # seconds without a loop tick, or with the read loop down, before liveness fails

Probe = tuple[bool, dict[str, Any]]


@dataclass(frozen=True)
class HealthFacts:
    """What the probes decide on, read at one moment. Durations are seconds up to that moment."""

    stopping: bool = False  # shutdown began
    nats_state: str = ""  # the connection's own phrase (server, attempt, last error): ``ConnectionState.describe()``
    nats_created: bool = False  # the first connection succeeded (the client exists)
    nats_connected: bool = False  # the client says it is connected now
    read_loop_stopped_for: float | None = None  # nats-py's read loop is seen ended since this long; None: it runs
    started: bool = False  # start-up finished: streams, consumer, engine and intake are in place
    starting: str | None = None  # while not started: why provisioning waits (a JetStream request failed, retrying)
    intake_active: bool = False  # bound to the consumer and receiving
    consumer_problem: str | None = None  # the consumer watchdog's finding (durable or stream missing)
    nats_problem: str | None = None  # nats-server did not answer a ping while nothing moved
    redis_ok: bool = True  # the dedup store's Redis answers
    redis_problem: str | None = None  # why not, when it does not
    loop_quiet_for: float = 0.0  # since the event loop last ticked
    engine_stalled: bool = False  # work pending and nothing settled for ``health.stall_timeout`` (not a hold)
    inflight: int = 0  # messages received and not yet settled
    unsettled_for: float = 0.0  # since the engine last acked or terminated a message


def readiness(facts: HealthFacts) -> Probe:
    """``(ok, detail)`` for ``/readyz``: ready only when connected, started, bound to the consumer and with no
    problem found by a watch. Redis being down does not make the replica unready (it degrades: the JetStream window
    still deduplicates), but the detail says so."""
    detail: dict[str, Any] = {"redis": "ok" if facts.redis_ok else "degraded"}
    reason = _not_ready_reason(facts)
    if reason is not None:
        return False, {**detail, "reason": reason}
    detail["nats"] = "connected"
    if not facts.redis_ok:
        detail["redis_detail"] = facts.redis_problem or "degraded"
    return True, detail


def _not_ready_reason(facts: HealthFacts) -> str | None:
    # The first that applies, from the most basic up: each later check assumes the earlier ones passed.
    checks = (
        (facts.stopping, "shutting down"),
        (not facts.nats_created, facts.nats_state),
        (not facts.nats_connected, f"not connected to NATS: {facts.nats_state}"),
        (facts.read_loop_stopped_for is not None, "NATS read loop stopped"),
        (not facts.started, facts.starting or "starting: connected to NATS, provisioning streams and the consumer"),
        (not facts.intake_active, "not bound to the consumer"),
        (facts.consumer_problem is not None, facts.consumer_problem),
        (facts.nats_problem is not None, facts.nats_problem),
    )
    return next((reason for failing, reason in checks if failing), None)


def liveness(facts: HealthFacts) -> Probe:
    """``(ok, detail)`` for ``/healthz``, the panic guard: fails when the event loop is wedged, when nats-py's read
    loop stayed down although a reconnect was tried, or when work is stuck. Anything a restart would not cure (NATS
    or Redis unreachable, an output on hold) is left to readiness and the alerts."""
    reason = liveness_reason(facts)
    return (True, {}) if reason is None else (False, {"reason": reason})


def liveness_reason(facts: HealthFacts) -> str | None:
    """Why the replica is not alive, or None."""
    stopped_for = facts.read_loop_stopped_for
    if facts.loop_quiet_for > LOOP_STALE_AFTER:
        return f"event loop has not run for {facts.loop_quiet_for:.0f}s"
    if stopped_for is not None and stopped_for > LOOP_STALE_AFTER:
        return f"the NATS read loop stopped {stopped_for:.0f}s ago and reconnecting has not restarted it"
    if facts.engine_stalled:
        return f"{facts.inflight} messages pending and nothing acked for {facts.unsettled_for:.0f}s"
    return None


class FailureLog:
    """Logs the first failure of each episode of failing liveness critically, so the restart the orchestrator is
    about to do has its reason in the log once, not at every probe. ``report`` returns the result it was given."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._failing = False

    def report(self, result: Probe) -> Probe:
        ok, detail = result
        if ok:
            self._failing = False
        elif not self._failing:
            self._failing = True
            self._log.critical("liveness failing: %s", detail["reason"])
        return result
