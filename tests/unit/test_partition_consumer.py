"""ensure_partition_consumer: what it writes, which failures it retries and for how long (fake request/reply; the
races and the storeless durable against a real server are in tests/integration/test_partition_consumer_start.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from cdc_service.adapters import nats_partitions
from cdc_service.adapters.nats_jetstream import ProvisioningError, advisory_subjects
from cdc_service.adapters.nats_partitions import consumer_request, ensure_partition_consumer, retry_window
from cdc_service.config import settings_from_mapping

RACE = {"error": {"code": 500, "err_code": 10012, "description": "start sequence can not be updated"}}
MISSING = {"error": {"code": 404, "err_code": 10014, "description": "consumer not found"}}
EXISTS = {"error": {"code": 400, "err_code": 10148, "description": "consumer already exists"}}


class FakeNats:
    """Answers CONSUMER.INFO from ``infos`` (the last one repeats) and CONSUMER.CREATE from ``creates``, then ok."""

    def __init__(self, infos: list[dict[str, Any]], creates: list[dict[str, Any]] | None = None) -> None:
        self.infos = infos
        self.creates = creates or []
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.requests.append((subject, orjson.loads(payload) if payload else {}))
        if ".CONSUMER.INFO." in subject:
            reply = self.infos.pop(0) if len(self.infos) > 1 else self.infos[0]
        else:
            reply = self.creates.pop(0) if self.creates else {"name": "ok"}
        return SimpleNamespace(data=orjson.dumps(reply))

    def writes(self) -> list[dict[str, Any]]:
        return [body for subject, body in self.requests if ".CONSUMER.CREATE." in subject]


@pytest.fixture(autouse=True)
def short_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing durable is created only after it stayed missing this long (0.5 s in the service)."""
    monkeypatch.setattr(nats_partitions, "_SETTLE", 0.01)


async def owner() -> bool:
    return True


async def not_owner() -> bool:
    return False


def settings(**ingest: Any) -> Any:
    return settings_from_mapping({"ingest": {"ordering": "partitioned", "partitions": 2, **ingest}}).ingest


def existing(ingest: Any, created: str = "t1", **config: Any) -> dict[str, Any]:
    body = consumer_request(ingest, 0, 9)["config"]
    return {"created": created, "config": {**body, "replay_policy": "instant", **config}, "ack_floor": {}}


async def test_a_missing_durable_is_created_with_action_create() -> None:
    nc = FakeNats([MISSING])
    await ensure_partition_consumer(nc, settings(), 0)  # type: ignore[arg-type]
    [write] = nc.writes()
    assert write["action"] == "create"
    assert write["config"]["deliver_policy"] == "all"


async def test_a_missing_durable_of_a_partition_another_replica_owns_is_not_created() -> None:
    nc = FakeNats([MISSING])
    await ensure_partition_consumer(nc, settings(), 0, not_owner)  # type: ignore[arg-type]
    assert nc.writes() == []


async def test_a_durable_missing_only_while_a_takeover_recreates_it_is_not_created() -> None:
    ingest = settings()
    nc = FakeNats([MISSING, existing(ingest)])  # present again after the settle time
    await ensure_partition_consumer(nc, ingest, 0, owner)  # type: ignore[arg-type]
    assert nc.writes() == []


async def test_a_durable_created_meanwhile_from_the_start_is_replaced_by_a_create_after_the_floor() -> None:
    ingest = settings()
    from_the_start = existing(ingest, deliver_policy="all", opt_start_seq=None)
    nc = FakeNats([from_the_start], [EXISTS])
    await nats_partitions.create_partition_consumer(nc, ingest, 0, 9)  # type: ignore[arg-type]
    first, second = nc.writes()
    assert first["config"]["opt_start_seq"] == second["config"]["opt_start_seq"] == 9
    assert any(".CONSUMER.DELETE." in subject for subject, _ in nc.requests)


async def test_a_durable_created_meanwhile_past_the_floor_is_kept() -> None:
    ingest = settings()
    nc = FakeNats([existing(ingest)], [EXISTS])  # starts at 9, past the 5 this create asks for
    await nats_partitions.create_partition_consumer(nc, ingest, 0, 5)  # type: ignore[arg-type]
    assert len(nc.writes()) == 1
    assert not any(".CONSUMER.DELETE." in subject for subject, _ in nc.requests)


async def test_a_durable_already_as_configured_is_not_written() -> None:
    ingest = settings()
    nc = FakeNats([existing(ingest)])
    await ensure_partition_consumer(nc, ingest, 0)  # type: ignore[arg-type]
    assert nc.writes() == []


async def test_an_update_keeps_where_the_durable_starts() -> None:
    ingest = settings()
    nc = FakeNats([existing(ingest, ack_wait=1)])
    await ensure_partition_consumer(nc, ingest, 0)  # type: ignore[arg-type]
    [write] = nc.writes()
    assert write["action"] == "update"
    assert write["config"]["ack_wait"] == int(ingest.ack_wait * 1e9)
    assert (write["config"]["deliver_policy"], write["config"]["opt_start_seq"]) == ("by_start_sequence", 9)


@pytest.mark.parametrize("race", [EXISTS, MISSING])
async def test_a_create_or_update_racing_a_takeover_reads_the_durable_again(race: dict[str, Any]) -> None:
    ingest = settings(member_ttl=1)
    infos = [MISSING, MISSING, existing(ingest)] if race is EXISTS else [existing(ingest, ack_wait=1), MISSING]
    nc = FakeNats(infos, [race])
    await ensure_partition_consumer(nc, ingest, 0)  # type: ignore[arg-type]
    assert len(nc.writes()) == (1 if race is EXISTS else 2)


async def test_an_update_refused_because_a_takeover_replaced_the_durable_is_retried() -> None:
    ingest = settings(member_ttl=1)
    replaced = existing(ingest, created="t2", ack_wait=1, opt_start_seq=12)
    nc = FakeNats([existing(ingest, ack_wait=1), replaced, replaced], [RACE])
    await ensure_partition_consumer(nc, ingest, 0)  # type: ignore[arg-type]
    first, second = nc.writes()
    assert (first["config"]["opt_start_seq"], second["config"]["opt_start_seq"]) == (9, 12)


async def test_races_that_never_end_give_up_after_the_window_naming_the_consumer() -> None:
    ingest = settings(member_ttl=0.2)
    nc = FakeNats([MISSING], [EXISTS] * 1000)
    started = time.monotonic()
    with pytest.raises(ProvisioningError, match=r"^cannot create or update consumer cdc_consumers_p1: .*10148"):
        await ensure_partition_consumer(nc, ingest, 1)  # type: ignore[arg-type]
    assert retry_window(ingest) <= time.monotonic() - started < retry_window(ingest) + 1
    assert len(nc.writes()) > 1


@pytest.mark.parametrize(
    ("field", "value"), [("ack_policy", "none"), ("max_waiting", 16), ("deliver_subject", "push.here")]
)
async def test_a_fixed_field_the_settings_cannot_change_stops_at_once(field: str, value: Any) -> None:
    ingest = settings()
    nc = FakeNats([existing(ingest, **{field: value})])
    with pytest.raises(ProvisioningError) as raised:
        await ensure_partition_consumer(nc, ingest, 0)  # type: ignore[arg-type]
    assert nc.writes() == []
    assert "\n" not in str(raised.value)
    assert f"cdc_consumers_p0 on cdc_events_partitioned: {field} is {value!r}" in str(raised.value)


def test_the_advisories_captured_in_partitioned_mode_are_those_of_the_partition_durables() -> None:
    ingest = settings(partitions=3)
    expected = [
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.cdc_events_partitioned.{nats_partitions.durable_name(ingest, p)}"
        for p in range(3)
    ]
    assert advisory_subjects(ingest) == expected
    replica = settings_from_mapping({}).ingest
    assert advisory_subjects(replica) == ["$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.cdc_events_stream.cdc_consumers"]
