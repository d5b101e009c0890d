"""Fault injection against real servers (CI-sized): one scenario at a time, then all together.

Each test owns its nats-server, redis-server and two replicas (``tests/faults/chaos.py``), publishes 2,000 events
(5 of them poison) at a steady pace, injects the fault(s) while they flow, and checks that every event is in
``wa_stream`` exactly once, the durable has nothing pending and the dead-letter stream holds only the poison.
``make chaos`` runs the same scenarios at 20,000 events.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.chaos import ALL, ENVIRONMENT, SCENARIOS, Result, run_scenario

pytestmark = pytest.mark.integration

EVENTS = 2000
RATE = 400.0
POISON = 5


def _check(result: Result) -> None:
    print(f"{result.scenario} {result.summary} wall={result.wall:.1f}s")
    evidence = result.evidence()
    assert not result.lost, evidence
    assert not result.duplicated, evidence
    assert not result.unexpected, evidence
    assert result.dead_lettered == result.poison + len(result.exhausted), evidence
    assert not result.unexpected_dead_letters, evidence
    assert result.num_pending == 0 and result.num_ack_pending == 0, evidence
    # the fault did what it should: output_reject refused publishes without any redelivery, SIGTERM exits 0, ...
    assert not result.fault_problems(), evidence


# oom_loop stays in `make chaos` only: at 2,000 events its kills do not reliably catch the same messages twice, so
# whether any delivery runs out varies from run to run. The deterministic "killed while holding messages" case is
# tests/integration/test_environment_faults.py (a frozen, then killed replica); frozen_replica burns deliveries here.
CI_ENVIRONMENT = [s for s in ENVIRONMENT if s != "oom_loop"]


@pytest.mark.parametrize("scenario", [*SCENARIOS, *CI_ENVIRONMENT])
async def test_one_fault(scenario: str, tmp_path: Path) -> None:
    result = await run_scenario(scenario, tmp_path, events=EVENTS, rate=RATE, poison=POISON)
    _check(result)


async def test_all_faults_together(tmp_path: Path) -> None:
    result = await run_scenario(ALL, tmp_path, events=EVENTS, rate=RATE, poison=POISON)
    _check(result)
