"""Fault injection against real servers (CI-sized): one scenario at a time, then all together.

Each test owns its nats-server, redis-server and two replicas (``tests/faults/chaos.py``), publishes 2,000 events
(5 of them poison) at a steady 800/s, injects the fault(s) while they flow, and checks that every event is in
``wa_stream`` exactly once, the durable has nothing pending and the dead-letter stream holds only the poison.
``make chaos`` runs the same scenarios at 20,000 events.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.chaos import ALL, ENVIRONMENT, PARTITIONED_KILL, SCENARIOS, Result, inversions, run_scenario

pytestmark = pytest.mark.integration

EVENTS = 2000
# 800/s: the run's flow takes 2.5 s instead of 5 s at 400/s, and more is in flight when a fault strikes; faults that
# outlast the flow still see events, since the producer trickles its last 10 % until they are done.
RATE = 800.0
POISON = 5


def _check(result: Result) -> None:
    print(f"{result.scenario} {result.summary} wall={result.wall:.1f}s")
    evidence = result.evidence()
    assert not result.lost, evidence
    assert not result.duplicated, evidence
    assert result.inversions in (None, 0), evidence
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


async def test_partitioned_replica_kill(tmp_path: Path) -> None:
    """ingest.ordering = partitioned: a replica that owns partitions SIGKILL'd mid-batch and restarted; nothing lost
    or duplicated, no chat out of order, every partition owned by a live replica at the end."""
    result = await run_scenario(PARTITIONED_KILL, tmp_path, events=EVENTS, rate=RATE, poison=POISON)
    assert result.inversions == 0, result.evidence()
    _check(result)


def test_the_order_check_counts_inversions() -> None:
    """The partitioned scenario's order check can fail: a chat's LSN below one stored before it counts."""

    def out(lsn: int, chat: str | None) -> dict[str, object]:
        return {"event_id": f"{lsn}:chatdb:acme:messages:m{lsn}", "row_data": {"chat_id": chat} if chat else {}}

    assert inversions([out(1, "a"), out(2, "b"), out(3, "a"), out(4, None)]) == 0
    assert inversions([out(3, "a"), out(1, "a"), out(2, "a"), out(4, "a")]) == 2
    assert inversions([out(3, "a"), out(1, "b"), out(2, None), out(1, None)]) == 0
